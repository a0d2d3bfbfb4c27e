#!/usr/bin/env python3
"""What `transformers` makes of a GGUF file, for Kiln's parity tests (models/tests/gguf.rs).

  gguf_check.py FILE.gguf --ids 1,2,3 [--chats chats.json] [--texts texts.json] [--out logits.safetensors]
                [--stride N] [--generate "prompt"]

Loads the file with AutoModelForCausalLM.from_pretrained(folder, gguf_file=name) (needs `pip install
gguf accelerate`), in f32. Prints JSON: the chat template renderings of each conversation in
--chats (with and without the generation prompt), the encodings of --texts, and with --generate
the greedy reply to one user message. --out writes the logits for --ids: all of them, or with
--stride N only every N-th vocabulary entry (`logits_sub`, the committed fixture's form), plus the
argmax per position.
"""
import argparse, json, os, sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("--ids", default="")
    p.add_argument("--chats")
    p.add_argument("--texts")
    p.add_argument("--out")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--generate")
    a = p.parse_args()
    folder, name = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    out = {"eos_token": tok.eos_token, "bos_token": tok.bos_token}
    if a.chats:
        chats = json.load(open(a.chats))
        out["chat"] = [
            [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=g) for g in (False, True)] for c in chats
        ]
    if a.texts:
        out["encode"] = [tok(t, add_special_tokens=False).input_ids for t in json.load(open(a.texts))]
    if a.ids or a.generate:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model.eval()
    if a.ids:
        ids = torch.tensor([[int(x) for x in a.ids.split(",")]])
        with torch.no_grad():
            logits = model(ids).logits[0].float()  # [T, V]
        tensors = {"input_ids": ids[0].float(), "argmax": logits.argmax(-1).float()}
        if a.stride > 1:
            tensors["logits_sub"] = logits[:, :: a.stride].contiguous()
        else:
            tensors["logits"] = logits.contiguous()
        save_file(tensors, a.out)
    if a.generate:
        msgs = [{"role": "user", "content": a.generate}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        gen = model.generate(ids, max_new_tokens=40, do_sample=False)
        out["reply"] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
