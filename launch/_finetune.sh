# Shared by launch/finetune_384.sh and launch/finetune_512.sh (sourced; IMG_SIZE is set by them).
#
# `vitdeep finetune` brings DeiT's high-resolution finetuning recipe as its defaults and resamples
# the position embeddings to the new grid (see `vitdeep finetune --help`), so nothing here
# repeats a number of the recipe: flags you add override it.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

require FROM "the weights to finetune: a vitdeep run or checkpoint directory, an export, or a timm / DeiT / CaiT state dict (then add --model)"
LAUNCHER=${LAUNCHER:-$([[ -n "${HOSTFILE:-}" ]] && echo multinode || echo torchrun)}
case "$LAUNCHER" in
    multinode | torchrun) ;;
    *) die "$SCRIPT: LAUNCHER=$LAUNCHER must be multinode (launch/multinode.sh) or torchrun (launch/torchrun.sh)" ;;
esac
echo "$SCRIPT: finetune $FROM at ${IMG_SIZE} px with launch/$LAUNCHER.sh"
COMMAND=finetune exec bash "$LAUNCH_DIR/$LAUNCHER.sh" --from "$(absolute "$FROM")" --img-size "$IMG_SIZE" "$@"
