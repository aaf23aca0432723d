"""Reference outputs from Hugging Face transformers for the overfill-model tests.

Subcommands (all CPU, float32, deterministic):

  make OUT_DIR
      Creates tiny random checkpoints WITH transformers (save_pretrained, safetensors) in
      OUT_DIR/<case>/model and writes OUT_DIR/<case>/ref.safetensors holding:
        prompt_ids [T] i64, prompt_logits [T, V],
        greedy_ids [8] i64 and step_logits [8, V] (8 greedy decode steps through HF's
        past_key_values, logits of each step),
        batch_ids [B, Tmax] i64 (left-padded), batch_mask [B, Tmax], batch_logits [B, Tmax, V].
      Cases: llama3_tied (llama3 rope scaling, tied embeddings, GQA), llama_untied (GQA),
      qwen2_bias (qkv bias, GQA), llama_head_dim (explicit head_dim != hidden / heads),
      qwen2_head_dim (same for qwen2).

  logits IDS OUT_FILE MODEL_DIR...
      Loads each MODEL_DIR with transformers and writes the logits [T, V] of the comma-separated
      IDS to OUT_FILE (safetensors key "logits_<i>" for the i-th directory).

  text-ref MODEL_DIR TEXT MAX_NEW_TOKENS OUT_FILE
      Tokenizes TEXT with MODEL_DIR/tokenizer.json (Python tokenizers, special tokens added),
      runs transformers on it and writes prompt_ids [T], logits [T, V] and greedy_ids
      (model.generate, do_sample=False, up to MAX_NEW_TOKENS new tokens) to OUT_FILE.

  param-count CONFIG.json...
      Prints one JSON object {path: parameter count} built on the meta device from each config.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

DECODE_STEPS = 8


def cases():
    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        initializer_range=0.2,  # large weights so that errors are visible in the logits
        bos_token_id=1,
        eos_token_id=2,
    )
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=16)
    return {
        "llama3_tied": (LlamaConfig, LlamaForCausalLM,
                        dict(common, rope_theta=500000.0, rope_scaling=llama3, tie_word_embeddings=True)),
        "llama_untied": (LlamaConfig, LlamaForCausalLM,
                         dict(common, rope_theta=10000.0, tie_word_embeddings=False)),
        "qwen2_bias": (Qwen2Config, Qwen2ForCausalLM,
                       dict(common, rope_theta=1000000.0, tie_word_embeddings=False)),
        "llama_head_dim": (LlamaConfig, LlamaForCausalLM,
                           dict(common, head_dim=24, rope_scaling=llama3, tie_word_embeddings=True)),
        "qwen2_head_dim": (Qwen2Config, Qwen2ForCausalLM,
                           dict(common, head_dim=24, tie_word_embeddings=True)),
    }


def make(out_dir: Path):
    for i, (name, (config_cls, model_cls, kwargs)) in enumerate(cases().items()):
        torch.manual_seed(1234 + i)
        config = config_cls(**kwargs)
        model = model_cls(config).eval()
        if name.startswith("qwen2"):
            # transformers initialises biases to zero; make them matter.
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0.0, 0.5)
        if "head_dim" in kwargs:
            assert model.model.layers[0].self_attn.q_proj.weight.shape[0] == 4 * kwargs["head_dim"]
        case_dir = out_dir / name
        model.save_pretrained(case_dir / "model", safe_serialization=True)
        refs = {}
        g = torch.Generator().manual_seed(99 + i)
        prompt = torch.randint(3, config.vocab_size, (1, 11), generator=g)
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            refs["prompt_ids"] = prompt[0].clone()
            refs["prompt_logits"] = out.logits[0].float().contiguous()
            past = out.past_key_values
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, step_logits = [], []
            for _ in range(DECODE_STEPS):
                ids.append(int(next_id))
                out = model(next_id, past_key_values=past, use_cache=True)
                past = out.past_key_values
                step_logits.append(out.logits[0, -1].float())
                next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            refs["greedy_ids"] = torch.tensor(ids, dtype=torch.int64)
            refs["step_logits"] = torch.stack(step_logits).contiguous()

            lengths = [7, 3, 5]
            width = max(lengths)
            batch_ids = torch.zeros(len(lengths), width, dtype=torch.int64)
            batch_mask = torch.zeros(len(lengths), width, dtype=torch.int64)
            for row, n in enumerate(lengths):
                batch_ids[row, width - n:] = torch.randint(3, config.vocab_size, (n,), generator=g)
                batch_mask[row, width - n:] = 1
            position_ids = (batch_mask.cumsum(-1) - 1).clamp(min=0)
            batch_out = model(batch_ids, attention_mask=batch_mask, position_ids=position_ids)
            refs["batch_ids"] = batch_ids
            refs["batch_mask"] = batch_mask
            refs["batch_logits"] = batch_out.logits.float().contiguous()
        save_file(refs, str(case_dir / "ref.safetensors"))
    print(json.dumps(sorted(cases())))


def logits(ids: str, out_file: str, model_dirs):
    prompt = torch.tensor([[int(x) for x in ids.split(",")]], dtype=torch.int64)
    out = {}
    for i, model_dir in enumerate(model_dirs):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            out[f"logits_{i}"] = model(prompt).logits[0].float().contiguous()
    save_file(out, out_file)


def text_ref(model_dir: str, text: str, max_new_tokens: str, out_file: str):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(text).ids], dtype=torch.int64)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[0].float().contiguous()
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=int(max_new_tokens), pad_token_id=0)
    save_file({"prompt_ids": ids[0].clone(), "logits": logits,
               "greedy_ids": generated[0, ids.shape[1]:].clone()}, out_file)


def param_count(paths):
    counts = {}
    for path in paths:
        raw = json.loads(Path(path).read_text())
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        # parameters() yields a tied lm_head once.
        counts[path] = sum(p.numel() for p in model.parameters())
    print(json.dumps(counts))


def main():
    torch.set_num_threads(1)
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "make" and len(sys.argv) == 3:
        make(Path(sys.argv[2]))
    elif cmd == "logits" and len(sys.argv) >= 5:
        logits(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif cmd == "text-ref" and len(sys.argv) == 6:
        text_ref(*sys.argv[2:6])
    elif cmd == "param-count" and len(sys.argv) >= 3:
        param_count(sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
