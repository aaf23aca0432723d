#!/usr/bin/env bash
# `just demo --quick` (what CI runs) and `just demo --toy`: the from-scratch toy version of the demo
# (scripts/demo.sh runs the real one, on SmolLM2-135M-Instruct): the paper's claim at toy scale, end
# to end, on a CPU, with no download.
#
#   1. data: instruction tasks whose answers depend on the prompt (key-value lookup among
#      distractors, addition, list reversal, span copy, recall of memorised facts) as OpenHermes
#      JSON and Infinity Parquet
#      (with German rows the language filter drops), held-out prompts with answers, and a BPE
#      tokenizer with the Llama 3 special tokens trained on them
#   2. a small "full" model trained from scratch (init-model, train --mode sft; configs/demo-toy-full.toml)
#   3. preprocess, calibrate-prune at P = 0.5 (configs/demo-toy.toml)
#   4. the OverFill decoder and the Pruned baseline: the same pruned checkpoint, data and steps
#   5. held-out target loss (eval-loss), exact match per task and decode tokens/s (eval-tasks),
#      OverFill with --refresh-every, the latency plot (bench-latency), and a Table-2-style table
#
# Everything lands in one run folder (default work/demo-toy/, or work/demo-quick/ with --quick):
# raw/, tokenizer/, shards*/, runs/{full,overfill,pruned}/ (TensorBoard events: `just tensorboard`),
# eval/, latency/, results.md, summary.json. Each stage leaves a marker in .stages/ holding a key of
# its command, the recipes and the stages before it: a rerun skips finished stages and redoes a
# stage (and everything after it) whose inputs changed; an interrupted training run resumes from its
# newest checkpoint.
#
# Usage: scripts/demo-toy.sh [--quick] [--out DIR]
#   --quick   the same path on less data (fewer rows, so fewer steps per epoch): CI runs it
#   --out DIR the run folder
# The binary is built with cargo unless OVERFILL_BIN names one.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

quick=0
work=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --out) work="${2:?--out needs a folder}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo-toy.sh: unknown argument $1 (--quick, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

# The data sizes decide the number of steps (every recipe trains one epoch); everything else is
# in the recipes. Rows: OpenHermes JSON rows, Infinity Parquet rows (a quarter of them German).
if [ "$quick" = 1 ]; then
    work="${work:-$repo/work/demo-quick}"
    json_rows=9000; parquet_rows=3000; heldout_per_task=20
    decoder_steps=(--max-steps 100)   # the recipe's 400 would be the whole (smaller) epoch
    latency_args=(--sweeps gen --gen-lengths 8,32 --warmup 1 --runs 2)
else
    work="${work:-$repo/work/demo-toy}"
    json_rows=40000; parquet_rows=10000; heldout_per_task=50
    decoder_steps=()
    latency_args=(--sweeps gen,batch --gen-lengths 8,16,32,64,128 --batch-sizes 1,4,16 --warmup 1 --runs 5)
fi

# shellcheck source=scripts/demo-stages.sh
source "$repo/scripts/demo-stages.sh"
bin="$(overfill_bin "$repo")"
# The models are small: libtorch's kernels on 128-wide matrices gain little from a second thread,
# and two threads fighting for two busy cores are several times slower than one. Every command
# runs on one thread (the recipes' threads = 1 says the same for training); the two decoder
# trainings run side by side instead.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
python="$repo/.venv/bin/python"
[ -x "$python" ] || python=python3

mkdir -p "$work/.stages" "$work/eval"
cd "$work"
# Stages up to the full model depend on these files; from `preprocess` on, also on configs/demo-toy.toml
# (mixed into the chain there), so changing the decoders' recipe keeps the trained full model.
recipes_key="$(cat "$repo/configs/demo-toy-full.toml" "$repo/configs/demo-toy-full-sft.jinja" \
    "$repo/configs/models/demo-llama.json" | sha256sum | cut -c1-16)"
started=$SECONDS

