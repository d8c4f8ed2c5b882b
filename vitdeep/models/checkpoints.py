"""Fitting a state dict to a vitdeep model, as timm's `checkpoint_filter_fn` does for its own.

Position embeddings are resampled to the model's grid (prefix slots kept); the authors' parameter
names are mapped to ours (Gong et al.'s bias-free talking heads `proj_pre` / `proj_post`, Wang et
al.'s `lamb` / `lamb1` / `lamb2`, DeepViT's `attn.reatten_matrix` / `attn.var_norm`, ContraNorm's
`….layernorm.*`); parameters the source lacks start at their identity values (ω = 0,
λ = 0, γ = 1, talking heads = identity) or, for a new classifier / patch head, at their initial
values, and are listed in the report; a classifier / patch head the model does not have (a
finetune without ℓ_token, `num_classes=0`) is left out and listed too; anything else that does not
fit is an error, never a silent skip. Reading files and building models from them is `vitdeep.engine.weights`' job.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from vitdeep.architecture import REMEDY_BY_NAME, SWITCHES
from vitdeep.errors import UserError
from vitdeep.models.registry import FAMILIES, create_model, family_of, get_spec, model_options



@dataclass
class LoadReport:
    source: str
    kind: str
    identity: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resampled: str | None = None

    def lines(self) -> list[str]:
        lines = [f"loaded {self.source} ({self.kind})"]
        if self.resampled:
            lines.append(f"  position embedding resampled {self.resampled}")
        if self.converted:
            lines.append(f"  converted: {_summarise(self.converted)}")
        if self.identity:
            lines.append(f"  not in the source, set to identity: {_summarise(self.identity)}")
        if self.fresh:
            lines.append(f"  not in the source, freshly initialised: {_summarise(self.fresh)}")
        if self.dropped:
            lines.append(f"  heads the model does not have, left out: {_summarise(self.dropped)}")
        return lines


def _summarise(keys: list[str]) -> str:
    """`blocks.{0..23}.attn.attn_scale.omega` style summary of many per-block keys (also of
    `old → new` conversion lines, whose block index appears on both sides)."""
    groups: dict[str, list[int]] = {}
    for key in keys:
        indices = {int(i) for i in re.findall(r"\bblocks\.(\d+)\.", key)}
        pattern = re.sub(r"\bblocks\.\d+\.", "blocks.*.", key) if len(indices) == 1 else key
        groups.setdefault(pattern, []).extend(indices if len(indices) == 1 else [])
    parts = []
    for pattern, indices in groups.items():
        parts.append(pattern.replace("*", f"{{{min(indices)}..{max(indices)}}}") if indices else pattern)
    return ", ".join(parts)


#: Gong et al.'s bias-free talking-heads maps (PatchVisionTransformer's `deit/models.py`) → timm's names.
GONG_TALKING_HEADS = {"proj_pre": "proj_l", "proj_post": "proj_w"}


#: DeepViT's Re-attention (`blocks.i.attn.reatten_matrix` / `var_norm`) and the authors' ContraNorm
#: (a LayerNorm at `….layernorm`) → vitdeep's names: the same tensors under another path.
RENAMED_OFFICIAL = (
    (re.compile(r"^(blocks\.\d+\.attn\.)((?:reatten_matrix|var_norm)\..+)$"), r"\1reattention.\2"),
    (re.compile(r"^(.*norm\d?)\.layernorm\.(weight|bias)$"), r"\1.\2"),
)


def _convert_official(state_dict: dict[str, torch.Tensor], family: str, report: LoadReport) -> dict[str, torch.Tensor]:
    """The authors' parameter names. Wang et al.: `blocks.i.attn.lamb` (ω), `blocks.i.lamb1/2`
    (λ). Gong et al.: `blocks.i.attn.proj_pre/proj_post.weight`, talking heads without bias,
    which are timm's `proj_l` / `proj_w` with a zero bias. DeepViT and ContraNorm: renamed
    (`RENAMED_OFFICIAL`)."""
    converted = {}
    for key, value in state_dict.items():
        wang = re.match(r"^(blocks\.\d+\.)(attn\.lamb|lamb1|lamb2)$", key)
        gong = re.match(r"^(blocks\.\d+\.attn\.)(proj_pre|proj_post)\.weight$", key)
        renamed = next((pattern.sub(new, key) for pattern, new in RENAMED_OFFICIAL if pattern.match(key)), None)
        if renamed is not None:
            converted[renamed] = value
            report.converted.append(f"{key} → {renamed}")
        elif wang is not None:
            prefix, name = wang.groups()
            if name == "attn.lamb":
                new_key = f"{prefix}attn.attn_scale.omega"
            else:
                new_key = f"{prefix}attn.feat_scale.lambda{name[-1]}"
                value = value * FAMILIES[family].official_featscale_factor
            converted[new_key] = value
            report.converted.append(f"{key} → {new_key}")
        elif gong is not None:
            prefix, name = gong.groups()
            new_name = f"{prefix}{GONG_TALKING_HEADS[name]}"
            converted[f"{new_name}.weight"] = value
            converted[f"{new_name}.bias"] = torch.zeros(value.shape[0], dtype=value.dtype)
            report.converted.append(f"{key} → {new_name}.weight (bias 0)")
        else:
            converted[key] = value
    return converted


def _identity_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """The values at which parameters a source may lack leave its function unchanged: each remedy
    layer's `identity_state` (ω = 0, λ = 0, talking heads = I) and LayerScale's γ = 1."""
    values = {}
    for prefix, module in model.named_modules():
        if hasattr(module, "identity_state"):
            values.update({f"{prefix}.{name}": value for name, value in module.identity_state().items()})
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[-1] in ("gamma", "gamma_1", "gamma_2"):
            values[key] = torch.ones_like(value)
    return values


def _is_classifier(key: str) -> bool:
    return key.split(".", 1)[0] in ("head", "head_dist", "patch_head")


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str = "", kind: str = "") -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Fit `state_dict` to `model` (see the module docstring); raises `UserError` on a mismatch."""
    report = LoadReport(source, kind)
    state = _convert_official(state_dict, family_of(model), report)
    target = model.state_dict()
    source_depth, source_width = _source_shape(state)
    if (source_depth, source_width) != (len(model.blocks), model.embed_dim):
        raise UserError(
            f"{source} does not fit the model: source depth {source_depth}, width {source_width}; "
            f"model depth {len(model.blocks)}, width {model.embed_dim}"
        )

    unexpected = sorted(set(state) - set(target))
    report.dropped = [key for key in unexpected if _is_classifier(key)]
    for key in report.dropped:  # as timm drops a head the new model lacks (a patch head, num_classes=0)
        del state[key]
    unexpected = [key for key in unexpected if key not in report.dropped]
    if unexpected:
        raise UserError(f"{source} has parameters this model lacks: {_summarise(unexpected)} ({_architecture_hint(state, model)})")

    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        state["pos_embed"], report.resampled = _resample_pos_embed(state["pos_embed"], model, source)

    new_head = [k for k in state if _is_classifier(k) and state[k].shape != target[k].shape]
    for key in new_head:
        del state[key]
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise UserError(f"{source}: {key} has shape {list(value.shape)}, the model needs {list(target[key].shape)} ({_architecture_hint(state, model)})")

    identities = _identity_values(model)
    for key in sorted(set(target) - set(state)):
        if key in identities:
            state[key] = identities[key]
            report.identity.append(key)
        elif _is_classifier(key):
            state[key] = target[key]
            report.fresh.append(key)
        else:
            raise UserError(f"{source} lacks {key} ({_architecture_hint(state, model)})")
    return state, report


