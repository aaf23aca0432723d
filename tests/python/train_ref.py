"""Reference training losses and gradients from Hugging Face transformers for
model/tests/train_parity.rs.

  make OUT_DIR
      For each case writes, all CPU float32 and deterministic:
        OUT_DIR/<case>/full      a tiny random full model (save_pretrained, safetensors)
        OUT_DIR/<case>/decoder   a narrower decoder: the full model's weights sliced to a smaller
                                 hidden and intermediate size (same layers, heads, KV heads,
                                 head_dim, rope, vocabulary), so it can read the full model's cache
        OUT_DIR/<case>/ref.safetensors  for each batch NAME in BATCHES:
          NAME.context.R, NAME.target.R   the rows (context ids; target ids y0..yN) [len] i64
          NAME.expect.FIELD               the padded batch as the spec defines it (context_ids,
                                          context_mask, context_positions, target_inputs,
                                          target_mask, target_positions, labels)
          NAME.tokens                     [1] i64, predicted tokens (y1..yN of every row)
          NAME.past_k.L, NAME.past_v.L    the full model's past_key_values of the context,
                                          [B, KV, Tc, hd] (valid at real context slots)
          NAME.MODE.loss_sum              [1] f32, MODE in (overfill, single)
          NAME.MODE.grad.PARAM            gradient of loss_sum w.r.t. each decoder parameter

  The references use transformers' own machinery only: OverFill = full model with use_cache=True
  over the left-padded contexts -> past_key_values -> decoder forward over the right-padded
  targets y0..yN with those past_key_values, attention_mask = cat(context mask, target mask),
  position_ids = |x| + j and `labels` = the targets (transformers shifts them: y1..yN are scored).
  single (the Pruned/SFT baselines) = decoder over cat(context, target) with labels on the
  target only (y0 ignored). The loss is transformers' loss with num_items_in_batch = the token
  count, times that count (a sum); it is cross-checked against an explicit cross-entropy here.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tiny_decoder import slice_decoder

IGNORE_INDEX = -100

# (context lengths, target lengths incl. y0) per row.
BATCHES = {
    # Different context and target lengths: left padding and right padding both present.
    "ragged": ([7, 3, 5], [5, 2, 7]),
    # A one-token target (only y0: predicts nothing) beside a normal row.
    "one_token": ([4, 6], [1, 4]),
}


def cases():
    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
    )
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=16)
    return {
        "llama3_untied": (LlamaConfig, LlamaForCausalLM,
                          dict(common, rope_theta=500000.0, rope_scaling=llama3, tie_word_embeddings=False)),
        "llama_tied": (LlamaConfig, LlamaForCausalLM,
                       dict(common, rope_theta=10000.0, tie_word_embeddings=True)),
        "qwen2_bias": (Qwen2Config, Qwen2ForCausalLM,
                       dict(common, rope_theta=1000000.0, tie_word_embeddings=False)),
    }


DECODER_HIDDEN = 40
DECODER_INTERMEDIATE = 56


def make_rows(config, lengths, g):
    rows = []
    for ctx_len, tgt_len in zip(*lengths):
        context = torch.randint(3, config.vocab_size, (ctx_len,), generator=g)
        target = torch.randint(3, config.vocab_size, (tgt_len,), generator=g)
        rows.append((context, target))
    return rows


def pad_rows(rows):
    """The padded layout transformers is given: left-padded contexts, right-padded full targets
    y0..yN (N+1 columns), and the spec's TrainBatch fields."""
    b = len(rows)
    tc = max(len(c) for c, _ in rows)
    tn = max(len(t) for _, t in rows)
    ctx_ids = torch.zeros(b, tc, dtype=torch.int64)
    ctx_mask = torch.zeros(b, tc, dtype=torch.int64)
    tgt_ids = torch.zeros(b, tn, dtype=torch.int64)
    tgt_mask = torch.zeros(b, tn, dtype=torch.int64)
    for r, (c, t) in enumerate(rows):
        ctx_ids[r, tc - len(c):] = c
        ctx_mask[r, tc - len(c):] = 1
        tgt_ids[r, :len(t)] = t
        tgt_mask[r, :len(t)] = 1
    ctx_pos = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    ctx_len = ctx_mask.sum(-1, keepdim=True)
    tgt_pos = ctx_len + torch.arange(tn)
    # Spec layout: N = max(len(y) - 1, 1) columns of inputs y0..y(N-1) and labels y1..yN.
    n = max(tn - 1, 1)
    expect = {
        "context_ids": ctx_ids, "context_mask": ctx_mask, "context_positions": ctx_pos,
        "target_inputs": torch.zeros(b, n, dtype=torch.int64),
        "target_mask": torch.zeros(b, n, dtype=torch.int64),
        "target_positions": ctx_len + torch.arange(n),
        "labels": torch.full((b, n), IGNORE_INDEX, dtype=torch.int64),
    }
    for r, (_, t) in enumerate(rows):
        k = len(t) - 1
        expect["target_inputs"][r, :k] = t[:k]
        expect["target_mask"][r, :k] = 1
        expect["labels"][r, :k] = t[1:]
    return ctx_ids, ctx_mask, ctx_pos, tgt_ids, tgt_mask, tgt_pos, expect


