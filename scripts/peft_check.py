#!/usr/bin/env python3
"""Logits of a LoRA adapter through PEFT, for Kiln's PEFT parity tests (models/tests/lora.rs).

    python3 scripts/peft_check.py BASE_DIR ADAPTER_DIR --ids 1,2,3;4,5,6 --out logits.safetensors

Loads BASE_DIR with transformers (float32), puts the adapter on it with
`PeftModel.from_pretrained(base, ADAPTER_DIR)` (unmerged: base(x) + s·B(A(x))), and writes the
logits of the given rows of token ids (rows split by ';', equal lengths) as `logits`
[rows, T, vocab]. Fails when PEFT reports adapter keys it could not load (a misnamed tensor
would otherwise be silently ignored). Needs: torch, transformers, peft.
"""
import argparse, sys, warnings

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = [[int(x) for x in r.split(",")] for r in a.ids.split(";")]
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, a.adapter)
    for w in caught:
        m = str(w.message).lower()
        if "missing adapter keys" in m or "unexpected keys" in m:
            sys.exit(f"PEFT: {w.message}")
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(rows)).logits.float().contiguous()
    save_file({"logits": logits}, a.out)


if __name__ == "__main__":
    main()
