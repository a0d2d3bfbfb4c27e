#!/usr/bin/env python3
"""Writes the Hugging Face parity fixture, made by `transformers` itself:

  models/tests/fixtures/hf-tiny-llama/      a random LlamaForCausalLM (2 layers, hidden 64,
                                             GQA 4/2, tied embeddings, vocab 259 = 256 bytes +
                                             <|bos|> <|eos|> <|pad|>), saved with save_pretrained
                                             in bfloat16, plus its tokenizer (byte-level, no merges)
  models/tests/fixtures/hf_tiny_llama_expected.safetensors
                                             input ids and the logits transformers computes for
                                             them (float32 compute from the bf16 weights)
  models/tests/fixtures/hf_tiny_llama_hellaswag.json
                                             per-ending log-likelihoods of the first hellaswag
                                             items, scored the way `kiln eval --task hellaswag`
                                             scores them (BOS + context, then " " + ending; the sum
                                             of the ending tokens' log-probabilities)

The Rust tests load the folder as any Hub checkpoint and compare (relative error < 1e-4).

    pip install torch transformers
    python3 scripts/make_hf_fixture.py [--data ../shared/data]
"""
import argparse, bz2, hashlib, json, os, shutil

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "models", "tests", "fixtures")


def byte_tokenizer():
    """Byte-level BPE with no merges: one token per byte, ids 0..255, then the specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte-to-unicode table, in byte order, so that id == byte value.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs)))
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])
    return tok


def hellaswag_items(path, n):
    lines = bz2.open(path, "rt", encoding="utf-8").read().splitlines()
    return [dict(context=lines[i], label=int(lines[i + 1]), endings=lines[i + 2:i + 6]) for i in range(0, 6 * n, 6)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("KILN_DATA", os.path.join(ROOT, "..", "shared", "data")))
    args = ap.parse_args()

    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                      bos_token_id=256, eos_token_id=257, pad_token_id=258, initializer_range=0.25)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    out = os.path.join(FIX, "hf-tiny-llama")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), bos_token="<|bos|>",
                                  eos_token="<|eos|>", pad_token="<|pad|>")
    tok.save_pretrained(out)

    # Reload what was saved, in float32, as a user would: the in-memory model's RoPE buffer was
    # rounded to bf16 by `.to(torch.bfloat16)`, a reloaded one is not.
    f32 = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    text = ["ROMEO: But soft, what light", "First Citizen: Speak, speak."]
    ids = [[256] + tok.encode(t, add_special_tokens=False)[:15] for t in text]
    ids = torch.tensor(ids, dtype=torch.int64)
    with torch.no_grad():
        logits = f32(ids).logits.float()
    save_file({"input_ids": ids.to(torch.float32).contiguous(), "logits": logits.contiguous()},
              os.path.join(FIX, "hf_tiny_llama_expected.safetensors"), metadata={"format": "pt"})

    # Hellaswag log-likelihoods, Kiln's procedure (evals/src/tasks/hellaswag.rs::score_item).
    items = hellaswag_items(os.path.join(args.data, "hellaswag", "hellaswag_val_full.txt.bz2"), 3)
    ctx_len = cfg.max_position_embeddings
    scored = []
    for it in items:
        ctx = [256] + tok.encode(it["context"], add_special_tokens=False)
        lls = []
        for e in it["endings"]:
            cont = tok.encode(" " + e, add_special_tokens=False)
            s = (ctx + cont)[-(ctx_len + 1):]
            n = min(len(cont), len(s) - 1)
            x = torch.tensor([s[:-1]])
            with torch.no_grad():
                lp = torch.log_softmax(f32(x).logits.double(), dim=-1)[0]
            tgt = torch.tensor(s[1:])
            per = lp[torch.arange(len(s) - 1), tgt]
            lls.append(float(per[-n:].sum()))
        # The data set's text stays out of the repository: the test matches items by hash.
        scored.append(dict(context_sha256=hashlib.sha256(it["context"].encode()).hexdigest(), label=it["label"], loglik=lls))
    with open(os.path.join(FIX, "hf_tiny_llama_hellaswag.json"), "w") as f:
        json.dump(dict(source="hellaswag_val_full.txt.bz2, first 3 items", transformers=__import__("transformers").__version__,
                       torch=torch.__version__, items=scored), f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
