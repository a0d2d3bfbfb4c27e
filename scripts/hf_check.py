#!/usr/bin/env python3
"""Loads a model folder with `transformers` (AutoModelForCausalLM, AutoTokenizer) exactly as a user
would, and prints JSON: the float32 logits for the given token ids, and how the tokenizer encodes
the given text. Kiln's test `transformers_loads_a_kiln_export` compares both with Kiln's own.

    python3 scripts/hf_check.py MODEL_DIR --ids 1,2,3 --text "ROMEO:"
"""
import argparse, json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--ids", required=True, help="comma-separated token ids, one sequence")
ap.add_argument("--text", default="")
a = ap.parse_args()
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(a.model)
ids = torch.tensor([[int(x) for x in a.ids.split(",")]])
with torch.no_grad():
    logits = model(ids).logits[0].float()
print(json.dumps({
    "logits": logits.flatten().tolist(),
    "vocab": logits.shape[-1],
    "encode": tok.encode(a.text, add_special_tokens=False),
    "model_class": type(model).__name__,
}))
