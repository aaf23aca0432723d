#!/usr/bin/env bash
# A two-stage pair for the benchmarks that need one but no trained model (bench-serve,
# bench-speculative): a tiny random Llama (configs/models/tiny-llama.json, synth-data's tokenizer)
# in DIR/full and its calibrate-pruned half-width decoder in DIR/pruned, made once.
# Usage: scripts/tiny-two-stage.sh OVERFILL_BINARY DIR
set -euo pipefail
bin="${1:?the overfill binary}"
dir="${2:?the folder}"
PYTHON="${OVERFILL_PYTHON:-.venv/bin/python}"
if [ ! -f "$dir/pruned/config.json" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    "$bin" synth-data --tokenizer-out "$dir/tok"
    "$bin" init-model --config configs/models/tiny-llama.json --out "$dir/full" --seed 0 --tokenizer "$dir/tok"
    "$PYTHON" -c "import json, sys; json.dump([[40 + (i * 7 + r * 13) % 200 for i in range(32)] for r in range(8)], open(sys.argv[1], 'w'))" "$dir/calib.json"
    "$bin" calibrate-prune --model "$dir/full" --data "$dir/calib.json" --out "$dir/pruned" \
        --width-hidden 0.5 --width-intermediate 0.5 --calib-size 8 --batch-size 4 --device cpu
fi
