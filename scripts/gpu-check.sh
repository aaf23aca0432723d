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

echo "== data parallel: a world-size-1 NCCL process group (torchrun environment by hand), 2 training steps on CUDA"
# The NCCL path of the c10d shim is compiled only when the build found the NCCL/CUDA header wheels
# (cuda-toolkit[crt,cccl]); a build without them says "built without NCCL" here.
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29571 \
    "$bin" train --full "$work/full" --decoder "$work/pruned" --data "$work/shards" --out "$work/run-nccl" \
    --device cuda --dtype bf16 --batch-size 2 --grad-accum 1 --max-steps 2 --save-steps 0 --eval-steps 0 \
    && echo "nccl world-size-1 training: ok" || echo "nccl world-size-1 training: FAILED"

echo "== bench-latency: the paper's Figures 3-5 for the real 3B->1B and 8B->3B shapes (Table 8: D'/I' 1689/4505 and 2334/8171)"
# Random weights made on the device, bf16 (the configs are the released ones' architecture facts,
# written here so the check needs no fixture folder). Sized to ~6 minutes on an H200 with
# --runs 3 --warmup 1; OVERFILL_BENCH_FLAGS overrides (e.g. "--runs 10 --warmup 2" for the
# paper's protocol), OVERFILL_BENCH_DEVICE=cpu and OVERFILL_BENCH_ONLY=3b-1b check the script's
# path without a GPU. Results: $out/bench-latency-<shape>/ (latency.csv, summary.json, PNGs).
cat > "$work/llama-3.2-3b.json" <<'JSON'
{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 3072,
 "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
 "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
 "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
 "max_position_embeddings": 131072, "tie_word_embeddings": true, "attention_bias": false, "mlp_bias": false,
 "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
JSON
cat > "$work/llama-3.1-8b.json" <<'JSON'
{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
 "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
 "max_position_embeddings": 131072, "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
 "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
JSON
echo "== training step for the real 3B->1B shapes (random weights, bf16, batch 4 x (1024 context + 1024 target)): tokens/s, MFU, memory"
# MFU counts the full model's forward over the contexts and the decoder's forward and backward over
# the targets (2 FLOPs per multiply-add, attention included, causal); 989 TFLOP/s = H100/H200 dense
# bf16 peak. Goal: >= 40%. OVERFILL_TRAIN_DEVICE=cpu checks the path without a GPU (slow: use
# OVERFILL_TRAIN_FLAGS="--batch 1 --context-len 64 --target-len 64 --steps 1 --warmup 0").
# With and without activation recomputation: each configuration's "measured_tensor_peak_mib" (the
# CUDA caching allocator's max_memory_allocated) beside the planner's "planned_peak_mib" is the GPU
# check of the memory planner (`train --dry-run`).
# shellcheck disable=SC2086
"$bin" bench-train --full-config "$work/llama-3.2-3b.json" --hidden-size 1689 --intermediate-size 4505 \
    --device "${OVERFILL_TRAIN_DEVICE:-cuda:0}" --dtype bf16 --batch 4 --context-len 1024 --target-len 1024 \
    --warmup 2 --steps 5 --peak-tflops 989 --activation-checkpointing --json ${OVERFILL_TRAIN_FLAGS:-} > "$out/train-step-3b-1b.json" \
    && cat "$out/train-step-3b-1b.json" || echo "bench-train 3b-1b: FAILED"

bench_device="${OVERFILL_BENCH_DEVICE:-cuda:0}"
for shape in "3b-1b llama-3.2-3b 1689 4505" "8b-3b llama-3.1-8b 2334 8171"; do
    read -r name config hidden intermediate <<< "$shape"
    if [ -n "${OVERFILL_BENCH_ONLY:-}" ] && [ "$OVERFILL_BENCH_ONLY" != "$name" ]; then continue; fi
    # shellcheck disable=SC2086  # OVERFILL_BENCH_FLAGS is a list of flags
    "$bin" bench-latency --model-config "$work/$config.json" --hidden-size "$hidden" --intermediate-size "$intermediate" \
        --device "$bench_device" --gen-lengths 64,128,256,512 --prompt-lengths 128,512,1024,2048 --batch-sizes 1,4,8,16 \
        --warmup 1 --runs 3 ${OVERFILL_BENCH_FLAGS:-} --out "$out/bench-latency-$name" \
        || echo "bench-latency $name: FAILED (exit $?)"
done
echo "gpu-check: done"
