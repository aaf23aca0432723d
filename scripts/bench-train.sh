#!/usr/bin/env bash
# `just bench-train`: OverFill training throughput (target tokens/s, the full model's prefill
# included) of `overfill bench-train` against the same loop on transformers, same CPU, rows,
# shapes and threads; peak memory of both. Extra arguments go to tests/python/bench_train.py
# (e.g. --threads 2 --steps 5 --context-len 256 --target-len 256 --mode pruned).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${OVERFILL_PYTHON:-.venv/bin/python}"
cargo build --release -p overfill
TARGET="${CARGO_TARGET_DIR:-target}"
exec "$PYTHON" tests/python/bench_train.py --overfill "$TARGET/release/overfill" "$@"
