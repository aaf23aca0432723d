#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see DEVELOPERS.md, "GPU"): build here with `just build`,
# then call the device tool with `carry: ["target/release/overfill"]` and the command
# `bash scripts/gpu-check.sh`. It uses that machine's torch (/opt/torch/.venv, torch 2.11.0+cu130)
# through LD_LIBRARY_PATH, runs the CUDA checks, and writes everything to $OUT.
# Not run in CI (no GPU there). NOT YET RUN ON A GPU: the session that wrote it had no device.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/overfill-gpu-check}"
mkdir -p "$out"
bin="${OVERFILL_BIN:-target/release/overfill}"
torch_lib=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n1)
export LD_LIBRARY_PATH="${torch_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python=/opt/torch/.venv/bin/python
log="$out/gpu-check.log"
exec > >(tee "$log") 2>&1
echo "torch lib: $torch_lib"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
work=$(mktemp -d)

echo "== tiny model: CUDA f32 prompt logits against CPU f32"
"$bin" init-model --config configs/models/tiny-llama.json --out "$work/full" --seed 0
ids=1,5,9,42,7,300,12,99
"$bin" generate --model "$work/full" --prompt-ids $ids --max-new-tokens 16 --device cpu --json --logits "$work/cpu.safetensors" > "$out/cpu.json"
"$bin" generate --model "$work/full" --prompt-ids $ids --max-new-tokens 16 --device cuda:0 --json --logits "$work/cuda.safetensors" > "$out/cuda.json"
"$bin" generate --model "$work/full" --prompt-ids $ids --max-new-tokens 16 --device cuda:0 --dtype bf16 --json > "$out/cuda-bf16.json"
"$python" - "$work" <<'PY'
import sys, json
from safetensors.numpy import load_file
w = sys.argv[1]
a, b = load_file(f"{w}/cpu.safetensors")["logits"], load_file(f"{w}/cuda.safetensors")["logits"]
print("max |cpu - cuda| prompt logits (f32):", float(abs(a - b).max()))
PY
echo "cpu  tokens: $(cat "$out/cpu.json")"
echo "cuda tokens: $(cat "$out/cuda.json")"

echo "== calibrate-prune on CUDA (bf16) from synthetic shards"
"$bin" synth-data --tokenizer-out "$work/tok"
"$bin" synth-data --format openhermes --rows 400 --seed 0 --out "$work/raw.json"
"$bin" preprocess --input "$work/raw.json" --tokenizer "$work/tok" --out "$work/shards" --val-size 10
"$bin" calibrate-prune --model "$work/full" --data "$work/shards" --width-hidden 0.5 --width-intermediate 0.5 \
    --calib-size 64 --batch-size 16 --max-seq-len 128 --device cuda:0 --dtype bf16 --out "$work/pruned" --json > "$out/prune-cuda.json"
cat "$out/prune-cuda.json"
echo "gpu-check: done"
