# Helpers shared by the launch/ scripts (sourced by them, not run on its own).
#
# Every script: refuses to start with one line on stderr (exit 2) when a required value is
# missing or wrong, prints the full command before running it, and with DRY_RUN=1 prints it and
# stops. SIGTERM / SIGUSR1 / SIGINT sent to a script reach the ranks (run_forwarding_signals), which
# stop at the next step with a checkpoint and exit 75 (resume with --resume auto).

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

# fit_world: when OUT holds a run, lower NNODES / GPUS_PER_NODE to the most ranks it goes on on (its
# lanes decide which numbers fit, `vitdeep fit-world`), which says so on stderr; with none that
# fits, one line and exit 2. A run stopped on 16 ranks and requeued on 3 nodes × 8 resumes on 2 × 8.
fit_world() {
    local vitdeep fit
    vitdeep=$(find_tool vitdeep VITDEEP)
    fit=$("$vitdeep" fit-world "$(absolute "$OUT")" --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE") || exit 2
    read -r NNODES GPUS_PER_NODE <<< "$fit"
    export NNODES GPUS_PER_NODE
}

# show_command CMD...: print the command (shell-quoted, ready to copy); with DRY_RUN=1 stop there.
show_command() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        exit 0
    fi
}

# show_and_run CMD...: print the command, then run the launcher it names (run_forwarding_signals).
show_and_run() {
    show_command "$@"
    run_forwarding_signals "$@"
}

# Exit code of a vitdeep run stopped by a signal after saving its checkpoint (resume it).
EXIT_STOPPED=75

# rank_pids PID: the vitdeep ranks under a launcher: the first processes down its tree that are not
# launchers themselves (DeepSpeed's runner and launch.py, torchrun); their data-loader workers are left out.
rank_pids() {
    local child args
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        args=$(ps -o args= -p "$child" 2>/dev/null) || continue
        case "$args" in
            *deepspeed.launcher* | */deepspeed\ * | *torchrun* | *torch.distributed.run*) rank_pids "$child" ;;
            *) echo "$child" ;;
        esac
    done
}

# forward_signal SIG: pass a stop signal to the ranks (SIGINT as SIGTERM: a terminal's Ctrl-C reaches
# them by itself, and a second SIGINT would stop them at once, without a checkpoint).
forward_signal() {
    local target=$1 pids
    [[ "$target" != INT ]] || target=TERM
    STOP_FORWARDED=1
    pids=$(rank_pids "$LAUNCHER_PID" | tr '\n' ' ')
    echo "$SCRIPT: SIG$1: asking the ranks (${pids% }) to stop at the next step with a checkpoint" >&2
    [[ -z "$pids" ]] || kill -s "$target" $pids 2>/dev/null || true
}

# run_forwarding_signals CMD...: run a launcher, passing SIGTERM / SIGUSR1 / SIGINT sent to this script
# to the vitdeep ranks under it, which save a checkpoint at the next step boundary and exit with
# EXIT_STOPPED. Sent to a launcher the signals would not arrive intact: DeepSpeed's runner does not
# forward them (its ranks train on as orphans), its launch.py and torchrun kill the ranks after 30 s,
# and neither survives SIGUSR1. Exits with the launcher's code, EXIT_STOPPED after a forwarded signal.
run_forwarding_signals() {
    STOP_FORWARDED=0
    "$@" &
    LAUNCHER_PID=$!
    trap 'forward_signal TERM' TERM
    trap 'forward_signal USR1' USR1
    trap 'forward_signal INT' INT
    local status=0
    while true; do
        status=0
        wait "$LAUNCHER_PID" || status=$?
        kill -0 "$LAUNCHER_PID" 2>/dev/null || break  # it ended (else a signal interrupted the wait)
    done
    trap - TERM USR1 INT
    if (( STOP_FORWARDED && status != 0 )); then
        status=$EXIT_STOPPED  # torchrun reports its ranks' exit as its own failure (1)
    fi
    exit "$status"
}
