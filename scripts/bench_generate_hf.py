#!/usr/bin/env python3
"""transformers' `generate` on the same prompts as `kiln generate --chat`, for scripts/bench-generate.

  bench_generate_hf.py MODEL(.gguf or folder) PROMPTS.txt --max-tokens N --batch B [--threads 2] [--out texts.jsonl]

Each line of PROMPTS.txt is one user message, rendered by the model's chat template with the
generation prompt. Greedy, stopping at the end-of-turn token, B prompts at a time (left-padded,
as transformers batches). Prints one JSON line: prompts, new tokens (up to and including each
reply's end-of-turn token, as Kiln counts them), seconds spent in generate() (loading excluded,
as Kiln's figure excludes it) and new tokens per second. --out writes each reply.
"""
import argparse, json, os, sys, time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.model.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(a.model))
        kw = {"gguf_file": name}
    else:
        folder, kw = a.model, {}
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [l.rstrip("\n") for l in open(a.prompts) if l.strip()]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in prompts]
    replies, new_tokens, secs = [], 0, 0.0
    for i in range(0, len(texts), a.batch):
        enc = tok(texts[i : i + a.batch], return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=a.max_tokens, do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id)
        secs += time.perf_counter() - t0
        for row in out[:, enc.input_ids.shape[1] :].tolist():
            n = row.index(stop) + 1 if stop in row else len(row)
            new_tokens += n
            replies.append(tok.decode(row[:n], skip_special_tokens=True))
    if a.out:
        with open(a.out, "w") as f:
            for q, r in zip(prompts, replies):
                f.write(json.dumps({"prompt": q, "completion": r}) + "\n")
    print(json.dumps({"prompts": len(prompts), "new_tokens": new_tokens, "seconds": secs, "tokens_per_s": new_tokens / secs}))


if __name__ == "__main__":
    sys.exit(main())