export -f json_to
prev_key="$recipes_key"

say "1/6 data: tasks (OpenHermes JSON + Infinity Parquet with German rows), held-out prompts, BPE tokenizer"
cp "$repo/configs/demo-toy-full-sft.jinja" full-sft.jinja
stage data 0 "raw tokenizer heldout.jsonl" bash -c "
    '$bin' synth-data --tasks --format openhermes --rows $json_rows --seed 0 --out raw/tasks.json &&
    '$bin' synth-data --tasks --format infinity --rows $parquet_rows --seed 1 --non-english 0.25 --out raw/tasks-infinity.parquet &&
    '$bin' synth-data --heldout-out heldout.jsonl --heldout-per-task $heldout_per_task --seed 2 &&
    '$bin' synth-data --bpe-tokenizer-out tokenizer --vocab-size 512 --seed 0"

say "2/6 the full model from scratch: init-model, preprocess (context ends at the header), train --mode sft"
stage init 0 "full-init" "$bin" init-model --config "$repo/configs/models/demo-llama.json" --out full-init --seed 0 --tokenizer tokenizer
stage preprocess-full 1 "shards-full" "$bin" preprocess --config "$repo/configs/demo-toy-full.toml"
stage train-full 1 "runs/full" "$bin" train --config "$repo/configs/demo-toy-full.toml" --resume

say "3/6 preprocess (llama3 template) and calibrate-prune at P = 0.5"
mix_into_key "$repo/configs/demo-toy.toml"
stage preprocess 1 "shards" "$bin" preprocess --config "$repo/configs/demo-toy.toml"
"$bin" inspect shards --examples 1 2>&1 | tail -n 6
stage prune 0 "pruned" "$bin" calibrate-prune --config "$repo/configs/demo-toy.toml"

say "4/6 train the OverFill decoder and the Pruned baseline (same pruned checkpoint, data and steps)"
# Side by side, one thread each, each line prefixed with its run.
stage train-decoders 1 "runs/overfill runs/pruned" bash -c "
    ( set -o pipefail; '$bin' train --config '$repo/configs/demo-toy.toml' --mode overfill --out runs/overfill ${decoder_steps[*]:-} --resume 2>&1 | sed -u 's/^/[overfill] /' ) & a=\$!
    ( set -o pipefail; '$bin' train --config '$repo/configs/demo-toy.toml' --mode pruned --out runs/pruned ${decoder_steps[*]:-} --resume 2>&1 | sed -u 's/^/[pruned]   /' ) & b=\$!
    wait \$a; sa=\$?; wait \$b; sb=\$?; exit \$((sa | sb))"

say "5/6 evaluate: held-out target loss, exact match per task, decode tokens/s"
full=runs/full/final
stage eval-loss 0 "eval/loss-*.json" bash -c "
    json_to eval/loss-full.json '$bin' eval-loss --mode sft --decoder $full --data shards --device cpu --json &&
    json_to eval/loss-pruned.json '$bin' eval-loss --mode pruned --decoder runs/pruned/final --data shards --device cpu --json &&
    json_to eval/loss-overfill.json '$bin' eval-loss --mode overfill --full $full --decoder runs/overfill/final --data shards --device cpu --json &&
    json_to eval/loss-pruned-step0.json '$bin' eval-loss --mode pruned --decoder pruned --data shards --device cpu --json &&
    json_to eval/loss-overfill-step0.json '$bin' eval-loss --mode overfill --full $full --decoder pruned --data shards --device cpu --json"
stage eval-tasks 0 "eval/tasks-*.json eval/answers-*.jsonl" bash -c "
    json_to eval/tasks-full.json '$bin' eval-tasks --model $full --input heldout.jsonl --out eval/answers-full.jsonl --json &&
    json_to eval/tasks-pruned.json '$bin' eval-tasks --model runs/pruned/final --input heldout.jsonl --out eval/answers-pruned.jsonl --json &&
    json_to eval/tasks-overfill.json '$bin' eval-tasks --model $full --decoder runs/overfill/final --input heldout.jsonl --out eval/answers-overfill.jsonl --json &&
    json_to eval/tasks-overfill-refresh.json '$bin' eval-tasks --model $full --decoder runs/overfill/final --refresh-every 2 --input heldout.jsonl --out eval/answers-overfill-refresh.jsonl --json"