def explicit_loss_sum(logits, labels):
    """Sum of cross-entropies of logits[:, j] against labels[:, j + 1] (transformers' shift)."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, v), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def loss_and_grads(decoder, tokens, prefix, refs, **forward):
    decoder.zero_grad(set_to_none=True)
    out = decoder(**forward, num_items_in_batch=torch.tensor(tokens))
    loss_sum = out.loss * tokens
    check = explicit_loss_sum(out.logits, forward["labels"])
    assert torch.allclose(loss_sum, check, rtol=1e-5, atol=1e-5), (prefix, float(loss_sum), float(check))
    loss_sum.backward()
    refs[f"{prefix}.loss_sum"] = loss_sum.detach().reshape(1).float()
    for name, p in decoder.named_parameters():
        refs[f"{prefix}.grad.{name}"] = p.grad.detach().clone().contiguous()


def make(out_dir: Path):
    for i, (name, (config_cls, model_cls, kwargs)) in enumerate(cases().items()):
        torch.manual_seed(4321 + i)
        full = model_cls(config_cls(**kwargs)).eval()
        if name.startswith("qwen2"):
            # transformers initialises biases to zero; make them matter.
            with torch.no_grad():
                for layer in full.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0.0, 0.5)
        decoder = slice_decoder(full, config_cls, model_cls, kwargs, DECODER_HIDDEN, DECODER_INTERMEDIATE)
        case_dir = out_dir / name
        full.save_pretrained(case_dir / "full", safe_serialization=True)
        decoder.save_pretrained(case_dir / "decoder", safe_serialization=True)

        refs = {}
        g = torch.Generator().manual_seed(77 + i)
        for batch, lengths in BATCHES.items():
            rows = make_rows(full.config, lengths, g)
            for r, (c, t) in enumerate(rows):
                refs[f"{batch}.context.{r}"] = c
                refs[f"{batch}.target.{r}"] = t
            ctx_ids, ctx_mask, ctx_pos, tgt_ids, tgt_mask, tgt_pos, expect = pad_rows(rows)
            for field, value in expect.items():
                refs[f"{batch}.expect.{field}"] = value
            tokens = sum(len(t) - 1 for _, t in rows)
            refs[f"{batch}.tokens"] = torch.tensor([tokens], dtype=torch.int64)
            # The target as transformers' labels: padding ignored, y0 never scored.
            tgt_labels = tgt_ids.masked_fill(tgt_mask == 0, IGNORE_INDEX)
            tgt_labels[:, 0] = IGNORE_INDEX

            # OverFill: frozen full-model prefill, decoder over the target with its cache.
            with torch.no_grad():
                past = full(ctx_ids, attention_mask=ctx_mask, position_ids=ctx_pos,
                            use_cache=True).past_key_values
            for layer in range(full.config.num_hidden_layers):
                k, v = past.layers[layer].keys, past.layers[layer].values
                refs[f"{batch}.past_k.{layer}"] = k.clone().contiguous()
                refs[f"{batch}.past_v.{layer}"] = v.clone().contiguous()
            loss_and_grads(decoder, tokens, f"{batch}.overfill", refs,
                           input_ids=tgt_ids, attention_mask=torch.cat([ctx_mask, tgt_mask], 1),
                           position_ids=tgt_pos, past_key_values=past, labels=tgt_labels,
                           use_cache=True)

            # single: one model over context ‖ target, labels on the target only.
            loss_and_grads(decoder, tokens, f"{batch}.single", refs,
                           input_ids=torch.cat([ctx_ids, tgt_ids], 1),
                           attention_mask=torch.cat([ctx_mask, tgt_mask], 1),
                           position_ids=torch.cat([ctx_pos, tgt_pos], 1),
                           labels=torch.cat([torch.full_like(ctx_ids, IGNORE_INDEX), tgt_labels], 1))
        save_file(refs, str(case_dir / "ref.safetensors"))
    print(json.dumps(sorted(cases())))


def main():
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
