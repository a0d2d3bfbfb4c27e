#!/usr/bin/env python3
"""The `squad-rc` eval with transformers: the same questions, prompt, chat template, greedy
decoding (32 new tokens) and SQuAD EM/F1 as Kiln's `kiln eval MODEL --task squad-rc:N@A`, for a
baseline measured outside Kiln.

  squad_rc_baseline.py FILE.gguf --squad DATA/squad11_dev [--n 200] [--from-article 38] [--threads 2]
"""
import argparse, collections, json, os, re, string, sys, time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

INSTRUCTION = "Answer the question with a short phrase from the passage."


def normalize(s):
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    return " ".join(w for w in s.split() if w not in ("a", "an", "the"))


def f1(pred, gold):
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    pr, rc = same / len(p), same / len(g)
    return 2 * pr * rc / (pr + rc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--squad", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--from-article", type=int, default=38)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    folder, name = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    paras = {}
    for l in open(os.path.join(a.squad, "squad11_dev_paragraphs.jsonl")):
        p = json.loads(l)
        paras[p["doc_id"]] = p["text"]
    titles, held = [], []
    for l in open(os.path.join(a.squad, "squad11_dev_qa.jsonl")):
        q = json.loads(l)
        if q["title"] not in titles:
            titles.append(q["title"])
        if len(titles) > a.from_article:
            held.append(q)
    n = min(a.n, len(held))
    picked = [held[i * len(held) // n] for i in range(n)]
    em = f = ended = 0.0
    t0 = time.time()
    samples = []
    for q in picked:
        user = f"{INSTRUCTION}\n\nPassage: {paras[q['doc_id']]}\n\nQuestion: {q['question']}"
        ids = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
        stop = tok.convert_tokens_to_ids("<|im_end|>")
        done = stop in out
        if done:
            out = out[: out.index(stop)]
        ans = tok.decode(out, skip_special_tokens=True).strip()
        em += max(float(normalize(ans) == normalize(g)) for g in q["answers"])
        f += max(f1(ans, g) for g in q["answers"])
        ended += done
        if len(samples) < 3:
            samples.append({"question": q["question"], "answer": ans, "gold": q["answers"]})
    print(json.dumps({"impl": "transformers greedy", "n": n, "em": em / n, "f1": f / n, "format": ended / n, "seconds": time.time() - t0, "samples": samples}))


if __name__ == "__main__":
    main()
