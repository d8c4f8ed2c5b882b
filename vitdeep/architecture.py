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
    """An over-smoothing remedy: a layer of every block (attention or norm) or the model's tokens.

    `kind` is `bool` for a switch, `int` / `float` for a value where 0 is off (the number of
    register tokens, ContraNorm's scale). `on_by_default` names the model families where a switch
    is on unless turned off (talking heads in CaiT); `families` those that have it at all. The
    layers are chosen by `vitdeep.models.layers.remedy_layers(**{name: value})`.
    """

    name: str
    help: str
    on_by_default: tuple[str, ...] = ()
    kind: type = bool
    families: tuple[str, ...] = ("deit", "cait")

    def default(self, family: str) -> bool | int | float:
        if self.kind is bool:
            return family in self.on_by_default
        return self.kind(0)

    def value(self, value: object) -> bool | int | float:
        """A given value as this remedy's kind."""
        return self.kind(value)


REMEDIES = (
    Remedy("talking_heads", "Talking-heads attention (default: on for CaiT, off for DeiT).", on_by_default=("cait",)),
    Remedy("reattention", "Re-attention (DeepViT): a learned head mixing of the attention maps, then BatchNorm."),
    Remedy("attnscale", "AttnScale: learnable per-head high-pass gain on attention."),
    Remedy("featscale", "FeatScale: learnable DC / high-frequency gains on attention output."),
    Remedy("qk_norm", "QK-norm: LayerNorm on each head's queries and keys (ViT-22B; timm's qk_norm)."),
    Remedy("contranorm", "ContraNorm scale s (0 = off): every LayerNorm becomes LN(x − s·softmax(x̂x̂ᵀ)·x).", kind=float),
    Remedy("reg_tokens", "Register tokens (DeiT only; 0 = none), left out of every patch-token loss and diagnostic.",
           kind=int, families=("deit",)),
)
REMEDY_BY_NAME = {remedy.name: remedy for remedy in REMEDIES}
REMEDY_NAMES = tuple(remedy.name for remedy in REMEDIES)

def cait_layer_scale_init(depth: int) -> float:
    """LayerScale init by depth, as in the CaiT paper: 0.1 up to 18 blocks, 1e-5 up to 24, 1e-6
    deeper. CaiT models use it unless `init_values` is set; DeiT models with
    `layer_scale_by_depth`."""
    if depth <= 18:
        return 0.1
    return 1e-5 if depth <= 24 else 1e-6


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
