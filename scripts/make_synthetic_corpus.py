#!/usr/bin/env python3
"""A synthetic corpus for retrieval at scale: N passages of 40 to 80 words drawn from a Zipfian
vocabulary (Tiny Shakespeare's words, then made-up ones), written as JSONL {"doc_id", "text"}, and
Q queries: 8 consecutive words from random passages, with the passage as the gold document.

    make_synthetic_corpus.py SHAKESPEARE.txt N Q OUT.jsonl QUERIES.jsonl [SEED]
"""
import json
import random
import re
import sys


def main():
    src, n, q, out, queries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    rng = random.Random(int(sys.argv[6]) if len(sys.argv) > 6 else 1)
    words = []
    seen = set()
    for w in re.findall(r"[a-z]+", open(src).read().lower()):
        if w not in seen:
            seen.add(w)
            words.append(w)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "el", "bri", "on", "qua", "zed"]
    while len(words) < 50000:
        words.append("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    weights = [1.0 / (r + 1) ** 1.05 for r in range(len(words))]
    cum = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    picks = set(rng.sample(range(n), q))
    with open(out, "w") as f, open(queries, "w") as fq:
        for i in range(n):
            k = rng.randint(40, 80)
            text = rng.choices(words, cum_weights=cum, k=k)
            f.write(json.dumps({"doc_id": f"p{i}", "text": " ".join(text) + "."}) + "\n")
            if i in picks:
                s = rng.randint(0, k - 8)
                fq.write(json.dumps({"question": " ".join(text[s:s + 8]), "doc_id": f"p{i}"}) + "\n")


if __name__ == "__main__":
    main()