say "6/6 latency plot (full vs pruned vs OverFill decode)"
if "$bin" bench-latency --help >/dev/null 2>&1; then
    stage latency 0 "latency" "$bin" bench-latency --model "$full" --decoder runs/overfill/final --device cpu \
        --prompt-len 32 --batch 4 "${latency_args[@]}" --out latency
else
    echo "   overfill bench-latency is not in this build: no latency plot"
fi

"$python" - "$work" "$quick" <<'EOF'
import json, os, sys
work, quick = sys.argv[1], sys.argv[2] == "1"
def load(name):
    with open(os.path.join(work, "eval", name)) as f:
        return json.load(f)
tasks = ["lookup", "add", "reverse", "copy", "recall"]
systems = [
    ("Full (prefill + decode)", "full", "full"),
    ("Pruned (P = 0.5)", "pruned", "pruned"),
    ("OverFill", "overfill", "overfill"),
    ("OverFill, refresh every 2", "overfill-refresh", None),
]
summary = {"quick": quick, "systems": {}}
lines = [
    "| system | decoder params | " + " | ".join(tasks) + " | all | target loss | decode tok/s |",
    "|---|---:|" + "---:|" * (len(tasks) + 3),
]
for label, tasks_name, loss_name in systems:
    t = load(f"tasks-{tasks_name}.json")
    loss = load(f"loss-{loss_name}.json")["loss"] if loss_name else None
    accuracy = {k: t["tasks"][k]["accuracy"] if k in t["tasks"] else None for k in tasks}
    summary["systems"][tasks_name] = {
        "decoder_parameters": t["decoder_parameters"], "accuracy": accuracy, "accuracy_all": t["accuracy"],
        "target_loss": loss, "decode_tokens_per_second": t["decode_tokens_per_second"],
    }
    cells = ["–" if accuracy[k] is None else f"{100 * accuracy[k]:.1f}" for k in tasks] + [f"{100 * t['accuracy']:.1f}"]
    lines.append(f"| {label} | {t['decoder_parameters'] / 1e3:.0f}K | " + " | ".join(cells)
                 + f" | {'' if loss is None else f'{loss:.4f}'} | {t['decode_tokens_per_second']:.0f} |")
for name in ["pruned-step0", "overfill-step0"]:
    summary[f"target_loss_{name.replace('-', '_')}"] = load(f"loss-{name}.json")["loss"]
of, pr = summary["systems"]["overfill"]["target_loss"], summary["systems"]["pruned"]["target_loss"]
summary["overfill_below_pruned"] = of < pr
table = "\n".join(lines)
note = (f"Held-out target loss (y1..yN, {load('loss-overfill.json')['tokens']} tokens of the val split): "
        f"OverFill {of:.4f} vs Pruned {pr:.4f} ({'lower' if of < pr else 'NOT lower'}); before decoder training "
        f"{summary['target_loss_overfill_step0']:.4f} vs {summary['target_loss_pruned_step0']:.4f}. "
        f"Exact match in % on {load('tasks-full.json')['total']} held-out prompts; decode tok/s: greedy, batch 32, CPU.")
with open(os.path.join(work, "results.md"), "w") as f:
    f.write(table + "\n\n" + note + "\n")
with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print("\n" + table + "\n\n" + note)
EOF
echo
echo "demo: done in $((SECONDS - started)) s; everything is in $work (results.md, summary.json, eval/, runs/, latency/)"
echo "      TensorBoard: just tensorboard   (or .venv/bin/tensorboard --logdir $work/runs)"
