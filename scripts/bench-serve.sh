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
    dir="$TARGET/bench-serve"
    if [ ! -f "$dir/pruned/config.json" ]; then
        rm -rf "$dir" && mkdir -p "$dir"
        "$BIN" synth-data --tokenizer-out "$dir/tok"
        "$BIN" init-model --config configs/models/tiny-llama.json --out "$dir/full" --seed 0 --tokenizer "$dir/tok"
        "$PYTHON" -c "import json, sys; json.dump([[40 + (i * 7 + r * 13) % 200 for i in range(32)] for r in range(8)], open(sys.argv[1], 'w'))" "$dir/calib.json"
        "$BIN" calibrate-prune --model "$dir/full" --data "$dir/calib.json" --out "$dir/pruned" \
            --width-hidden 0.5 --width-intermediate 0.5 --calib-size 8 --batch-size 4 --device cpu
    fi
    MODEL="$dir/full"
    DECODER="$dir/pruned"
fi
exec "$PYTHON" tests/python/bench_serve.py --binary "$BIN" --model "$MODEL" ${DECODER:+--decoder "$DECODER"} "$@"
