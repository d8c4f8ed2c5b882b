#!/usr/bin/env bash
# Finetune a 224-px model at 384 px with DeiT's recipe (vitdeep finetune's defaults; the
# position embeddings are resampled to the 24×24 grid of 16-px patches).
#
# Variables (environment):
#   FROM       required  weights to start from: a vitdeep run / checkpoint directory or export,
#                        or a timm / DeiT / CaiT state dict (then add --model NAME)
#   LAUNCHER             multinode (launch/multinode.sh; the default when HOSTFILE is set) or
#                        torchrun (launch/torchrun.sh; the default otherwise, one node unless NNODES)
#   DATA, OUT, VAL, DS_CONFIG, HOSTFILE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
#   GPUS_PER_NODE, DRY_RUN ...   as the launcher script reads them
# Arguments are passed on to `vitdeep finetune`; they override the recipe, e.g.
#   FROM=/shared/runs/deit_b24 DATA=/shared/imagenet/train VAL=/shared/imagenet/val \
#     OUT=/shared/runs/deit_b24_384 HOSTFILE=hosts bash launch/finetune_384.sh --micro-batch 16
set -euo pipefail
IMG_SIZE=384
source "$(dirname "${BASH_SOURCE[0]}")/_finetune.sh"
