"""Over-smoothing diagnostics at known values, streaming, the training hook, ℓ_cos on real images,
and `vitdeep analyze` end to end (random init and a trained checkpoint, bad input)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.launch import refuses
from vitdeep.analysis import (
    OversmoothingAccumulator,
    OversmoothingMetrics,
    high_frequency_ratio,
    layer_curves,
    layerwise_attention_std,
    layerwise_cosine_similarity,
    layerwise_high_frequency_ratio,
    measure_model,
    oversmoothing_metrics,
)
from vitdeep.cli import main
from vitdeep.commands.analyze import iter_image_batches, list_images, resolve_image_source
from vitdeep.losses import Objective, ObjectiveConfig, patch_cosine_similarity
from vitdeep.models import create_model
from vitdeep.planner.measure import peak_above_start
from vitdeep.plots import oversmoothing_figure

#: A deit_tiny_24-shaped model, narrow enough for two CPU cores: 24 blocks, width 64, 16 patches.
TINY = dict(embed_dim=64, num_heads=4, img_size=16, patch_size=4, num_classes=10)
TINY_FLAGS = ["--model", "deit_tiny_24", "--embed-dim", "64", "--num-heads", "4", "--img-size", "16", "--patch-size", "4", "--num-classes", "10"]
TRAIN_STEPS = 30


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only add synchronisation, and they stall for
    seconds per step when other processes hold the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- metrics at known values -------------------------------------------------------------------


def test_attention_std_known_values():
    n = 17
    uniform = torch.full((2, 3, n, n), 1.0 / n)
    one_hot = torch.eye(n).expand(2, 3, n, n)
    values = layerwise_attention_std([uniform, one_hot])
    assert values[0].item() == pytest.approx(0.0, abs=1e-8)
    assert values[1].item() == pytest.approx(math.sqrt(n - 1) / n, abs=1e-7)


def test_layerwise_cossim_per_layer_and_without_prefix_tokens():
    h = torch.randn(1, 1, 8, generator=_gen())
    identical = torch.cat([torch.randn(2, 1, 8, generator=_gen(1)), h.expand(2, 6, 8)], dim=1)  # class token differs
    opposite = torch.cat([torch.zeros(2, 1, 8), h.expand(2, 1, 8), -h.expand(2, 1, 8)], dim=1)
    random = torch.randn(2, 7, 8, generator=_gen(2))
    values = layerwise_cosine_similarity([identical, opposite, random], num_prefix_tokens=1)
    assert values[:2].tolist() == pytest.approx([1.0, -1.0], abs=1e-6)
    assert values[2].item() == pytest.approx(patch_cosine_similarity(random[:, 1:]).mean().item(), abs=1e-7)


def test_high_frequency_ratio_known_values():
    h = torch.randn(1, 1, 8, generator=_gen(3))
    assert high_frequency_ratio(h.expand(2, 5, 8)).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    zero_mean = torch.randn(2, 6, 8, generator=_gen(4))
    zero_mean = zero_mean - zero_mean.mean(1, keepdim=True)
    assert high_frequency_ratio(zero_mean).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    x = torch.randn(3, 6, 8, generator=_gen(5))
    expected = ((x - x.mean(1, keepdim=True)) ** 2).sum((1, 2)) / (x**2).sum((1, 2))
    assert layerwise_high_frequency_ratio([x]).item() == pytest.approx(expected.mean().item(), abs=1e-6)


def _tiny_model(seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("deit_tiny_24", **{**TINY, **options})


def test_streaming_over_batches_equals_one_pass():
    model = _tiny_model().eval()
    images = torch.randn(20, 3, 16, 16, generator=_gen(6))
    streamed = OversmoothingAccumulator()
    with torch.no_grad():
        for chunk in images.split([2, 11, 7]):
            streamed.update(layer_curves(model, chunk), len(chunk))
        whole = model(images, aux=True, attention=True)
    metrics = streamed.compute()
    assert metrics.num_images == 20 and len(metrics.cossim) == 25 and len(metrics.attn_std) == 24
    assert metrics.cossim == pytest.approx(layerwise_cosine_similarity(whole.tokens, 1).tolist(), abs=1e-6)
    assert metrics.attn_std == pytest.approx(layerwise_attention_std(whole.attentions).tolist(), abs=1e-7)
    assert metrics.hf_ratio == pytest.approx(layerwise_high_frequency_ratio(whole.tokens, 1).tolist(), abs=1e-6)
    assert set(streamed.sums) == {"cossim", "attn_std", "hf_ratio"}  # memory: one vector per metric


def test_training_hook_is_bounded_and_restores_mode():
    model = _tiny_model(drop_path_rate=0.1).train()
    images = torch.randn(40, 3, 16, 16, generator=_gen(7))
    metrics = oversmoothing_metrics(model, images, max_images=8)
    assert model.training
    assert {"cossim/layer_00", "cossim/layer_24", "cossim/last", "attn_std/layer_01", "attn_std/last", "hf_ratio/last"} <= set(metrics)
    assert "attn_std/layer_00" not in metrics and len(metrics) == 25 + 24 + 25 + 3
    assert metrics["cossim/last"] == metrics["cossim/layer_24"]
    with torch.no_grad():
        expected = layerwise_cosine_similarity(model.eval()(images[:8], aux=True).tokens, 1)[-1].item()
    assert metrics["cossim/last"] == pytest.approx(expected, abs=1e-6)  # eval mode, first 8 images only


# ---- ℓ_cos on real images ----------------------------------------------------------------------


def _digits(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    paths = sorted(root.rglob("*.png"))
    images = torch.cat(list(iter_image_batches(paths, 16, 512)))
    return images, torch.tensor([int(p.parent.name) for p in paths])


def _train(images: torch.Tensor, labels: torch.Tensor, cos_weight: float) -> torch.nn.Module:
    """TRAIN_STEPS AdamW steps on CE (+ ℓ_cos); same init, same batches for every weight."""
    model = _tiny_model()
    objective = Objective(ObjectiveConfig(cos_weight=cos_weight, contrastive_weight=0.0, patch_mix_weight=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _gen(0)
    for _ in range(TRAIN_STEPS):
        index = torch.randint(0, len(images), (32,), generator=batches)
        loss, _ = objective(model(images[index], aux=True), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(digits_dir):
    """Models trained with and without ℓ_cos, and the held-out digits."""
    train_images, train_labels = _digits(digits_dir / "train")
    val_images, _ = _digits(digits_dir / "val")
    models = {weight: _train(train_images, train_labels, weight) for weight in (0.0, 1.0)}
    return models, val_images


def test_cos_loss_lowers_last_layer_cossim_on_real_images(trained):
    models, val_images = trained
    without = oversmoothing_metrics(models[0.0], val_images, max_images=len(val_images))
    with_cos = oversmoothing_metrics(models[1.0], val_images, max_images=len(val_images))
    print(f"last-layer CosSim on {len(val_images)} held-out digits after {TRAIN_STEPS} steps: "
          f"without ℓ_cos {without['cossim/last']:.4f}, with ℓ_cos {with_cos['cossim/last']:.4f}")
    assert with_cos["cossim/last"] < without["cossim/last"] - 0.1


# ---- vitdeep analyze ---------------------------------------------------------------------------


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", *args])
    return exit_info.value.code


def _load_results(report: dict) -> dict[str, OversmoothingMetrics]:
    fields = ("cossim", "attn_std", "hf_ratio", "num_images")
    return {label: OversmoothingMetrics(**{k: entry[k] for k in fields}) for label, entry in report["sources"].items()}


def test_analyze_trained_checkpoint_against_random_init(trained, digits_dir, tmp_path):
    models, _ = trained
    checkpoint = tmp_path / "with_cos.pt"
    torch.save(models[1.0].state_dict(), checkpoint)
    out = tmp_path / "analysis"
    args = [*TINY_FLAGS, "--checkpoint", str(checkpoint), "--compare", "random init=deit_tiny_24",
            "--images", str(digits_dir / "val"), "--num-images", "96", "--batch-size", "40", "--out", str(out)]
    assert _run(args) == 0

    report = json.loads((out / "metrics.json").read_text())
    assert list(report["sources"]) == [str(checkpoint), "random init"]
    for entry in report["sources"].values():
        assert entry["num_images"] == 96
        assert len(entry["cossim"]) == 25 and len(entry["hf_ratio"]) == 25 and len(entry["attn_std"]) == 24
        assert all(isinstance(v, float) and math.isfinite(v) for v in entry["cossim"] + entry["attn_std"] + entry["hf_ratio"])
    trained_entry, random_entry = report["sources"].values()
    sample = torch.cat(list(iter_image_batches(list_images(digits_dir / "val", 96), 16, 96)))
    direct = oversmoothing_metrics(models[1.0], sample, max_images=96)
    assert trained_entry["cossim"][-1] == pytest.approx(direct["cossim/last"], abs=1e-5)  # checkpoint loaded, streamed
    assert trained_entry["attn_std"][-1] == pytest.approx(direct["attn_std/last"], abs=1e-6)
    assert abs(trained_entry["attn_std"][-1] - random_entry["attn_std"][-1]) > 1e-3

    png = Image.open(out / "oversmoothing.png")
    assert png.width >= 1200 and png.height >= 400 and np.asarray(png.convert("L")).std() > 5
    figure = oversmoothing_figure(_load_results(report))
    axes = figure.axes
    assert len(axes) == 3
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert len(ax.get_lines()) == 2  # one line per source
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [str(checkpoint), "random init"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0}).Reload()
    assert "cossim/random init" in events.Tags()["scalars"] and events.Tags()["images"] == ["oversmoothing"]
    assert [e.step for e in events.Scalars("attn_std/random init")] == list(range(1, 25))


def test_analyze_random_init_single_model(digits_dir, tmp_path, capsys):
    out = tmp_path / "random"
    assert _run([*TINY_FLAGS, "--images", str(digits_dir / "val"), "--num-images", "40", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    (entry,) = report["sources"].values()
    assert entry["num_images"] == 40 and entry["checkpoint"] is None and entry["model"] == "deit_tiny_24"
    assert (out / "oversmoothing.png").stat().st_size > 10_000
    assert "deit_tiny_24 random init" in capsys.readouterr().out  # the summary table


@pytest.fixture()
def empty_dir(tmp_path):
    folder = tmp_path / "empty" / "cat"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    return folder.parent


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
        (["--images", "{empty}"], "no images"),
        (["--num-images", "0"], "--num-images must be >= 1, got 0"),
        (["--compare", "nowhere.pt"], "neither a checkpoint nor a model name"),
        (["--checkpoint", "{bad_ckpt}"], "does not fit the model: source depth 12, width 192; model depth 24, width 64"),
        (["-O", "embed_dim"], "not KEY=VALUE"),
    ],
)
def test_analyze_bad_input_exits_2_and_writes_nothing(extra, needle, digits_dir, empty_dir, tmp_path, capsys):
    bad_ckpt = tmp_path / "other.pt"
    if "{bad_ckpt}" in extra:  # a deit_tiny_12 state dict, only where this case uses one
        torch.save(create_model("deit_tiny_12", img_size=16, patch_size=4, num_classes=10).state_dict(), bad_ckpt)
    extra = [arg.format(empty=empty_dir, bad_ckpt=bad_ckpt) for arg in extra]
    images = [] if "--images" in extra else ["--images", str(digits_dir / "val")]
    out = tmp_path / "out"
    refuses(["analyze", *TINY_FLAGS, *images, "--num-images", "8", *extra, "--out", str(out)], capsys, needle, out)


def test_image_sources_crop_as_asked(digit_shards, digits_dir):
    """The crop ratio reaches both image pipelines: 1.0 keeps the whole scan, 0.5 zooms into the
    bright strokes in its middle (the dark border is cropped away)."""
    def first_batch(**source) -> torch.Tensor:
        return next(resolve_image_source(num_images=8, batch_size=8, **source).batches(16))

    for source in ({"images": None, "data": str(digit_shards)}, {"images": digits_dir / "val", "data": None}):
        whole, zoomed = first_batch(**source, crop_ratio=1.0), first_batch(**source, crop_ratio=0.5)
        assert whole.shape == zoomed.shape == (8, 3, 16, 16)
        assert zoomed.mean() > whole.mean() + 0.5


def test_analyze_memory_holds_one_attention_map_at_a_time():
    """analyze (`measure_model`) reduces each layer inside the block loop: a batch of 48 costs a
    few of one block's attention maps over a batch of 1, where keeping all 24 maps of the batch
    would cost 24. Measured as the peak of tensor storage (torch's allocation events)."""
    depth, heads, img, patch, batch = 24, 4, 64, 4, 48
    tokens = (img // patch) ** 2 + 1
    one_map = batch * heads * tokens * tokens * 4  # fp32 [B, H, N, N]: 51 MB
    model = create_model("deit_tiny_24", embed_dim=64, num_heads=heads, img_size=img, patch_size=patch, num_classes=10).eval()
    images = torch.rand(batch, 3, img, img)

    def peak(images: torch.Tensor) -> int:
        return peak_above_start(lambda: measure_model(model, [images]), torch.device("cpu"))

    baseline, peak_of_batch = peak(images[:1]), peak(images)
    growth = peak_of_batch - baseline
    print(f"analyze tensor peak: {baseline / 2**20:.1f} MiB at batch 1, {peak_of_batch / 2**20:.0f} MiB at batch {batch} "
          f"(one block's attention maps {one_map / 2**20:.0f} MiB, all {depth}: {depth * one_map / 2**20:.0f} MiB)")
    assert one_map < growth < 6 * one_map  # all 24 maps kept: > 24 * one_map