def _source_shape(state: dict[str, torch.Tensor]) -> tuple[int, int | None]:
    """(number of self-attention blocks, width) of a state dict."""
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    norm = state.get("norm.weight")
    return depth, norm.shape[0] if norm is not None else None


def _architecture_hint(state: dict[str, torch.Tensor], model: nn.Module) -> str:
    depth, width = _source_shape(state)
    return f"source: depth {depth}, width {width}; model: depth {len(model.blocks)}, width {model.embed_dim}"


def _resample_pos_embed(pos_embed: torch.Tensor, model: nn.Module, source: str) -> tuple[torch.Tensor, str]:
    from timm.layers import resample_abs_pos_embed

    prefix = model.pos_embed_prefix_tokens
    old_tokens = pos_embed.shape[1] - prefix
    old_side = int(round(old_tokens**0.5))
    new_side = model.patch_embed.grid_size[0]
    if old_side * old_side != old_tokens or pos_embed.shape[-1] != model.embed_dim:
        raise UserError(
            f"{source}: pos_embed {list(pos_embed.shape)} does not fit a {new_side}×{new_side} grid with "
            f"{prefix} prefix token(s) and width {model.embed_dim}"
        )
    # plain bicubic when enlarging (as DeiT's finetuning code), antialiased when shrinking
    resampled = resample_abs_pos_embed(
        pos_embed, new_size=[new_side, new_side], old_size=[old_side, old_side], num_prefix_tokens=prefix,
        antialias=new_side < old_side,
    )
    return resampled, f"{old_side}×{old_side} → {new_side}×{new_side}"


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's hook for `pretrained=True` (`build_model_with_cfg(pretrained_filter_fn=...)`): the
    state dict, already unwrapped by timm, fitted to `model` as `adapt_state_dict` does."""
    return adapt_state_dict(state_dict, model)[0]


def options_in_state_dict(state_dict: dict[str, torch.Tensor], model_name: str) -> dict[str, bool]:
    """The switches (`SWITCHES`: the remedies, a patch head, a distillation token) that a plain
    state dict of `model_name`'s family holds the parameters of, under our names or the authors',
    e.g. `{"talking_heads": True}`, and the number of register tokens. A switch's parameters are
    those a model gains when it is on. ContraNorm has none: its scale must be named."""
    spec = get_spec(model_name)
    state = _convert_official(state_dict, spec.family, LoadReport("", ""))
    found: dict[str, bool | int] = {}
    for switch in SWITCHES:
        remedy = REMEDY_BY_NAME.get(switch)
        if remedy is not None and spec.family not in remedy.families:
            continue
        if switch in model_options(spec.name) and any(pattern.fullmatch(key) for pattern in _switch_keys(spec.name, switch) for key in state):
            found[switch] = True
    if found.pop("reg_tokens", False):
        found["reg_tokens"] = int(state["reg_token"].shape[1])
    return found


@functools.cache
def _switch_keys(model_name: str, switch: str) -> tuple[re.Pattern, ...]:
    """Patterns of the parameters `switch` adds to a model (any block index)."""
    with torch.device("meta"):
        on, off = (set(create_model(model_name, depth=1, **{switch: value}).state_dict()) for value in (True, False))
    return tuple(re.compile(re.escape(key).replace(r"blocks\.0\.", r"blocks\.\d+\.")) for key in sorted(on - off))
