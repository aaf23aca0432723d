"""Independent reference for `overfill calibrate-prune`, written on Hugging Face transformers.

Scoring uses forward hooks on the HF modules (input_layernorm and post_attention_layernorm
outputs, and a pre-hook on mlp.down_proj for its input), the way the paper's reference code and
NVIDIA Model-Optimizer collect activations; pruning slices a state dict and saves a fresh HF model.

Sub-commands (all print one JSON line on stdout):
  make-model --out DIR [--model-type llama|qwen2] [--hidden 64 --intermediate 128 --layers 2
             --heads 4 --kv-heads 2 --head-dim 16 --vocab 256 --tie --seed 0]
  score   --model DIR --batches FILE.json --seq-agg mean|abs-mean --norm l2|l1 --out FILE.safetensors
  prune   --model DIR --scores FILE.safetensors --hidden-size N --intermediate-size N --out DIR
  logits  --model DIR --batches FILE.json --out FILE.safetensors

A batches file is a JSON list of batches, each a list of token-id lists of any length; rows are
right-padded (attention_mask 0) to the longest row of their batch.
"""
import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config


def pad_batch(rows):
    """Right-pad token rows; returns ids [B,T] and the real-token mask [B,T]."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    return ids, mask


def load_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def make_model(args):
    torch.manual_seed(args.seed)
    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=args.tie,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )
    if args.model_type == "qwen2":
        config = Qwen2Config(rope_theta=1000000.0, **common)
    else:
        config = LlamaConfig(rope_theta=500000.0, **common)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Norm weights start at 1; make them differ per channel so that they matter for scoring.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(args.out, safe_serialization=True)
    print(json.dumps({"out": args.out, "params": sum(p.numel() for p in model.parameters())}))


def masked_seq_agg(x, mask, seq_agg):
    """Per-sample mean over real tokens of x [B,T,C] (signed, or of |x|) -> [B,C]."""
    x = x.float()
    if seq_agg == "abs-mean":
        x = x.abs()
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1)


def sample_norm(per_sample, norm):
    """Norm over the sample axis of a [N,C] matrix."""
    return per_sample.abs().sum(0) if norm == "l1" else per_sample.pow(2).sum(0).sqrt()


def score(args):
    model = load_model(args.model)
    torch.set_num_threads(args.threads) if args.threads else None
    batches = json.load(open(args.batches))
    layers = model.model.layers
    state = {"mask": None}
    per_layer_hidden = {}  # (layer, point) -> [B,D] of the current batch
    per_layer_inter = {}  # layer -> [B,I] of the current batch
    hidden_rows, inter_rows = [], {i: [] for i in range(len(layers))}

    def norm_hook(key):
        def hook(_module, _inputs, output):
            per_layer_hidden[key] = masked_seq_agg(output, state["mask"], args.seq_agg)

        return hook

    def down_hook(layer):
        def hook(_module, inputs):
            per_layer_inter[layer] = masked_seq_agg(inputs[0], state["mask"], args.seq_agg)

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.input_layernorm.register_forward_hook(norm_hook((i, "attn"))))
        handles.append(layer.post_attention_layernorm.register_forward_hook(norm_hook((i, "mlp"))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))

    tokens = 0
    loss_sum, loss_count = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for rows in batches:
            ids, mask = pad_batch(rows)
            state["mask"] = mask
            logits = model(input_ids=ids, attention_mask=mask).logits
            # Hidden importance per sample: sum over layers of |m(attn norm)| + |m(mlp norm)|.
            h = sum(per_layer_hidden[(i, p)].abs() for i in range(len(layers)) for p in ("attn", "mlp"))
            hidden_rows.append(h)
            for i in range(len(layers)):
                inter_rows[i].append(per_layer_inter[i])
            # Next-token loss over real tokens (both the input and the predicted token real).
            lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            valid = mask[:, 1:].bool()
            loss_sum += nll[valid].double().sum().item()
            loss_count += int(valid.sum())
            tokens += int(mask.sum())
    elapsed = time.perf_counter() - start
    for h in handles:
        h.remove()
    out = {"hidden": sample_norm(torch.cat(hidden_rows), args.norm).contiguous()}
    for i in range(len(layers)):
        out[f"intermediate.{i}"] = sample_norm(torch.cat(inter_rows[i]), args.norm).contiguous()
    save_file(out, args.out)
    print(
        json.dumps(
            {
                "tokens": tokens,
                "seconds": elapsed,
                "tokens_per_second": tokens / elapsed,
                "loss": loss_sum / max(loss_count, 1),
                "loss_tokens": loss_count,
            }
        )
    )


def top_k_sorted(scores, k):
    """Indices of the k largest scores (ties to the lower index), ascending."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def prune(args):
    model = load_model(args.model)
    config = model.config
    scores = load_file(args.scores)
    hidden = torch.tensor(top_k_sorted(scores["hidden"], args.hidden_size))
    inter = [
        torch.tensor(top_k_sorted(scores[f"intermediate.{i}"], args.intermediate_size))
        for i in range(config.num_hidden_layers)
    ]
    sd = model.state_dict()
    new = {}
    for name, w in sd.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = w[:, hidden]
        elif name.endswith("norm.weight"):
            w = w[hidden]
        elif ".self_attn." in name and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            w = w[:, hidden]
        elif name.endswith("o_proj.weight"):
            w = w[hidden, :]
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            layer = int(name.split(".")[2])
            w = w[inter[layer]][:, hidden]
        elif name.endswith("down_proj.weight"):
            layer = int(name.split(".")[2])
            w = w[hidden][:, inter[layer]]
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            pass
        else:
            raise SystemExit(f"prune_ref: unexpected tensor {name}")
        new[name] = w.contiguous().clone()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    new_config = config.__class__.from_dict(config.to_dict())
    new_config.hidden_size = args.hidden_size
    new_config.intermediate_size = args.intermediate_size
    new_config.head_dim = head_dim
    pruned = AutoModelForCausalLM.from_config(new_config, dtype=torch.float32)
    missing, unexpected = pruned.load_state_dict(new, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and new_config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"prune_ref: missing {missing} unexpected {unexpected}")
    if new_config.tie_word_embeddings:
        pruned.tie_weights()
    pruned.save_pretrained(args.out, safe_serialization=True)
    kept = {"hidden": hidden.tolist(), "intermediate": [x.tolist() for x in inter]}
    with open(os.path.join(args.out, "kept.json"), "w") as f:
        json.dump(kept, f)
    print(json.dumps({"out": args.out, "params": sum(p.numel() for p in pruned.parameters())}))


def logits(args):
    model = load_model(args.model)
    batches = json.load(open(args.batches))
    out = {}
    with torch.no_grad():
        for b, rows in enumerate(batches):
            ids, mask = pad_batch(rows)
            out[f"logits.{b}"] = model(input_ids=ids, attention_mask=mask).logits.float().contiguous()
            out[f"mask.{b}"] = mask.contiguous()
    save_file(out, args.out)
    print(json.dumps({"batches": len(batches)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-model")
    p.add_argument("--out", required=True)
    p.add_argument("--model-type", default="llama", choices=["llama", "qwen2"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--tie", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("score")
    p.add_argument("--model", required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--seq-agg", default="mean", choices=["mean", "abs-mean"])
    p.add_argument("--norm", default="l2", choices=["l2", "l1"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    p = sub.add_parser("prune")
    p.add_argument("--model", required=True)
    p.add_argument("--scores", required=True)
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--intermediate-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("logits")
    p.add_argument("--model", required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    {"make-model": make_model, "score": score, "prune": prune, "logits": logits}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
