#!/usr/bin/env python3
"""PyTorch reference for the retriever stage's speed (`stage = "retriever"`,
recipes/retriever/smollm2-squad-retriever.toml): SmolLM2-135M-Instruct (GGUF, de-quantized by
transformers) with PEFT LoRA adapters (rank 16, alpha 32, all seven projections) trained with
InfoNCE over in-batch negatives on (question, paragraph) pairs of SQuAD dev's first 38 articles.
As Kiln: the query is "query: " + the question (at most 64 tokens), the passage "passage: " +
title + newline + text (at most 256 tokens), each embedded as the mean over its tokens of the
final norm's output, unit length; scores over temperature 0.05; copies of a query's own
paragraph left out of its softmax; AdamW, gradient clipping at 1. Prints one JSON line: real
(non-padding) tokens per second of training steps after warm-up, and peak RSS.

  python torch_retriever_reference.py --gguf ../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --squad ../shared/data/squad11_dev --steps 10 --batch 16 [--threads 2]
"""
import argparse, json, os, random, resource, statistics, time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--squad", required=True, help="folder with squad11_dev_qa.jsonl and squad11_dev_paragraphs.jsonl")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--query-tokens", type=int, default=64)
    ap.add_argument("--passage-tokens", type=int, default=256)
    ap.add_argument("--tau", type=float, default=0.05)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    folder, name = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    trunk = model.base_model.model.model  # LlamaModel: its last_hidden_state is the final norm's output

    paras = {}
    for l in open(os.path.join(a.squad, "squad11_dev_paragraphs.jsonl")):
        p = json.loads(l)
        paras[p["doc_id"]] = p["title"] + "\n" + p["text"]
    qas = [json.loads(l) for l in open(os.path.join(a.squad, "squad11_dev_qa.jsonl"))]
    titles = list(dict.fromkeys(q["title"] for q in qas))
    train = [q for q in qas if q["title"] in set(titles[:38])]
    random.Random(a.seed).shuffle(train)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def side(texts, cut):
        ids = [tok("".join(t), add_special_tokens=False)["input_ids"][:cut] for t in texts]
        n = max(len(x) for x in ids)
        return (torch.tensor([x + [pad] * (n - len(x)) for x in ids]),
                torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids]))

    def embed(ids, att):
        h = trunk(input_ids=ids, attention_mask=att).last_hidden_state  # [B, T, D]
        m = att.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # [B, D]

    model.train()
    times, tokens, losses = [], [], []
    for s in range(a.steps + a.warmup):
        batch = train[s * a.batch:(s + 1) * a.batch]
        qi, qa = side([("query: ", q["question"]) for q in batch], a.query_tokens)
        pi, pa = side([("passage: ", paras[q["doc_id"]]) for q in batch], a.passage_tokens)
        docs = [q["doc_id"] for q in batch]
        # Another copy of a query's own paragraph is no negative.
        same = torch.tensor([[i != j and docs[i] == docs[j] for j in range(len(docs))] for i in range(len(docs))])
        t = time.perf_counter()
        eq, ep = embed(qi, qa), embed(pi, pa)
        scores = (eq @ ep.T / a.tau).masked_fill(same, float("-inf"))
        loss = F.cross_entropy(scores, torch.arange(len(batch)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        losses.append(loss.item())
        if s >= a.warmup:
            times.append(dt); tokens.append(int(qa.sum() + pa.sum()))
    print(json.dumps({
        "impl": f"pytorch {torch.__version__} eager, transformers, peft lora r={a.lora_rank}, InfoNCE in-batch negatives",
        "threads": a.threads, "batch": a.batch, "steps": a.steps,
        "tokens_per_s": sum(tokens) / sum(times),
        "median_step_s": statistics.median(times),
        "loss_first": losses[0], "loss_last": statistics.mean(losses[-5:]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": sum(p.numel() for p in params)}))


if __name__ == "__main__":
    main()
