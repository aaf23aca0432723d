#!/usr/bin/env bash
# `just drafter`: which decoder drafts best for lossless speculative decoding (generate
# --speculative), on the demo's real model. Run `just demo` first: this uses its run folder
# (default work/demo/: the full model, the pruned checkpoint, the shards, the held-out questions).
#
#   1. distill: the full model's own greedy answers to the first N training questions
#      (overfill distill, resumable), preprocessed into shards-distill/
#   2. for each seed, two drafters from the same pruned checkpoint with the same batch, learning
#      rate and at most --steps optimizer steps (OverFill training, two at a time, one thread each):
#      one on the dataset's reference answers (shards/), one on the full model's answers
#      (shards-distill/). The recipe's one epoch ends first where the data are fewer: 1948 distilled
#      training rows at batch 16 stop at step 122.
#   3. acceptance on held-out questions: generate --speculative K with each drafter and with the
#      untrained pruned checkpoint; the output must equal the full model's own greedy answers
#   4. drafter.md / drafter.json: acceptance rate and tokens kept per verification, mean ± std
#      over seeds
#
# Usage: scripts/drafter.sh [--seeds 0,1,2] [--steps 150] [--prompts 2048] [--heldout 32] [--k 2] [--out DIR]
# The binary is built with cargo unless OVERFILL_BIN names one.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
seeds="0,1,2"
steps=150
prompts=2048
heldout=32
k=2
work="$repo/work/demo"
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds="${2:?}"; shift ;;
        --steps) steps="${2:?}"; shift ;;
        --prompts) prompts="${2:?}"; shift ;;
        --heldout) heldout="${2:?}"; shift ;;
        --k) k="${2:?}"; shift ;;
        --out) work="${2:?}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "drafter.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
IFS=, read -r -a seed_list <<<"$seeds"
# shellcheck source=scripts/demo-stages.sh
source "$repo/scripts/demo-stages.sh"
bin="$(overfill_bin "$repo")"
python="$repo/.venv/bin/python"
recipe="$repo/configs/demo.toml"
for need in full pruned shards heldout.jsonl; do
    [ -e "$work/$need" ] || { echo "drafter.sh: $work/$need is missing: run \`just demo\` first" >&2; exit 1; }
done
cd "$work"
mkdir -p drafter

echo "1/3 distill: the full model's answers to $prompts training questions"
"$bin" distill --config "$recipe" --limit "$prompts" >drafter/distill.json
"$bin" preprocess --config "$recipe" --input 'distilled/part-*.jsonl' --format jsonl --val-size 100 --out shards-distill >drafter/preprocess.json

echo "2/3 drafters: at most $steps steps each, seeds $seeds (two at a time, one thread each)"
train() { # NAME DATA SEED
    [ -f "runs/$1/final/config.json" ] && return 0
    "$bin" train --config "$recipe" --mode overfill --seed "$3" --data "$2" --out "runs/$1" --max-steps "$steps" \
        --set train.eval_steps="$steps" --set train.save_steps=50 >"drafter/train-$1.log" 2>&1 ||
        { echo "drafter.sh: training $1 failed, see $work/drafter/train-$1.log" >&2; return 1; }
}
export -f train
export bin recipe steps work
# Longest first (the distilled answers are longer than the references), two workers.
{
    for seed in "${seed_list[@]}"; do echo "drafter-distill-s$seed shards-distill $seed"; done
    for seed in "${seed_list[@]}"; do echo "drafter-ref-s$seed shards $seed"; done
} | xargs -P 2 -L 1 bash -c 'train "$@"' _

echo "3/3 acceptance at K=$k on $heldout held-out questions"
# Kept outputs are reused while the prompts, K and the drafters are the same.
head -n "$heldout" heldout.jsonl >drafter/prompts.next.jsonl
stamp="k=$k $(sha256sum drafter/prompts.next.jsonl | cut -c1-16) $(cat runs/drafter-*/final/*.safetensors | sha256sum | cut -c1-16)"
if [ "$(cat drafter/stamp 2>/dev/null)" != "$stamp" ]; then
    rm -f drafter/full.json drafter/spec-*.json
    mv drafter/prompts.next.jsonl drafter/prompts.jsonl
    echo "$stamp" >drafter/stamp
fi
rm -f drafter/prompts.next.jsonl
[ -s drafter/full.json ] ||
    "$bin" generate --model full --input drafter/prompts.jsonl --max-new-tokens 128 --json 2>/dev/null | tail -n 1 >drafter/full.json
accept() { # NAME DECODER
    [ -s "drafter/spec-$1.json" ] && return 0
    "$bin" generate --model full --decoder "$2" --speculative "$k" --input drafter/prompts.jsonl --max-new-tokens 128 --json \
        2>/dev/null | tail -n 1 >"drafter/spec-$1.json"
}
accept pruned pruned
for seed in "${seed_list[@]}"; do
    accept "ref-s$seed" "runs/drafter-ref-s$seed/final"
    accept "distill-s$seed" "runs/drafter-distill-s$seed/final"
done
"$python" - "$k" "$prompts" "$heldout" "${seed_list[@]}" <<'PY'
import json, statistics, sys
k, prompts, heldout, seeds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
full = json.load(open("drafter/full.json"))["token_ids"]

def read(name):
    out = json.load(open(f"drafter/spec-{name}.json"))
    identical = sum(a == b for a, b in zip(out["token_ids"], full))
    s = out["speculative"]
    return s["acceptance_rate"], s["mean_accepted_per_verification"], identical

def cell(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

def trained_steps(kind):
    steps = {max(json.loads(line).get("step", 0) for line in open(f"runs/drafter-{kind}-s{s}/log.jsonl")) for s in seeds}
    return "/".join(str(n) for n in sorted(steps))

rows = {"untrained pruned checkpoint": [read("pruned")]}
rows[f"OverFill-trained on the references ({trained_steps('ref')} steps)"] = [read(f"ref-s{s}") for s in seeds]
rows[f"OverFill-trained on the full model's answers ({trained_steps('distill')} steps)"] = [read(f"distill-s{s}") for s in seeds]
lines = [
    f"Speculative decoding at K = {k}: the first {heldout} held-out questions, up to 128 new tokens, greedy, one batch. "
    f"Seeds {','.join(seeds)} (mean ± sample std); distillation data: the full model's answers to {prompts} training "
    f"questions.", "",
    "| drafter | acceptance rate | draft tokens kept per verification | answers identical to the full model's |",
    "|---|---:|---:|---:|",
]
for name, values in rows.items():
    same = "/".join(str(v[2]) for v in values)
    lines.append(f"| {name} | {cell([v[0] for v in values])} | {cell([v[1] for v in values])} | {same} of {len(full)} |")
open("drafter.md", "w").write("\n".join(lines) + "\n")
json.dump({name: values for name, values in rows.items()}, open("drafter.json", "w"), indent=1)
print("\n".join(lines))
PY
