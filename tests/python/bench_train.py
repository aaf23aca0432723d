"""`just bench-train`: OverFill training throughput of `overfill bench-train` against a PyTorch eager
reference — the transformers models driven by the same loop — on the same CPU, batches, shapes,
dtype and threads.

usage: bench_train.py --overfill PATH [--threads N] [--steps N] [--warmup N] [--batch N]
                      [--context-len N] [--target-len N] [--mode overfill|pruned]

One step = the frozen full model prefills the contexts (no grad) → the decoder runs over the
targets reading that KV cache → sum of token cross-entropies / predicted tokens → backward →
global grad-norm clipping (1.0) → AdamW. Throughput is predicted target tokens per second (the
prefill included), the median over the timed steps. Each side runs in its own process, so peak
memory (VmHWM) is each one's own. Ratio = overfill / transformers (above 1.0 = overfill faster).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The full model: 8 layers, hidden 512 (the bench-model shape); the decoder at half its width,
# with the same layers, heads, KV heads and head_dim, so it can read the full model's cache.
FULL = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    torch_dtype="float32",
)
DECODER_WIDTHS = dict(hidden_size=256, intermediate_size=704)


def make_rows(batch: int, context_len: int, target_len: int, seed: int = 0):
    """Rows of different lengths (left-padded contexts, right-padded targets in a batch)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(batch):
        c = context_len - (i * context_len) // (4 * batch)
        t = target_len - (i * target_len) // (3 * batch)
        rows.append(
            {
                "context_ids": [rng.randrange(FULL["vocab_size"]) for _ in range(c)],
                "target_ids": [rng.randrange(FULL["vocab_size"]) for _ in range(t)],
            }
        )
    return rows


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def transformers_worker(args):
    """Runs in its own process: the reference loop, printing one JSON line."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full_cfg = {k: v for k, v in FULL.items() if k not in ("model_type", "architectures", "torch_dtype")}
    full = LlamaForCausalLM(LlamaConfig(**full_cfg, attn_implementation="sdpa")).eval()
    for p in full.parameters():
        p.requires_grad_(False)
    decoder = LlamaForCausalLM(LlamaConfig(**{**full_cfg, **DECODER_WIDTHS}, attn_implementation="sdpa")).train()
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    rows = json.loads(Path(args.rows).read_text())
    b = len(rows)
    tc = max(len(r["context_ids"]) for r in rows)
    n = max(len(r["target_ids"]) - 1 for r in rows)
    ctx = torch.zeros(b, tc, dtype=torch.long)
    ctx_mask = torch.zeros(b, tc, dtype=torch.long)
    tgt = torch.zeros(b, n, dtype=torch.long)
    tgt_mask = torch.zeros(b, n, dtype=torch.long)
    labels = torch.full((b, n), -100, dtype=torch.long)
    tgt_pos = torch.zeros(b, n, dtype=torch.long)
    for i, r in enumerate(rows):
        c, t = r["context_ids"], r["target_ids"]
        ctx[i, tc - len(c):] = torch.tensor(c)
        ctx_mask[i, tc - len(c):] = 1
        tgt[i, : len(t) - 1] = torch.tensor(t[:-1])
        tgt_mask[i, : len(t) - 1] = 1
        labels[i, : len(t) - 1] = torch.tensor(t[1:])
        tgt_pos[i] = len(c) + torch.arange(n)
    ctx_pos = (ctx_mask.cumsum(1) - 1).clamp(min=0)
    predicted = int((labels != -100).sum())

    def step():
        if args.mode == "overfill":
            with torch.no_grad():
                past = full(ctx, attention_mask=ctx_mask, position_ids=ctx_pos, use_cache=True).past_key_values
            logits = decoder(
                tgt,
                attention_mask=torch.cat([ctx_mask, tgt_mask], 1),
                position_ids=tgt_pos,
                past_key_values=past,
            ).logits
        else:  # pruned: the decoder alone over context ‖ target
            out = decoder(
                torch.cat([ctx, tgt], 1),
                attention_mask=torch.cat([ctx_mask, tgt_mask], 1),
                position_ids=torch.cat([ctx_pos, tgt_pos], 1),
            ).logits
            logits = out[:, tc:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum") / predicted
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    print(json.dumps({
        "impl": "transformers-eager-loop",
        "step_seconds": median,
        "tokens_per_sec": predicted / median,
        "predicted_tokens": predicted,
        "peak_rss_mib": peak_rss_mib(),
    }))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--overfill", help="path of the overfill binary")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--target-len", type=int, default=256)
    p.add_argument("--mode", choices=["overfill", "pruned"], default="overfill")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return transformers_worker(args)
    if not args.overfill:
        p.error("--overfill is required")

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows_path = tmp / "rows.json"
    rows_path.write_text(json.dumps(make_rows(args.batch, args.context_len, args.target_len)))
    config_path = tmp / "full-config.json"
    config_path.write_text(json.dumps(FULL))

    common = ["--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    ours_cmd = [args.overfill, "bench-train", "--full-config", str(config_path),
                "--hidden-size", str(DECODER_WIDTHS["hidden_size"]),
                "--intermediate-size", str(DECODER_WIDTHS["intermediate_size"]),
                "--rows", str(rows_path), "--mode", args.mode, "--device", "cpu", "--dtype", "f32",
                "--json", *common]
    theirs_cmd = [sys.executable, __file__, "--worker", "--rows", str(rows_path), "--mode", args.mode, *common]

    def run(cmd):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    theirs = run(theirs_cmd)
    ours = run(ours_cmd)
    print(f"bench-train ({args.mode}, CPU f32, {args.threads} threads, batch {args.batch}, "
          f"context ≤{args.context_len}, target ≤{args.target_len}, median of {args.steps} steps)")
    print(f"  full: 8 layers × 512, decoder: 8 layers × {DECODER_WIDTHS['hidden_size']}; "
          f"{ours['predicted_tokens']} predicted tokens per step")
    for r in (ours, theirs):
        print(f"  {r['impl']:<26} step {r['step_seconds'] * 1000:8.1f} ms  "
              f"{r['tokens_per_sec']:8.1f} target tok/s  peak RSS {r['peak_rss_mib']:7.0f} MiB")
    ratio = ours["tokens_per_sec"] / theirs["tokens_per_sec"]
    print(f"  ratio overfill / transformers: {ratio:.2f}x (goal >= 1.2x)")
    print(json.dumps({"ours": ours, "theirs": theirs, "ratio": ratio}))


if __name__ == "__main__":
    main()
