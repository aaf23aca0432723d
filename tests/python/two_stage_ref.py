"""Reference two-stage (OverFill) greedy generation from Hugging Face transformers for
model/tests/two_stage.rs and pipeline/tests/two_stage_cli.rs.

  make OUT_DIR
      For each case writes, all CPU float32 and deterministic:
        OUT_DIR/<case>/full          a tiny random full model (save_pretrained, safetensors)
        OUT_DIR/<case>/decoder       the full model's weights sliced to a smaller hidden and
                                     intermediate size (same layers, heads, KV heads, head_dim,
                                     rope, vocabulary): it can read the full model's cache
        OUT_DIR/<case>/shallow       a decoder with one layer fewer (cannot read the cache)
        OUT_DIR/<case>/ref.safetensors:
          single.prompt [T] i64, single.tokens [N] i64      one prompt
          batch.prompt.R [T_R] i64, batch.tokens [B, N] i64  prompts of different lengths
          full.single.tokens [N] i64                        the full model alone (plain greedy)
          refresh3.batch.tokens [B, N] i64                  the batch with a refresh every 3
                                                            decoder slots (see refresh_greedy)
          spec.prompt.R [T_R] i64, spec.full.tokens [4, M] i64
                                                            four prompts of different lengths and
                                                            the full model's greedy tokens from
                                                            transformers' generate() (left-padded
                                                            batch, eos ignored): what speculative
                                                            decoding must reproduce
      and OUT_DIR/<case>/batch.jsonl, spec.jsonl: one {"prompt_ids": [...]} per batch row.

  chat-ids TOKENIZER_DIR MESSAGES_JSON
      Prints the token ids (JSON list) of transformers' apply_chat_template(messages,
      chat_template=<the paper's Llama-3 template>, add_generation_prompt=True): what
      `overfill generate --prompt/--messages` must prefill.

  The algorithm is upstream OverFill's, with transformers' own machinery only: the full model
  runs the left-padded prompts with use_cache=True (attention_mask, position_ids =
  cumsum(mask) - 1), the argmax of its last logit is the first token, and the decoder continues
  from the full model's past_key_values, one token per step, attention_mask extended by one
  column and position_ids = each row's prompt length + step. N tokens per row, eos ignored.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tiny_decoder import slice_decoder

NEW_TOKENS = 10
SINGLE_LENGTH = 9
BATCH_LENGTHS = [7, 3, 5]
SPEC_LENGTHS = [6, 2, 11, 4]
SPEC_TOKENS = 24
DECODER_HIDDEN = 32
DECODER_INTERMEDIATE = 48


def cases():
    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        initializer_range=0.2,  # large weights: well separated logits, no argmax near-ties
        bos_token_id=1,
        eos_token_id=2,
    )
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=16)
    return {
        "llama3": (LlamaConfig, LlamaForCausalLM,
                   dict(common, rope_theta=500000.0, rope_scaling=llama3, tie_word_embeddings=False)),
        "qwen2_bias": (Qwen2Config, Qwen2ForCausalLM,
                       dict(common, rope_theta=1000000.0, tie_word_embeddings=True)),
    }


def left_pad(prompts):
    """ids and attention_mask [B, T] of the prompts left-padded with id 0."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate_greedy(model, prompts, new_tokens):
    """[B, new_tokens]: transformers' own greedy generate() over the left-padded batch, eos
    ignored."""
    ids, mask = left_pad(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = out[:, ids.shape[1]:]
    assert tokens.shape == (len(prompts), new_tokens), tokens.shape
    return tokens.contiguous()


@torch.no_grad()
def two_stage_greedy(full, decoder, prompts):
    """[B, NEW_TOKENS] greedy tokens: full model prefill, decoder continues from its cache."""
    b = len(prompts)
    ids, mask = left_pad(prompts)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = full(ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    past = out.past_key_values
    next_id = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    lengths = mask.sum(-1, keepdim=True)  # [B, 1]
    tokens = [next_id]
    for step in range(NEW_TOKENS - 1):
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.int64)], dim=1)
        out = decoder(next_id, attention_mask=mask, position_ids=lengths + step,
                      past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(next_id)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def refresh_greedy(full, decoder, prompts, every):
    """two_stage_greedy with overfill's --refresh-every: once the decoder has written `every`
    cache slots, the cache is cropped back over them (DynamicCache.crop) and the full model runs
    those tokens plus the newest one; its last logit chooses the next token."""
    b = len(prompts)
    ids, mask = left_pad(prompts)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = full(ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
    past = out.past_key_values
    next_id = out.logits[:, -1].argmax(-1, keepdim=True)
    position = mask.sum(-1, keepdim=True)  # [B, 1], next rope position
    tokens = [next_id]
    fed, fed_positions = [], []
    while len(tokens) < NEW_TOKENS:
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.int64)], dim=1)
        if len(fed) >= every:
            past.crop(past.get_seq_length() - len(fed))
            run_ids = torch.cat(fed + [next_id], dim=1)
            run_positions = torch.cat(fed_positions + [position], dim=1)
            out = full(run_ids, attention_mask=mask, position_ids=run_positions,
                       past_key_values=past, use_cache=True)
            fed, fed_positions = [], []
        else:
            out = decoder(next_id, attention_mask=mask, position_ids=position,
                          past_key_values=past, use_cache=True)
            fed.append(next_id)
            fed_positions.append(position)
        past = out.past_key_values
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        position = position + 1
        tokens.append(next_id)
    return torch.cat(tokens, dim=1)


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
        shallow = model_cls(config_cls(**dict(kwargs, num_hidden_layers=1, hidden_size=DECODER_HIDDEN,
                                              intermediate_size=DECODER_INTERMEDIATE))).eval()
        case_dir = out_dir / name
        full.save_pretrained(case_dir / "full", safe_serialization=True)
        decoder.save_pretrained(case_dir / "decoder", safe_serialization=True)
        shallow.save_pretrained(case_dir / "shallow", safe_serialization=True)

        g = torch.Generator().manual_seed(77 + i)
        vocab = kwargs["vocab_size"]
        single = torch.randint(3, vocab, (SINGLE_LENGTH,), generator=g)
        batch = [torch.randint(3, vocab, (n,), generator=g) for n in BATCH_LENGTHS]
        spec = [torch.randint(3, vocab, (n,), generator=g) for n in SPEC_LENGTHS]
        refs = {
            "single.prompt": single.clone(),
            "single.tokens": two_stage_greedy(full, decoder, [single])[0].clone(),
            "batch.tokens": two_stage_greedy(full, decoder, batch).contiguous(),
            "full.single.tokens": two_stage_greedy(full, full, [single])[0].clone(),
            "refresh3.batch.tokens": refresh_greedy(full, decoder, batch, 3).contiguous(),
            "spec.full.tokens": generate_greedy(full, spec, SPEC_TOKENS),
        }
        for row, p in enumerate(spec):
            refs[f"spec.prompt.{row}"] = p.clone()
            # Alone, each prompt continues as in the batch.
            assert torch.equal(generate_greedy(full, [p], SPEC_TOKENS)[0], refs["spec.full.tokens"][row])
        # A refresh never happens within the generation: plain two-stage.
        assert torch.equal(refresh_greedy(full, decoder, batch, NEW_TOKENS), refs["batch.tokens"])
        assert not torch.equal(refs["refresh3.batch.tokens"], refs["batch.tokens"]), name
        for row, p in enumerate(batch):
            refs[f"batch.prompt.{row}"] = p.clone()
        # Each row of the batch alone gives the same tokens (padding is invisible).
        for row, p in enumerate(batch):
            alone = two_stage_greedy(full, decoder, [p])[0]
            assert torch.equal(alone, refs["batch.tokens"][row]), (name, row)
        save_file(refs, str(case_dir / "ref.safetensors"))
        for file_name, prompts in (("batch.jsonl", batch), ("spec.jsonl", spec)):
            with open(case_dir / file_name, "w") as f:
                for p in prompts:
                    f.write(json.dumps({"prompt_ids": p.tolist()}) + "\n")
    print(json.dumps(sorted(cases())))


# The chat template of the paper's training code (Llama 3, BOS from the tokenizer, content trimmed).
PAPER_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def chat_ids(tokenizer_dir, messages_json):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = json.loads(Path(messages_json).read_text())
    ids = tokenizer.apply_chat_template(messages, chat_template=PAPER_LLAMA3_TEMPLATE,
                                        add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    print(json.dumps(list(ids)))


def main():
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "chat-ids":
        chat_ids(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
