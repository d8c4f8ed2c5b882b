#!/usr/bin/env bash
# Multi-node training with DeepSpeed's own launcher (`deepspeed --hostfile`).
#
# Two ways to start it (the README's "Multi-node" section has a worked 2 × 8-GPU example):
#   from node 0 only    NODE_RANK unset. The launcher reaches every host of HOSTFILE over
#                       passwordless ssh (pdsh) and starts the ranks there; the variables written
#                       to ./.deepspeed_env are exported on every node.
#   once on every node  NODE_RANK=0..NNODES-1 (by hand, or a scheduler: launch/slurm.sbatch).
#                       DeepSpeed's `--no_ssh` mode: each call starts its own node's ranks, and
#                       they meet at MASTER_ADDR:MASTER_PORT. ./.deepspeed_env, when present,
#                       fills in variables this node's environment does not set.
#
# Variables (environment):
#   HOSTFILE       required  `HOST slots=GPUS` per line (launch/hostfile.example); first host = node 0
#   DATA           required  training shards (folder or brace pattern) every node can read
#   OUT            required  run directory on storage all nodes share (checkpoints, logs)
#   VAL                      validation shards
#   MODEL                    model name (default: vitdeep's)
#   DS_CONFIG                DeepSpeed config, a file or a ds_configs/ name (default: vitdeep's)
#   COMMAND                  train (default) or finetune
#   MASTER_ADDR              address of node 0 that every node can reach (default: HOSTFILE's first host)
#   MASTER_PORT              free TCP port on node 0 (default 29500)
#   NNODES                   use only the first NNODES hosts of HOSTFILE (default: all)
#   GPUS_PER_NODE            ranks per node (default: each host's slots)
# A run already in OUT goes on on the most of these ranks its lanes fit (`vitdeep fit-world`): the
# hostfile may name fewer or more hosts than the run started on.
#   NODE_RANK                start only this node's ranks, without ssh (see above)
#   ENV_VARS                 more variable names for ./.deepspeed_env (NCCL_*, GLOO_*, TORCH_NCCL_*,
#                            WDS_*, TORCH_EXTENSIONS_DIR, OMP_NUM_THREADS, DS_ACCELERATOR go there anyway)
#   DEEPSPEED                the deepspeed launcher (default: on PATH, else ./.venv/bin/deepspeed)
#   ENTRY                    a Python file to run instead of `-m vitdeep` (a wrapper ending in vitdeep.cli.run())
#   DRY_RUN=1                print what would run and stop
# Arguments are passed on to `vitdeep COMMAND`, e.g.  --epochs 300 --dist-timeout 10 --resume auto
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

ENV_FILE=${DS_ENV_FILE:-.deepspeed_env}  # where DeepSpeed looks for it
ENV_MARKER="VITDEEP_ENV_FILE=written-by-launch/multinode.sh"

