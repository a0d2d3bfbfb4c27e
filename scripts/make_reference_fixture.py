#!/usr/bin/env python3
"""Writes models/tests/fixtures/llama_reference.safetensors: a tiny Llama-style decoder in PyTorch
(RMSNorm, half-split RoPE, SwiGLU, grouped-query attention 4/2, untied head) with random weights,
a fixed input, and the logits PyTorch computes for it. The Rust test `reference_parity` loads the
same weights into Kiln's decoder and compares logits (max|a-b| / max|ref| < 1e-4).

    pip install torch && python3 scripts/make_reference_fixture.py

Tensor names follow Hugging Face LlamaForCausalLM ([out, in] linear weights). The file is written
with a minimal safetensors writer (no extra package needed).
"""
import json, os, struct

import torch
import torch.nn.functional as F

CFG = dict(vocab_size=61, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
           rope_theta=10000.0, rms_norm_eps=1e-5)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def forward(W, ids, c):
    d, h, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = d // h
    b, t = ids.shape
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()
    x = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = lambda n: W[f"model.layers.{i}.{n}.weight"]
        hn = rms_norm(x, p("input_layernorm"), c["rms_norm_eps"])
        q = (hn @ p("self_attn.q_proj").T).view(b, t, h, hd).transpose(1, 2)
        k = (hn @ p("self_attn.k_proj").T).view(b, t, kv, hd).transpose(1, 2)
        v = (hn @ p("self_attn.v_proj").T).view(b, t, kv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(h // kv, dim=1)
        v = v.repeat_interleave(h // kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + y.transpose(1, 2).reshape(b, t, d) @ p("self_attn.o_proj").T
        hn = rms_norm(x, p("post_attention_layernorm"), c["rms_norm_eps"])
        x = x + (F.silu(hn @ p("mlp.gate_proj").T) * (hn @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    x = rms_norm(x, W["model.norm.weight"], c["rms_norm_eps"])
    return x @ W["lm_head.weight"].T


def save_safetensors(path, tensors, meta):
    header, blobs, off = {"__metadata__": meta}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    torch.manual_seed(0)
    c = CFG
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    kvd = c["num_key_value_heads"] * hd
    W = {"model.embed_tokens.weight": torch.randn(v, d)}
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        W[pre + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(d)
        W[pre + "self_attn.q_proj.weight"] = torch.randn(d, d) / d ** 0.5
        W[pre + "self_attn.k_proj.weight"] = torch.randn(kvd, d) / d ** 0.5
        W[pre + "self_attn.v_proj.weight"] = torch.randn(kvd, d) / d ** 0.5
        W[pre + "self_attn.o_proj.weight"] = torch.randn(d, d) / d ** 0.5
        W[pre + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(d)
        W[pre + "mlp.gate_proj.weight"] = torch.randn(f, d) / d ** 0.5
        W[pre + "mlp.up_proj.weight"] = torch.randn(f, d) / d ** 0.5
        W[pre + "mlp.down_proj.weight"] = torch.randn(d, f) / f ** 0.5
    W["model.norm.weight"] = 1 + 0.1 * torch.randn(d)
    W["lm_head.weight"] = torch.randn(v, d) / d ** 0.5
    ids = torch.randint(v, (2, 24))
    with torch.no_grad():
        logits = forward(W, ids, c)
    out = dict(W)
    out["test.input_ids"] = ids.float()
    out["test.logits"] = logits
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "models", "tests", "fixtures", "llama_reference.safetensors")
    save_safetensors(path, out, {"format": "pt", "config": json.dumps(c), "torch": torch.__version__})
    print(f"wrote {os.path.normpath(path)}: logits {tuple(logits.shape)}, max |logit| {logits.abs().max():.3f}")


if __name__ == "__main__":
    main()
