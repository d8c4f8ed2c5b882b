"""Deep ViT / DeiT and CaiT models with the over-smoothing remedies as options.

Importing this package also registers every model with timm as `vitdeep_<name>`.
"""

from vitdeep.models.base import DeepTransformer
from vitdeep.models.cait import Cait
from vitdeep.models.registry import MODELS, ModelSpec, count_flops, count_parameters, create_model, get_spec, model_stats
from vitdeep.models.timm_hub import default_cfgs  # noqa: F401  (registers the zoo with timm)
from vitdeep.models.vit import VisionTransformer
from vitdeep.outputs import AuxOutput

__all__ = [
    "AuxOutput",
    "Cait",
    "DeepTransformer",
    "MODELS",
    "ModelSpec",
    "VisionTransformer",
    "count_flops",
    "count_parameters",
    "create_model",
    "get_spec",
    "model_stats",
]
