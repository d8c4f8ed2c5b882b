# Helpers shared by the launch/ scripts (sourced by them, not run on its own).
#
# Every script: refuses to start with one line on stderr (exit 2) when a required value is
# missing or wrong, prints the full command before running it, and with DRY_RUN=1 prints it and
# stops.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT="launch/$(basename "$0")"  # what the messages name

die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

# require NAME "what it is": refuse to start when $NAME is empty.
require() {
    [[ -n "${!1:-}" ]] || die "$SCRIPT: $1 is not set: $2"
}

# require_int NAME MIN: $NAME must be an integer >= MIN.
require_int() {
    [[ "${!1}" =~ ^[0-9]+$ ]] && (( ${!1} >= $2 )) || die "$SCRIPT: $1=${!1} must be an integer >= $2"
}

# absolute PATH: a relative local path made absolute (the nodes may start elsewhere); brace
# patterns stay patterns, pipe:/URL sources stay as they are.
absolute() {
    local path=$1
    if [[ -z "$path" || "$path" == /* || "$path" =~ ^[A-Za-z][A-Za-z0-9+.-]*: ]]; then
        printf '%s' "$path"
    else
        printf '%s/%s' "$PWD" "${path#./}"
    fi
}

# find_tool NAME OVERRIDE_VAR: $OVERRIDE_VAR if set, else NAME on PATH, else the checkout's .venv/bin.
find_tool() {
    local name=$1 var=$2 given="${!2:-}"
    if [[ -n "$given" ]]; then
        command -v -- "$given" >/dev/null 2>&1 || die "$SCRIPT: $var=$given is not a program"
        command -v -- "$given"
    elif command -v -- "$name" >/dev/null 2>&1; then
        command -v -- "$name"
    elif [[ -x "$LAUNCH_DIR/../.venv/bin/$name" ]]; then
        printf '%s' "$(cd "$LAUNCH_DIR/../.venv/bin" && pwd)/$name"
    else
        die "$SCRIPT: $name not found: activate the environment vitdeep is installed in, or set $var to its path"
    fi
}

# The vitdeep arguments every launcher passes: COMMAND, DATA, OUT, VAL, MODEL, DS_CONFIG.
# Sets the array VITDEEP_ARGS (the program itself, `-m vitdeep` or $ENTRY, is up to the launcher).
vitdeep_args() {
    require DATA "the training shards (a folder or brace pattern every node can read)"
    require OUT "the run directory, on storage every node shares (each node writes its part of every checkpoint there)"
    COMMAND=${COMMAND:-train}
    [[ "$COMMAND" == train || "$COMMAND" == finetune ]] || die "$SCRIPT: COMMAND=$COMMAND must be train or finetune"
    VITDEEP_ARGS=("$COMMAND" --data "$(absolute "$DATA")" --out "$(absolute "$OUT")")
    [[ -z "${VAL:-}" ]] || VITDEEP_ARGS+=(--val "$(absolute "$VAL")")
    [[ -z "${MODEL:-}" ]] || VITDEEP_ARGS+=(--model "$MODEL")
    [[ -z "${DS_CONFIG:-}" ]] || VITDEEP_ARGS+=(--ds-config "$DS_CONFIG")
    return 0
}

# show_and_run CMD...: print the command (shell-quoted, ready to copy), then run it in this process.
show_and_run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        exit 0
    fi
    exec "$@"
}
