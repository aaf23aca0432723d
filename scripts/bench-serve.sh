#!/usr/bin/env bash
# `just bench-serve`: `overfill serve` throughput (generated tokens/s) and p50/p99 latency at 1, 8
# and 32 concurrent clients, continuous batching against the same model served one request at a
# time, on loopback. By default a tiny random Llama and its pruned decoder (two-stage), made once
# under target/bench-serve; MODEL=DIR [DECODER=DIR] serve your own. Extra arguments go to
# tests/python/bench_serve.py (e.g. --max-tokens 32 --concurrency 1,8,32,64 --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${OVERFILL_PYTHON:-.venv/bin/python}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/release/overfill"
cargo build --release -p overfill
if [ -z "${MODEL:-}" ]; then
    bash scripts/tiny-two-stage.sh "$BIN" "$TARGET/bench-serve"
    MODEL="$TARGET/bench-serve/full"
    DECODER="$TARGET/bench-serve/pruned"
fi
exec "$PYTHON" tests/python/bench_serve.py --binary "$BIN" --model "$MODEL" ${DECODER:+--decoder "$DECODER"} "$@"
