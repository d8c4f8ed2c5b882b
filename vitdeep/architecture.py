"""The options that define a model's architecture, the over-smoothing remedies among them, and the
input the models are made for.

Free of torch, so that the run config, the command line's `--help` and the data pipeline read
them without importing a model; `vitdeep.models.registry` builds models from them. A remedy listed
in `REMEDIES` is at once a `create_model` option, a config field and a `--flag` (of `train`,
`finetune`, `plan`, `ablate` and `analyze`), part of the resume checks and recognised by its
parameters in a plain state dict: nothing else names it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Remedy:
    """An over-smoothing remedy that changes the attention of every self-attention block.

    `on_by_default` names the model families where it is on unless turned off (talking heads in
    CaiT). The layer itself is chosen by `vitdeep.models.layers.attention_layer(**{name: True})`.
    """

    name: str
    help: str
    on_by_default: tuple[str, ...] = ()

    def default(self, family: str) -> bool:
        return family in self.on_by_default


REMEDIES = (
    Remedy("talking_heads", "Talking-heads attention (default: on for CaiT, off for DeiT).", on_by_default=("cait",)),
    Remedy("attnscale", "AttnScale: learnable per-head high-pass gain on attention."),
    Remedy("featscale", "FeatScale: learnable DC / high-frequency gains on attention output."),
)
REMEDY_NAMES = tuple(remedy.name for remedy in REMEDIES)

#: Options that define a model's architecture: a checkpoint resumes only into the same values, and
#: a finetune inherits those its source was trained with (`INHERITED_OPTIONS`).
ARCHITECTURE_OPTIONS = ("depth", "embed_dim", "num_heads", "img_size", "patch_size", "num_classes", *REMEDY_NAMES,
                        "init_values", "patch_head", "distilled")
#: Architecture options a finetune takes from its source (size, classes and heads may change).
INHERITED_OPTIONS = tuple(o for o in ARCHITECTURE_OPTIONS if o not in ("img_size", "num_classes", "patch_head", "distilled"))
#: Switches a plain state dict shows by the parameters they add (`options_in_state_dict`).
SWITCHES = (*REMEDY_NAMES, "patch_head", "distilled")

#: The input every model is made for unless told otherwise, and DeiT's evaluation preprocessing
#: (resize the shorter side to size / crop ratio, bicubic, centre crop): timm's `pretrained_cfg`
#: and the evaluation pipeline both read these.
DEFAULT_IMG_SIZE = 224
DEFAULT_PATCH_SIZE = 16
EVAL_CROP_RATIO = 0.875
INTERPOLATION = "bicubic"
