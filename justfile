# overfill — one command per stage. Every recipe runs the idempotent set-up first.
# `just demo` runs the whole pipeline on a small embedded default; `just test` is what CI runs.

set shell := ["bash", "-euo", "pipefail", "-c"]

# The overfill binary, built in release mode (also honours CARGO_TARGET_DIR).
overfill := "cargo run --release --quiet -p overfill --"

default:
    @just --list

# Create/refresh .venv (torch 2.11.0 = libtorch, reference packages, just). Fast when done.
setup:
    @bash scripts/setup.sh

# Build the release binary (target/release/overfill).
build: setup
    cargo build --release -p overfill

# Everything CI checks.
test: setup
    cargo test --release --workspace

# The paper's Table 2 on a real model, on a CPU: SmolLM2-135M-Instruct pruned at P = 0.5, OverFill vs
# Pruned decoders over seeds 0,1,2 on WordNet's definitions, results.md + curves in work/demo/
# (--seeds LIST; --quick: the from-scratch toy CI checks, in work/demo-quick/; --toy: the full toy).
demo *flags: build
    bash scripts/demo.sh {{flags}}

# Chat-template and tokenize a recipe's sources into context/target shards.
preprocess recipe="8b-3b": build
    {{overfill}} preprocess --config configs/{{recipe}}.toml

# Calibrate on a recipe's shards and width-prune its model (keeps every head and layer).
calibrate-prune recipe="8b-3b": build
    {{overfill}} calibrate-prune --config configs/{{recipe}}.toml

# Train the pruned 3.19B decoder of Llama-3.1-8B-Instruct with the frozen full model prefilling (the paper's 8B→3B).
train-8b3b *flags: build
    {{overfill}} train --config configs/8b-3b.toml {{flags}}

# Train the pruned 1B decoder of Llama-3.2-3B-Instruct with the frozen full model prefilling (the paper's 3B→1B).
train-3b1b *flags: build
    {{overfill}} train --config configs/3b-1b.toml {{flags}}

# The full model's greedy answers to a recipe's prompts ([distill] out): training data for a drafter of
# generate --speculative (then preprocess them with --input 'OUT/part-*.jsonl' and train on them).
distill recipe="8b-3b" *flags: build
    {{overfill}} distill --config configs/{{recipe}}.toml {{flags}}

# After `just demo`: drafters for generate --speculative trained on the references vs on the full model's own
# answers (overfill distill), over seeds; acceptance rates in work/demo/drafter.md.
drafter *flags: build
    bash scripts/drafter.sh {{flags}}

# OverFill training of the tiny demo models on CPU (after `just demo` has made them).
train-tiny *flags: build
    {{overfill}} train --config configs/tiny.toml {{flags}}

# TensorBoard on the run folders under work/ (http://127.0.0.1:6006).
tensorboard: setup
    .venv/bin/tensorboard --logdir work --host 127.0.0.1

# Prefill and per-token decode time against transformers (ratios).
bench-model: build
    bash scripts/bench-model.sh

# Preprocess throughput against HF datasets + apply_chat_template and bare tokenizers (ratios).
bench-preprocess: build
    bash scripts/bench-preprocess.sh

# Calibration throughput against the Python reference (ratio) and memory in calib_size.
bench-calibrate: build
    bash scripts/bench-calibrate.sh

# Training throughput (target tokens/s incl. the full model's prefill) and peak memory vs a transformers loop (ratio).
bench-train *flags: build
    bash scripts/bench-train.sh {{flags}}

# overfill serve: tokens/s and p50/p99 latency at 1, 8 and 32 clients, continuous batching vs one request at a time (speed-up).
bench-serve *flags: build
    bash scripts/bench-serve.sh {{flags}}

# Lossless two-stage decoding (generate --speculative K) vs the full model alone: acceptance rate, decode-time ratio,
# identical output. MODEL=DIR DECODER=DIR PROMPTS=JSONL [PRUNED=DIR] for a real pair; else a tiny random pair.
bench-speculative *flags: build
    bash scripts/bench-speculative.sh {{flags}}

# All-reduce throughput of overfill's c10d shim vs torch.distributed (Gloo, 2 processes, 1..256 MiB).
bench-ddp *flags: setup
    bash scripts/bench-ddp.sh {{flags}}

# The paper's latency study (Figures 3-5) at CPU size: full vs half-width pruned vs OverFill (full prefill,
# pruned decode) on random weights of configs/models/bench-cpu.json; CSV, PNGs and summary under
# docs/bench-latency/ (a few minutes). Flags override, e.g. `just bench-latency --runs 10 --warmup 2`.
bench-latency *flags: build
    {{overfill}} bench-latency --model-config configs/models/bench-cpu.json --hidden-size 256 --intermediate-size 704 \
        --gen-lengths 32,64,128 --prompt-lengths 64,128,256 --batch-sizes 1,2,4 --warmup 1 --runs 3 --threads 1 \
        --out docs/bench-latency {{flags}}
