# Sourced by scripts/demo.sh and scripts/demo-toy.sh: the binary, and cached, resumable stages in a
# run folder.
#
# The caller sets `prev_key` (a key of the recipes the first stage depends on) and runs inside its
# run folder. Each stage leaves .stages/NAME holding a key of its command and of the stage before it:
# a rerun skips finished stages and redoes a stage (and every one after it) whose inputs changed.

# overfill_bin REPO: the binary to run, $OVERFILL_BIN or the release build of REPO (built first).
overfill_bin() {
    local repo="$1" bin
    if [ -n "${OVERFILL_BIN:-}" ]; then
        echo "$OVERFILL_BIN"
        return
    fi
    (cd "$repo" && cargo build --release --quiet -p overfill) >&2
    bin="${CARGO_TARGET_DIR:-$repo/target}/release/overfill"
    case "$bin" in /*) echo "$bin" ;; *) echo "$repo/$bin" ;; esac
}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# stage NAME RESUMABLE "OUTPUTS" CMD...: run CMD unless .stages/NAME holds this stage's key (its
# command, the recipes and the previous stage's key). A stage whose key changed starts over (its
# OUTPUTS are removed first); an interrupted resumable stage keeps its outputs (training resumes).
stage() {
    local name="$1" resumable="$2" outputs="$3"
    shift 3
    local key
    key="$(printf '%s\n' "$prev_key" "$*" | sha256sum | cut -c1-16)"
    prev_key="$key"
    if [ "$(cat ".stages/$name" 2>/dev/null)" = "$key" ]; then
        echo "   $name: up to date (.stages/$name)"
        return
    fi
    if [ -f ".stages/$name" ] || [ "$resumable" = 0 ]; then
        # shellcheck disable=SC2086 # OUTPUTS is a list of relative paths without spaces
        rm -rf $outputs
    fi
    rm -f ".stages/$name"
    "$@"
    echo "$key" > ".stages/$name"
}

# mix_into_key FILE...: later stages also depend on these files' contents.
mix_into_key() {
    prev_key="$(cat - "$@" <<<"$prev_key" | sha256sum | cut -c1-16)"
}

# json_to FILE CMD...: the last line of CMD's stdout (its --json object) into FILE, atomically.
json_to() {
    local file="$1"
    shift
    "$@" | tail -n 1 > "$file.tmp" && mv "$file.tmp" "$file"
}
