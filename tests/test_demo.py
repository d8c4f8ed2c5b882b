"""`vitdeep demo` end to end at a tiny budget: shards, two DeepSpeed runs, eval, analyze, summary."""

import json

from tests.launch import run, single_cmd
from vitdeep.demo import RECIPE, VARIANTS
from vitdeep.config import load_config_file, resolve_config


def test_demo_recipe_is_a_valid_run_config():
    cfg = resolve_config(load_config_file(RECIPE))
    assert (cfg.model.model, cfg.model.embed_dim, cfg.model.img_size, cfg.model.patch_size) == ("deit_tiny_24", 64, 16, 4)
    assert VARIANTS["baseline"] != VARIANTS["remedies"]


def test_demo_pipeline_at_a_tiny_budget(tmp_path):
    out = tmp_path / "demo"
    result = run(single_cmd(["demo", "--out", str(out), "--steps", "3"]), timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"baseline", "remedies", "seconds"}
    for name in VARIANTS:
        assert 0 <= summary[name]["top1"] <= 100 and -1 <= summary[name]["last_layer_cossim"] <= 1
        assert json.loads((out / name / "eval.json").read_text())["count"] == 297
        assert json.loads((out / name / "summary.json").read_text())["steps"] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sources"]) == {"baseline", "remedies"} and len(metrics["sources"]["baseline"]["cossim"]) == 25
    assert (out / "oversmoothing.png").stat().st_size > 10_000
    assert "vitdeep demo" in result.stdout
