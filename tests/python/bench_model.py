"""`just bench-model`: prefill and per-token decode time of overfill's transformer against
Hugging Face transformers on the same random checkpoint (CPU, same torch threads, same dtype).

usage: bench_model.py --rust-bench PATH [--dir DIR] [--threads N] [--dtype f32|bf16]
                      [--prompt-len N] [--decode-steps N] [--repeats N]

Creates (once) a Llama checkpoint of 8 layers, hidden 512 with transformers in DIR, times
transformers with attn_implementation "eager" and "sdpa" (its default), runs the Rust bench binary
(model/examples/bench_model.rs) on the same checkpoint, and prints the ratios ours / theirs
(below 1.0 = overfill is faster).
"""
import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

BENCH_CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    max_position_embeddings=131072,
    tie_word_embeddings=True,
)

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def make_checkpoint(dir_: Path):
    if (dir_ / "config.json").is_file():
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BENCH_CONFIG))
    model.save_pretrained(dir_, safe_serialization=True)


def time_transformers(dir_: Path, attn: str, dtype, prompt_len: int, decode_steps: int, repeats: int):
    model = AutoModelForCausalLM.from_pretrained(dir_, dtype=dtype, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (1, prompt_len), generator=g)
    prefill, decode = [], []
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # one warm-up round
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            int(next_id)
            prefill_s = time.perf_counter() - start
            past = out.past_key_values
            mask = torch.ones(1, prompt_len, dtype=torch.int64)
            start = time.perf_counter()
            for _ in range(decode_steps):
                mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64)], 1)
                out = model(next_id, past_key_values=past, attention_mask=mask, use_cache=True)
                past = out.past_key_values
                next_id = out.logits[:, -1].argmax(-1, keepdim=True)
                int(next_id)
            decode_s = (time.perf_counter() - start) / decode_steps
            if round_ > 0:
                prefill.append(prefill_s)
                decode.append(decode_s)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return {"impl": f"transformers-{attn}", "prefill_seconds": med(prefill), "decode_seconds_per_token": med(decode)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rust-bench", required=True)
    p.add_argument("--dir", default="target/bench-model/llama-8x512")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dir_ = Path(a.dir)
    make_checkpoint(dir_)
    results = [time_transformers(dir_, attn, DTYPES[a.dtype], a.prompt_len, a.decode_steps, a.repeats)
               for attn in ("eager", "sdpa")]
    rust = subprocess.run(
        [a.rust_bench, str(dir_), "--prompt-len", str(a.prompt_len), "--decode-steps", str(a.decode_steps),
         "--repeats", str(a.repeats), "--threads", str(a.threads), "--dtype", a.dtype],
        check=True, capture_output=True, text=True)
    ours = json.loads(rust.stdout.strip().splitlines()[-1])
    print(f"model: 8 layers, hidden 512, {a.dtype}, CPU, {a.threads} threads; prompt {a.prompt_len} tokens, "
          f"{a.decode_steps} decode steps, median of {a.repeats}")
    print(f"{'implementation':<24}{'prefill ms':>12}{'decode ms/token':>18}")
    for r in [ours] + results:
        print(f"{r['impl']:<24}{r['prefill_seconds'] * 1e3:>12.2f}{r['decode_seconds_per_token'] * 1e3:>18.2f}")
    for r in results:
        print(f"ratio overfill / {r['impl']}: prefill {ours['prefill_seconds'] / r['prefill_seconds']:.2f}x, "
              f"decode {ours['decode_seconds_per_token'] / r['decode_seconds_per_token']:.2f}x")


if __name__ == "__main__":
    main()
