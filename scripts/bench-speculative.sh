#!/usr/bin/env bash
# `just bench-speculative`: lossless two-stage decoding (`overfill generate --speculative K`) against
# the full model alone in one run, batch 1, 128 new tokens per prompt: acceptance rate, drafts kept
# per verification, decode time over the full model's, and whether every output is the full model's
# token for token (tests/python/bench_speculative.py). Give your pair with MODEL=DIR DECODER=DIR
# PROMPTS=JSONL (what `generate --input` reads, e.g. the demo's heldout.jsonl) and optionally
# PRUNED=DIR (the untrained pruned checkpoint, as a second drafter). Without MODEL: a tiny random
# Llama and its calibrate-pruned decoder (scripts/tiny-two-stage.sh) under target/bench-speculative
# (random weights: the acceptance rate means nothing, this only shows the benchmark runs). Extra
# arguments go to the Python script (e.g. --draft-lens 2,4 --limit 5 -- --template chatml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${OVERFILL_PYTHON:-.venv/bin/python}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/release/overfill"
cargo build --release -p overfill
if [ -z "${MODEL:-}" ]; then
    dir="$TARGET/bench-speculative"
    bash scripts/tiny-two-stage.sh "$BIN" "$dir"
    "$PYTHON" -c "
import json, sys
with open(sys.argv[1], 'w') as f:
    for r in range(4):
        f.write(json.dumps({'prompt_ids': [3 + (i * 11 + r * 17) % 200 for i in range(16 + 4 * r)]}) + '\n')" "$dir/prompts.jsonl"
    MODEL="$dir/full"
    DECODER="$dir/pruned"
    PROMPTS="$dir/prompts.jsonl"
fi
exec "$PYTHON" tests/python/bench_speculative.py --binary "$BIN" --model "$MODEL" --decoder "$DECODER" \
    ${PRUNED:+--pruned "$PRUNED"} --prompts "${PROMPTS:?PROMPTS=JSONL of prompts}" "$@"
