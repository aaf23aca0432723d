#!/usr/bin/env bash
# `just bench-preprocess`: the preprocess stage on a generated OpenHermes-style file (100k rows)
# against the HF datasets reference and bare `tokenizers` encode. Uses the real Llama 3.2
# tokenizer fixture when present, else the tiny synthetic tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${BENCH_ROWS:-100000}"
work=work/bench-preprocess
mkdir -p "$work"
bin="${CARGO_TARGET_DIR:-target}/release/overfill"
cargo build --release --quiet -p overfill
tok=../shared/fixtures/llama-3.2-tokenizer
if [ ! -f "$tok/tokenizer.json" ]; then
    tok="$work/tiny-tokenizer"
    "$bin" synth-data --tokenizer-out "$tok"
fi
data="$work/openhermes-$rows.json"
[ -f "$data" ] || "$bin" synth-data --format openhermes --rows "$rows" --seed 0 --out "$data"
rm -rf "$work/shards"
start=$(date +%s.%N)
summary=$("$bin" preprocess --input "$data" --tokenizer "$tok" --template llama3 --out "$work/shards" --val-size 0 --max-seq-length 8192)
end=$(date +%s.%N)
seconds=$(python3 -c "print($end - $start)")
read -r kept tokens < <(python3 -c "import json,sys; s=json.loads(sys.argv[1]); print(s['train_rows'], s['context_tokens'] + s['target_tokens'])" "$summary")
echo "overfill: $kept rows, $tokens tokens in ${seconds}s"
.venv/bin/python tests/python/bench_preprocess.py "$data" "$tok" "$seconds" "$kept" "$tokens"
