"""Every zoo model as a timm model, `timm.create_model("vitdeep_<name>")`, registered when
`vitdeep.models` is imported; `pretrained=True` with a file loads it through `checkpoint_filter_fn`,
and a vitdeep export rebuilds the options it was saved with."""

from __future__ import annotations

import sys

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from vitdeep.export_format import export_crop_ratio, export_options
from vitdeep.models.base import DeepTransformer
from vitdeep.models.checkpoints import checkpoint_filter_fn
from vitdeep.models.registry import MODELS, PRETRAINED_CFG, ModelSpec, class_kwargs, with_pretrained_cfg

#: timm finds a model's `pretrained_cfg` in the `default_cfgs` of the module its entrypoint lives in.
default_cfgs = generate_default_cfgs({f"vitdeep_{name}": PRETRAINED_CFG for name in MODELS})


def _timm_entrypoint(spec: ModelSpec):
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        if pretrained and overlay.get("file"):
            # a vitdeep export knows its options: build the model it was saved from
            kwargs = {**(export_options(overlay["file"]) or {}), **kwargs}
            crop = export_crop_ratio(overlay["file"])
            kwargs["pretrained_cfg_overlay"] = {"num_classes": kwargs.get("num_classes", 1000),
                                                **({"crop_pct": crop} if crop is not None else {}), **overlay}
        out_indices = kwargs.pop("out_indices", 3)
        model = build_model_with_cfg(
            spec.model_cls, f"vitdeep_{spec.name}", pretrained, pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **class_kwargs(spec, kwargs),
        )
        return with_pretrained_cfg(model, model.pretrained_cfg) if isinstance(model, DeepTransformer) else model

    entrypoint.__name__ = f"vitdeep_{spec.name}"
    entrypoint.__qualname__ = entrypoint.__name__
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"vitdeep {spec.name}: {spec.family}, depth {spec.depth}, width {spec.embed_dim}."
    return entrypoint


def _register_with_timm() -> None:
    """Every model is also `timm.create_model("vitdeep_<name>")` once `vitdeep.models` is imported."""
    module = sys.modules[__name__]
    for spec in MODELS.values():
        entrypoint = _timm_entrypoint(spec)
        setattr(module, entrypoint.__name__, entrypoint)
        register_model(entrypoint)


_register_with_timm()
