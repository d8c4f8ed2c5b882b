#!/usr/bin/env bash
# Training with torchrun: run this once on every node (by hand, or launch/slurm.sbatch does it).
# Static rendezvous: node NODE_RANK starts GPUS_PER_NODE ranks, all nodes meet at
# MASTER_ADDR:MASTER_PORT, and node 0 holds global rank 0.
#
# Variables (environment):
#   DATA           required  training shards (folder or brace pattern) every node can read
#   OUT            required  run directory on storage all nodes share (checkpoints, logs)
#   NNODES                   number of nodes (default 1)
#   NODE_RANK                this node, 0..NNODES-1 (required when NNODES > 1)
#   MASTER_ADDR              address of node 0 that every node can reach (required when NNODES > 1)
#   MASTER_PORT              free TCP port on node 0 (default 29500)
#   GPUS_PER_NODE            ranks on this node (default: the GPUs nvidia-smi lists)
#   VAL, MODEL, DS_CONFIG, COMMAND (train | finetune)   as in launch/multinode.sh
#   TORCHRUN                 the torchrun program (default: on PATH, else ./.venv/bin/torchrun)
#   ENTRY                    a Python file to run instead of `-m vitdeep` (a wrapper ending in vitdeep.cli.run())
#   DRY_RUN=1                print what would run and stop
# Arguments are passed on to `vitdeep COMMAND`, e.g.  --epochs 300 --dist-timeout 10 --resume auto
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NNODES=${NNODES:-1}
require_int NNODES 1
if (( NNODES > 1 )); then
    require NODE_RANK "this node's number, 0..$((NNODES - 1)) (node 0 holds global rank 0)"
    require MASTER_ADDR "the address of node 0 that every node can reach"
fi
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) \
    || die "$SCRIPT: NODE_RANK=$NODE_RANK must be 0..$((NNODES - 1)) for $NNODES node(s)"
require_int MASTER_PORT 1
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    (( GPUS_PER_NODE > 0 )) || die "$SCRIPT: GPUS_PER_NODE is not set and nvidia-smi lists no GPU on $(hostname): set the ranks per node"
fi
require_int GPUS_PER_NODE 1
vitdeep_args
TORCHRUN_BIN=$(find_tool torchrun TORCHRUN)

if [[ -n "${ENTRY:-}" ]]; then
    PROGRAM=("$(absolute "$ENTRY")")
else
    PROGRAM=(-m vitdeep)
fi
echo "$SCRIPT: node $NODE_RANK of $NNODES with $GPUS_PER_NODE rank(s), rendezvous at $MASTER_ADDR:$MASTER_PORT"
show_and_run "$TORCHRUN_BIN" --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${PROGRAM[@]}" "${VITDEEP_ARGS[@]}" "$@"
