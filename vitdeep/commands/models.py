"""`vitdeep models`: the zoo as a table, read from the registry."""

from __future__ import annotations

from rich.table import Table

from vitdeep.architecture import DEFAULT_IMG_SIZE, DEFAULT_PATCH_SIZE, REMEDIES
from vitdeep.models.registry import MODELS, get_spec, model_stats
from vitdeep.monitor import make_console


def print_model_table(names: list[str] | None = None, img_size: int = DEFAULT_IMG_SIZE, patch_size: int = DEFAULT_PATCH_SIZE) -> None:
    """Depth, width, heads, parameters and forward GFLOPs of all models, or the named ones; below
    the table, the over-smoothing remedies every model takes as options (`REMEDIES`)."""
    specs = [get_spec(name) for name in names] if names else list(MODELS.values())
    title = f"vitdeep models at {img_size}px, patch {patch_size} (forward GFLOPs per image, multiply-add = 2)"
    table = Table(title=title)
    for column in ("name", "depth", "width", "heads", "params (M)", "GFLOPs", "timm twin"):
        table.add_column(column, justify="left" if column in ("name", "timm twin") else "right", no_wrap=True)
    for spec in specs:
        params, flops = model_stats(spec.name, img_size, patch_size=patch_size)
        table.add_row(
            spec.name, str(spec.depth), str(spec.embed_dim), str(spec.num_heads),
            f"{params / 1e6:.1f}", f"{flops / 1e9:.2f}", spec.timm_twin or "",
        )
    table.caption = "remedies (train / analyze flags, create_model options): " + ", ".join(_remedy_label(r) for r in REMEDIES)
    make_console().print(table)


def _remedy_label(remedy) -> str:
    flag = "--" + remedy.name.replace("_", "-") + ("" if remedy.kind is bool else " N" if remedy.kind is int else " S")
    return flag + ("" if len(remedy.families) > 1 else f" ({', '.join(remedy.families)} only)")
