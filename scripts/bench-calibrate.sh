#!/usr/bin/env bash
# Calibration throughput of `overfill calibrate-prune` against the Python reference
# (tests/python/prune_ref.py: transformers + forward hooks) on the same random model, CPU, same
# threads; and our peak RSS at two calibration sizes. Extra arguments go to bench_calibrate.py
# (e.g. --threads 2 --layers 8 --hidden 512).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --quiet -p overfill
exec .venv/bin/python tests/python/bench_calibrate.py --overfill "$target/release/overfill" "$@"
