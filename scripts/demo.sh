#!/usr/bin/env bash
# `just demo`: the whole pipeline, as far as it is built, on a small synthetic default (recipe
# configs/tiny.toml), CPU only, no downloads. Everything lands under work/tiny/.
set -euo pipefail
cd "$(dirname "$0")/.."

overfill() { cargo run --release --quiet -p overfill -- "$@"; }
work=work/tiny
mkdir -p "$work/raw"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 synthetic data and a small byte-level tokenizer"
overfill synth-data --tokenizer-out "$work/tokenizer"
overfill synth-data --format openhermes --rows 2000 --seed 0 --out "$work/raw/openhermes.json"

step "2/5 preprocess: chat template + tokenize into context/target shards"
overfill preprocess --config configs/tiny.toml
overfill inspect "$work/shards" --examples 2

step "3/5 a tiny random full model (Llama architecture)"
if [ ! -f "$work/full/config.json" ]; then
    overfill init-model --config configs/models/tiny-llama.json --out "$work/full" --seed 0
fi
cp "$work/tokenizer/"tokenizer*.json "$work/full/"

step "4/5 calibrate and width-prune (every head and layer kept)"
overfill calibrate-prune --config configs/tiny.toml

step "5/5 generate with the full and the pruned model (random weights: the text is noise; the point is that both load and decode)"
overfill generate --model "$work/full" --prompt "Hello" --max-new-tokens 8 --json
overfill generate --model "$work/pruned" --prompt "Hello" --max-new-tokens 8 --json
echo
echo "demo: done (outputs under $work/)"
