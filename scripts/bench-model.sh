#!/usr/bin/env bash
# `just bench-model`: overfill's transformer vs transformers (prefill and per-token decode, CPU).
# Extra arguments go to tests/python/bench_model.py (e.g. --threads 2 --dtype bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${OVERFILL_PYTHON:-.venv/bin/python}"
cargo build --release -p overfill-model --example bench_model
TARGET="${CARGO_TARGET_DIR:-target}"
exec "$PYTHON" tests/python/bench_model.py --rust-bench "$TARGET/release/examples/bench_model" --dir "$TARGET/bench-model/llama-8x512" "$@"