# --- the hostfile: DeepSpeed's format, checked here so a mistake is one line, not a traceback
[[ -n "${HOSTFILE:-}" ]] || die "$SCRIPT: no hostfile: set HOSTFILE to a file of 'HOST slots=GPUS' lines, one per node (see launch/hostfile.example)"
[[ -f "$HOSTFILE" ]] || die "$SCRIPT: HOSTFILE=$HOSTFILE does not exist (see launch/hostfile.example)"
HOSTS=()
SLOTS=()
while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line#"${line%%[![:space:]]*}"}"
    [[ -z "$line" || "$line" == \#* ]] && continue
    [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]] \
        || die "$SCRIPT: HOSTFILE=$HOSTFILE: '$line' is not 'HOST slots=GPUS'"
    host="${BASH_REMATCH[1]}"
    for seen in "${HOSTS[@]+"${HOSTS[@]}"}"; do
        [[ "$seen" != "$host" ]] || die "$SCRIPT: HOSTFILE=$HOSTFILE names $host twice"
    done
    HOSTS+=("$host")
    SLOTS+=("${BASH_REMATCH[2]}")
done < "$HOSTFILE"
(( ${#HOSTS[@]} > 0 )) || die "$SCRIPT: HOSTFILE=$HOSTFILE lists no host (lines 'HOST slots=GPUS')"

NNODES=${NNODES:-${#HOSTS[@]}}
require_int NNODES 1
(( NNODES <= ${#HOSTS[@]} )) || die "$SCRIPT: NNODES=$NNODES but HOSTFILE=$HOSTFILE lists ${#HOSTS[@]} host(s)"
[[ -z "${GPUS_PER_NODE:-}" ]] || require_int GPUS_PER_NODE 1
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
MASTER_PORT=${MASTER_PORT:-29500}
require_int MASTER_PORT 1
vitdeep_args
# A run in OUT goes on on the most ranks of these hosts its lanes fit (fewer or more hosts than it
# started on): NNODES and GPUS_PER_NODE are lowered to them, and said.
ALL_NODES=$NNODES
GIVEN_GPUS=${GPUS_PER_NODE:-}
if [[ -z "$GIVEN_GPUS" ]]; then
    GPUS_PER_NODE=$(printf '%s\n' "${SLOTS[@]:0:$NNODES}" | sort -n | head -n 1)
    (( GPUS_PER_NODE > 0 )) || die "$SCRIPT: HOSTFILE=$HOSTFILE gives a host slots=0"
fi
BEFORE="$NNODES $GPUS_PER_NODE"
fit_world
[[ -n "$GIVEN_GPUS" || "$NNODES $GPUS_PER_NODE" != "$BEFORE" ]] || GPUS_PER_NODE=""  # else each host's slots
if [[ -n "${NODE_RANK:-}" ]] && [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK >= NNODES && NODE_RANK < ALL_NODES )); then
    echo "$SCRIPT: node $NODE_RANK is not needed: the run goes on on the first $NNODES node(s)"
    exit 0
fi
DEEPSPEED_BIN=$(find_tool deepspeed DEEPSPEED)

LAUNCHER=("$DEEPSPEED_BIN" --hostfile "$(absolute "$HOSTFILE")" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
(( NNODES == ${#HOSTS[@]} )) || LAUNCHER+=(--num_nodes "$NNODES")
[[ -z "$GPUS_PER_NODE" ]] || LAUNCHER+=(--num_gpus "$GPUS_PER_NODE")

if [[ -n "${NODE_RANK:-}" ]]; then
    # --- once on every node: DeepSpeed reads no .deepspeed_env in this mode, so take it here
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) \
        || die "$SCRIPT: NODE_RANK=$NODE_RANK must be 0..$((NNODES - 1)) for $NNODES node(s)"
    if [[ -f "$ENV_FILE" ]]; then
        while IFS= read -r line || [[ -n "$line" ]]; do
            [[ "$line" =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
            key="${BASH_REMATCH[1]}" value="${BASH_REMATCH[2]}"
            [[ -z "${!key+set}" ]] || continue  # this node's own environment wins
            value="${value#\"}"
            export "$key=${value%\"}"
        done < "$ENV_FILE"
        echo "$SCRIPT: node $NODE_RANK takes the variables its environment lacks from $PWD/$ENV_FILE"
    fi
    LAUNCHER+=(--no_ssh --node_rank "$NODE_RANK")
    echo "$SCRIPT: node $NODE_RANK of $NNODES, rendezvous at $MASTER_ADDR:$MASTER_PORT"
else
    # --- from node 0 over ssh: DeepSpeed exports ./.deepspeed_env on every node
    if [[ "${DRY_RUN:-0}" != 1 ]] && (( NNODES > 1 )) && ! command -v pdsh >/dev/null 2>&1; then
        die "$SCRIPT: pdsh not found: install it (with passwordless ssh between the nodes), or start this script on every node with NODE_RANK=0..$((NNODES - 1))"
    fi
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    lines=("$ENV_MARKER")
    for name in $(compgen -e | LC_ALL=C sort); do
        case "$name" in
            NCCL_* | GLOO_* | TORCH_NCCL_* | WDS_* | TORCH_EXTENSIONS_DIR | OMP_NUM_THREADS | DS_ACCELERATOR) ;;
            *) [[ " ${ENV_VARS:-} " == *" $name "* ]] || continue ;;
        esac
        if [[ "${!name}" != *$'\n'* ]]; then
            lines+=("$name=${!name}")
        fi
    done
    if [[ -f "$ENV_FILE" ]] && ! grep -qxF "$ENV_MARKER" "$ENV_FILE"; then
        echo "$SCRIPT: using $PWD/$ENV_FILE as you wrote it (it is not ours to rewrite)"
    elif [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "$SCRIPT: would write $PWD/$ENV_FILE:"
        printf '    %s\n' "${lines[@]}"
    else
        tmp=$(mktemp "$ENV_FILE.XXXXXX")
        printf '%s\n' "${lines[@]}" > "$tmp"
        mv -f "$tmp" "$ENV_FILE"
        echo "$SCRIPT: wrote $PWD/$ENV_FILE (${#lines[@]} lines), exported on every node"
    fi
    echo "$SCRIPT: $NNODES node(s) from here over ssh, rendezvous at $MASTER_ADDR:$MASTER_PORT"
fi

if [[ -n "${ENTRY:-}" ]]; then
    PROGRAM=("$(absolute "$ENTRY")")
else
    PROGRAM=(--module vitdeep)
fi
show_and_run "${LAUNCHER[@]}" "${PROGRAM[@]}" "${VITDEEP_ARGS[@]}" "$@"
