#!/usr/bin/env python3
"""Writes the PEFT parity fixture, made by PEFT itself:

  models/tests/fixtures/peft-tiny-lora/     a LoRA adapter (r 4, alpha 8, all seven projections)
                                             on models/tests/fixtures/hf-tiny-llama, saved with
                                             PeftModel.save_pretrained; A and B drawn at random
                                             (seeded) so that it changes the logits;
                                             base_model_name_or_path rewritten to
                                             "../hf-tiny-llama" (relative to the adapter folder)
  models/tests/fixtures/peft_tiny_lora_expected.safetensors
                                             input ids and the logits PEFT computes for them
                                             (unmerged: base(x) + s·B(A(x)), float32)

Kiln loads the adapter merged into its base and must give these logits (relative error < 1e-4).

    pip install torch transformers peft
    python3 scripts/make_peft_fixture.py
"""
import json, os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "models", "tests", "fixtures")


def main():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "hf-tiny-llama"), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    out = os.path.join(FIX, "peft-tiny-lora")
    model.save_pretrained(out)
    path = os.path.join(out, "adapter_config.json")
    c = json.load(open(path))
    c["base_model_name_or_path"] = "../hf-tiny-llama"
    json.dump(c, open(path, "w"), indent=2, sort_keys=True)
    readme = os.path.join(out, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    ids = torch.randint(0, 259, (2, 12))
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits.float().contiguous()
    save_file({"input_ids": ids.float(), "logits": logits}, os.path.join(FIX, "peft_tiny_lora_expected.safetensors"))
    print("wrote", out, "logits", tuple(logits.shape), "max |logit|", float(logits.abs().max()))


if __name__ == "__main__":
    main()
