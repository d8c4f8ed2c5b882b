"""`vitdeep demo` (`make demo`): the main job end to end on the built-in digits, in minutes.

Writes the demo shards, trains the recipe `recipes/demo_digits.yaml` twice under the DeepSpeed
launcher (same seed and budget: CE only, then with the over-smoothing remedies), evaluates both
on the held-out digits, compares their layer-wise over-smoothing, and summarises:
`OUT/summary.json`, `OUT/oversmoothing.png`, `OUT/metrics.json` and one run folder per variant.
A rerun into the same OUT replaces all of it (the marker `OUT/.vitdeep-demo` says the demo wrote
it); in a folder the demo did not write, existing names are replaced only with `overwrite`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from vitdeep.errors import UserError
from vitdeep.launcher import default_ds_config, deepspeed_command, launcher_env, option_flags
from vitdeep.recipebook import RECIPE_DIR

RECIPE = RECIPE_DIR / "demo_digits.yaml"
#: The two runs: identical but for the loss terms (the paper's ℓ_cos + ℓ_cons against CE only).
VARIANTS = {
    "baseline": {"cos_weight": 0.0, "contrastive_weight": 0.0, "patch_mix_weight": 0.0},
    "remedies": {"cos_weight": 1.0, "contrastive_weight": 1.0, "patch_mix_weight": 0.0},
}
#: Left in OUT when the demo starts, so that a rerun knows the outputs there are its own.
MARKER = ".vitdeep-demo"


def _launch(out: Path, name: str, shards: Path, ranks: int, extra: list[str]) -> None:
    """One training run under the deepspeed launcher (CPU ranks over gloo without a GPU); a demo
    run again replaces its earlier runs, as it rewrites its shards."""
    cmd = deepspeed_command([
        "train", "--config", str(RECIPE), "--data", str(shards), "--val", str(shards), "--out", str(out / name),
        "--ds-config", default_ds_config(), "--overwrite", *option_flags(VARIANTS[name]), *extra,
    ], ranks)
    print(f"\n[demo] {name}: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, env=launcher_env()).returncode != 0:
        raise UserError(f"the {name} training run failed (see its output above)")


def run_demo(out: str | Path = "runs/demo", ranks: int = 2, extra: list[str] | None = None, overwrite: bool = False) -> dict:
    """Shards → two DeepSpeed runs → evaluation → over-smoothing comparison → summary."""
    from vitdeep.commands.analyze import analysis_paths, run_analyze
    from vitdeep.config import load_config_file, resolve_config
    from vitdeep.commands.eval import run_eval
    from vitdeep.commands.shards import run_demo_shards
    from vitdeep.paths import write_json_atomic
    from vitdeep.monitor import make_console
    from vitdeep.paths import check_output_dir, claim_outputs

    start = time.perf_counter()
    out = Path(out)
    check_output_dir(out, "--out")
    shards = out / "shards"
    if not (out / MARKER).is_file():
        outputs = [shards, *(out / name for name in VARIANTS), out / "summary.json", *analysis_paths(out).values()]
        claim_outputs(outputs, [], flag="--out", overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    run_demo_shards(shards, overwrite=True)
    for name in VARIANTS:
        _launch(out, name, shards, ranks, list(extra or ()))

    recipe = resolve_config(load_config_file(RECIPE))
    results = {}
    for name in VARIANTS:
        evaluation = run_eval(str(out / name), str(shards), out=out / name / "eval.json", overwrite=True,
                              crop_ratio=recipe.augment.crop_ratio, workers=recipe.data.workers)
        results[name] = {"top1": evaluation.top1}
    metrics = run_analyze(
        model=None, checkpoint=None, images=None, data=str(shards), out=out,
        compare=[f"{name}={out / name}" for name in VARIANTS], num_images=1000, crop_ratio=recipe.augment.crop_ratio,
        overwrite=True,
    )
    for name in VARIANTS:
        results[name]["last_layer_cossim"] = metrics[name].cossim[-1]
        results[name]["last_layer_attn_std"] = metrics[name].attn_std[-1]
    summary = {**results, "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(out / "summary.json", summary)
    _print_summary(make_console(), summary, out)
    return summary


def _print_summary(console, summary: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title="vitdeep demo: 24-block ViT on held-out digits, same seed and budget")
    for column in ("run", "losses", "top-1 %", "last-layer patch CosSim", "last-layer attention std"):
        table.add_column(column, justify="left" if column in ("run", "losses") else "right")
    for name, weights in VARIANTS.items():
        losses = "CE" + "".join(f" + {term}" for term, key in (("ℓ_cos", "cos_weight"), ("ℓ_cons", "contrastive_weight"), ("ℓ_token", "patch_mix_weight")) if weights[key])
        row = summary[name]
        table.add_row(name, losses, f"{row['top1']:.1f}", f"{row['last_layer_cossim']:.3f}", f"{row['last_layer_attn_std']:.4f}")
    console.print(table)
    console.print(f"{summary['seconds']:.0f} s; wrote {out / 'summary.json'}, {out / 'oversmoothing.png'}, {out / 'metrics.json'}")
    console.print_json(data=summary)
