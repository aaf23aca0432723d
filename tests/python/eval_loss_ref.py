"""Reference for `overfill eval-loss`: the mean cross-entropy over predicted target tokens of a
split, computed with transformers 4.57, one row at a time (no padding), straight from the shard
Parquet files (pyarrow) listed in manifest.json.

usage: eval_loss_ref.py --decoder DIR [--full DIR] --shards DIR [--split val|train] --mode overfill|pruned

overfill: the full model prefills the context with use_cache → past_key_values; the decoder
continues over y0..y(N-1) at positions |x|..|x|+N-1 with those past_key_values; labels y1..yN.
pruned: the decoder alone over x ‖ y0..y(N-1); the same labels. Prints {"loss", "tokens", "rows"}.
"""
import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def rows_of(shards: Path, split: str):
    manifest = json.loads((shards / "manifest.json").read_text())
    for shard in manifest[split]["shards"]:
        table = pq.read_table(shards / shard["file"], columns=["context_ids", "target_ids"])
        for ctx, tgt in zip(table.column("context_ids").to_pylist(), table.column("target_ids").to_pylist()):
            yield ctx, tgt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--full")
    p.add_argument("--decoder", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--mode", choices=["overfill", "pruned"], required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    decoder = load(args.decoder)
    full = load(args.full) if args.mode == "overfill" else None

    loss_sum, tokens, rows = 0.0, 0, 0
    with torch.no_grad():
        for ctx, tgt in rows_of(Path(args.shards), args.split):
            rows += 1
            if len(tgt) < 2:
                continue
            x = torch.tensor([ctx])
            y_in = torch.tensor([tgt[:-1]])
            labels = torch.tensor(tgt[1:])
            if args.mode == "overfill":
                past = full(x, use_cache=True).past_key_values
                positions = torch.arange(len(ctx), len(ctx) + len(tgt) - 1)[None]
                logits = decoder(y_in, past_key_values=past, position_ids=positions).logits[0]
            else:
                logits = decoder(torch.cat([x, y_in], 1)).logits[0, len(ctx):]
            loss_sum += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
            tokens += len(labels)
    print(json.dumps({"loss": loss_sum / tokens, "tokens": tokens, "rows": rows}))


if __name__ == "__main__":
    main()
