"""`vitdeep demo` end to end at a tiny budget: shards, two DeepSpeed runs, eval, analyze, summary."""

import dataclasses
import json

import pytest

from tests.launch import run, single_cmd
from vitdeep.commands.demo import RECIPE, VARIANTS
from vitdeep.config import load_config_file, resolve_config


def test_demo_recipe_is_a_valid_run_config():
    cfg = resolve_config(load_config_file(RECIPE))
    assert (cfg.model.model, cfg.model.embed_dim, cfg.model.img_size, cfg.model.patch_size) == ("deit_tiny_24", 64, 16, 4)
    assert VARIANTS["baseline"] != VARIANTS["remedies"]
    assert set(VARIANTS) == {"baseline", "remedies"}
    assert VARIANTS["baseline"] and all(weight == 0 for weight in VARIANTS["baseline"].values())  # CE only
    assert VARIANTS["remedies"]["cos_weight"] > 0 and VARIANTS["remedies"]["contrastive_weight"] > 0  # ℓ_cos + ℓ_cons
    for weights in VARIANTS.values():
        assert set(weights) <= set(dataclasses.asdict(cfg.loss))  # each one a loss option of the run config


@pytest.mark.slow
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
    assert metrics["crop_ratio"] == resolve_config(load_config_file(RECIPE)).augment.crop_ratio  # measured as evaluated
    assert (out / "oversmoothing.png").stat().st_size > 10_000
    for name, weights in VARIANTS.items():  # each run trained with its variant's losses; the summary reads its own run
        loss = json.loads((out / name / "config.json").read_text())["loss"]
        assert {key: loss[key] for key in weights} == weights, name
        assert summary[name]["top1"] == json.loads((out / name / "eval.json").read_text())["top1"], name
        assert summary[name]["last_layer_cossim"] == metrics["sources"][name]["cossim"][-1], name
        assert summary[name]["last_layer_attn_std"] == metrics["sources"][name]["attn_std"][-1], name
    assert "vitdeep demo" in result.stdout
