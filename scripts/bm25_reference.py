#!/usr/bin/env python3
"""A standard BM25 (Okapi: k1 1.5, b 0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5))) over
lowercased, punctuation-stripped tokens (runs of letters and digits), as the reference for Kiln's
BM25 recall on SQuAD dev; and the recall of Kiln's own rankings, from `kiln index query --format
json`, against the same gold documents.

    bm25_reference.py PARAGRAPHS.jsonl QA.jsonl [KILN_HITS.jsonl]

PARAGRAPHS: {"doc_id", "text"} a line; QA: {"question", "doc_id"} a line (the gold paragraph);
KILN_HITS: one {"query", "results": [{"doc_id", ...}]} a line, in QA's order. Prints recall@1, @5,
@20 and MRR@20 for each, as JSON lines.
"""
import collections
import json
import math
import re
import sys

K1, B = 1.5, 0.75
TOKEN = re.compile(r"[^\W_]+", re.UNICODE)


def tokens(text):
    return TOKEN.findall(text.lower())


def scores(rankings, gold):
    """recall@1/5/20 and MRR@20 of rankings (lists of doc ids) against gold ids."""
    r = {1: 0, 5: 0, 20: 0}
    mrr = 0.0
    for ranked, g in zip(rankings, gold):
        for k in r:
            r[k] += g in ranked[:k]
        if g in ranked[:20]:
            mrr += 1.0 / (ranked.index(g) + 1)
    n = len(gold)
    return {"recall@1": 100 * r[1] / n, "recall@5": 100 * r[5] / n, "recall@20": 100 * r[20] / n, "mrr@20": mrr / n, "questions": n}


def main():
    paragraphs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    qa = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
    ids = [p["doc_id"] for p in paragraphs]
    postings = collections.defaultdict(list)  # term -> [(doc, tf)]
    lengths = []
    for d, p in enumerate(paragraphs):
        toks = tokens(p["text"])
        lengths.append(len(toks))
        for t, tf in collections.Counter(toks).items():
            postings[t].append((d, tf))
    n = len(paragraphs)
    avgdl = sum(lengths) / n
    idf = {t: math.log(1 + (n - len(ps) + 0.5) / (len(ps) + 0.5)) for t, ps in postings.items()}
    norm = [K1 * (1 - B + B * l / avgdl) for l in lengths]
    rankings = []
    for q in qa:
        acc = collections.defaultdict(float)
        for t in tokens(q["question"]):  # a repeated query term counts each time
            for d, tf in postings.get(t, ()):
                acc[d] += idf[t] * tf * (K1 + 1) / (tf + norm[d])
        best = sorted(acc.items(), key=lambda x: (-x[1], x[0]))[:20]
        rankings.append([ids[d] for d, _ in best])
    gold = [q["doc_id"] for q in qa]
    print(json.dumps({"ranker": "reference BM25 (k1 1.5, b 0.75)", **scores(rankings, gold)}))
    if len(sys.argv) > 3:
        kiln = [json.loads(l) for l in open(sys.argv[3]) if l.strip()]
        if len(kiln) != len(qa):
            sys.exit(f"{sys.argv[3]}: {len(kiln)} rankings for {len(qa)} questions")
        for k, q in zip(kiln, qa):
            if k["query"] != q["question"]:
                sys.exit(f"{sys.argv[3]}: rankings out of order at {q['question']!r}")
        print(json.dumps({"ranker": "kiln bm25 (tantivy, k1 1.2, b 0.75)", **scores([[h["doc_id"] for h in k["results"]] for k in kiln], gold)}))


if __name__ == "__main__":
    main()
