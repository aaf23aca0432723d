#!/usr/bin/env bash
# `just bench-ddp`: all-reduce throughput of overfill's c10d shim vs torch.distributed (Gloo,
# 2 processes on loopback, 1..256 MiB). Extra arguments go to tests/python/bench_ddp.py
# (e.g. --sizes-mib 1,16 --samples 4 --mib-per-sample 256).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${OVERFILL_PYTHON:-.venv/bin/python}"
cargo build --release -p overfill
TARGET="${CARGO_TARGET_DIR:-target}"
exec "$PYTHON" tests/python/bench_ddp.py --overfill "$TARGET/release/overfill" "$@"
