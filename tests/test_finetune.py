"""Loading others' weights, `vitdeep finetune`, `vitdeep eval` and `vitdeep export`, for real."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from tests.launch import SMALL, deepspeed_cmd, metrics, ranks_cmd, refuses, run, single_cmd
from vitdeep.cli import main
from vitdeep.engine.checkpoint import complete_checkpoints, read_marker
from vitdeep.engine.weights import build_model, read_weights
from vitdeep.errors import UserError
from vitdeep.models import create_model
from vitdeep.models.checkpoints import adapt_state_dict
from vitdeep.models.layers import TalkingHeadsAttention

#: SMALL at 32 px: an 8×8 patch grid.
SMALL_32 = [*SMALL, "--img-size", "32"]


@pytest.fixture(scope="module")
def zero3_run(digit_shards, tmp_path_factory):
    """2 ranks, ZeRO-3 in fp32 (a ds_config of the user's own), one epoch with validation; the EMA
    decay of 1 keeps the initial weights, which makes the EMA's consolidation checkable exactly."""
    root = tmp_path_factory.mktemp("zero3")
    ds_config = root / "zero3_fp32.json"
    ds_config.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000},
    }))
    out = root / "run"
    run(ranks_cmd(["train", "--data", str(digit_shards), "--val", str(digit_shards), "--out", str(out), *SMALL_32,
                   "--epochs", "1", "--ds-config", str(ds_config), "--ema-decay", "1.0", "--no-ema-warmup",
                   "--mixup", "0", "--cutmix", "0"]))
    return out


@pytest.mark.slow
def test_eval_on_two_ranks_equals_one_rank_and_the_training_validation(zero3_run, digit_shards, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run(single_cmd(["eval", "--checkpoint", str(zero3_run), "--data", str(digit_shards), "--workers", "1", "--out", str(one)]))
    run(deepspeed_cmd(["eval", "--checkpoint", str(zero3_run), "--data", str(digit_shards), "--workers", "2", "--out", str(two)]))
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert one["count"] == two["count"] == 297 and one["world_size"] == 1 and two["world_size"] == 2
    assert one["top1"] == two["top1"] and sum(c["count"] for c in one["per_class"]) == 297
    trained = metrics(zero3_run, "val")[23]
    print(f"top-1 {one['top1']:.2f} (1 rank) = {two['top1']:.2f} (2 ranks); the run's own validation {trained['top1']:.2f}")
    assert one["top1"] == pytest.approx(trained["top1"], abs=1e-9)  # loading loses nothing


@pytest.mark.slow
def test_consolidated_ema_of_a_zero3_run(zero3_run):
    torch.manual_seed(0)  # the run's seed: the EMA with decay 1 is the initial model
    marker = read_marker(complete_checkpoints(zero3_run)[-1])
    initial = create_model(marker["model"], **marker["model_kwargs"]).state_dict()
    ema = read_weights(zero3_run, ema=True).state_dict
    trained = read_weights(zero3_run).state_dict
    assert set(ema) == set(initial)
    assert all(torch.equal(ema[k], initial[k]) for k in initial)
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_resampled_position_embedding_is_bicubic_of_the_source_grid(zero3_run):
    weights = read_weights(zero3_run)
    model, report = build_model(weights, img_size=64)
    source = weights.state_dict["pos_embed"]
    grid = source[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, -1)
    assert report.resampled == "8×8 → 16×16"
    assert torch.equal(model.pos_embed[:, :1], source[:, :1])  # the class token's slot is kept
    assert torch.allclose(model.pos_embed[:, 1:], expected, atol=1e-6)


@pytest.mark.slow
def test_finetune_at_64px_from_a_zero3_checkpoint(zero3_run, digit_shards, tmp_path, capsys):
    out = tmp_path / "ft"
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--from", str(zero3_run), "--data", str(digit_shards), "--out", str(out), *SMALL_32, "--img-size", "64",
              "--steps", "4", "--dry-run"])
    assert exit_info.value.code == 0 and "vitdeep finetune --dry-run" in capsys.readouterr().out and not out.exists()
    result = run(ranks_cmd(["finetune", "--from", str(zero3_run), "--data", str(digit_shards), "--out", str(out),
                            *SMALL_32, "--img-size", "64", "--steps", "4", "--freeze-blocks", "2",
                            "--ds-config", "zero2_bf16"]))
    assert "position embedding resampled 8×8 → 16×16" in result.stdout + result.stderr
    marker = read_marker(complete_checkpoints(out)[-1])
    assert marker["model_kwargs"]["img_size"] == 64 and marker["step"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["weight_decay"] == 1e-8 and config["optim"]["schedule"] == "constant"  # the recipe
    before, after = read_weights(zero3_run).state_dict, read_weights(out).state_dict
    frozen = "blocks.1.mlp.fc1.weight"  # kept as it was, in the run's bf16
    assert after[frozen].dtype == torch.float32 and torch.equal(before[frozen].bfloat16().float(), after[frozen])
    assert not torch.equal(before["blocks.3.mlp.fc1.weight"], after["blocks.3.mlp.fc1.weight"])

    def as_run(tensor: torch.Tensor) -> torch.Tensor:
        """The value the bf16 run started from (its fp32 master is the bf16 weight, widened)."""
        return tensor.bfloat16().float()

    depth = len({k.split(".")[1] for k in before if k.startswith("blocks.")})
    assert depth == 6 and set(after) == set(before)
    frozen_keys = [k for k in before if k.startswith(("patch_embed.", "blocks.0.", "blocks.1.")) or k == "cls_token"]
    trained_keys = [k for k in before if k.startswith(tuple(f"blocks.{i}." for i in range(2, depth))) or k.startswith("head.")]
    assert len(frozen_keys) > 20 and len(trained_keys) > 40
    changed = {k for k in frozen_keys + trained_keys if not torch.equal(as_run(before[k]), after[k])}
    assert not changed & set(frozen_keys), sorted(changed & set(frozen_keys))  # the embedding and blocks 0-1 kept
    assert set(trained_keys) <= changed, sorted(set(trained_keys) - changed)  # every tensor of blocks 2-5 and the head trained


@pytest.mark.slow
def test_export_loads_in_timm_with_the_checkpoints_logits(zero3_run, tmp_path):
    import vitdeep.models  # noqa: F401  (registers vitdeep_* with timm)

    path = tmp_path / "model.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(zero3_run), str(path)])
    assert exit_info.value.code == 0 and path.with_suffix(".json").is_file()
    name = read_marker(complete_checkpoints(zero3_run)[-1])["model"]
    from_timm = timm.create_model(f"vitdeep_{name}", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    ours, _ = build_model(read_weights(zero3_run))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_timm(x), ours.eval()(x))
    # an export builds the model it records whatever --model says (e.g. analyze --model X --compare it)
    for other_name in (f"vitdeep_{name}", "deit_small_12"):
        again, _ = build_model(read_weights(path), other_name)
        with torch.no_grad():
            assert torch.equal(again.eval()(x), ours(x)), other_name


def _timm_checkpoint(tmp_path: Path, twin: str, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A timm model saved the way DeiT's training script saves (wrapper, `module.`, args)."""
    torch.manual_seed(seed)
    model = timm.create_model(twin, img_size=32, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / f"{twin}.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 299,
                "args": argparse.Namespace(lr=5e-4)}, path)
    return model, path


@pytest.mark.parametrize("name, twin, options", [
    ("deit_tiny_12", "deit_tiny_patch16_224", {}),
    ("deit_tiny_12", "deit_tiny_patch16_224", {"attnscale": True, "featscale": True, "init_values": 1e-5}),
    ("cait_xxs24", "cait_xxs24_224", {"attnscale": True}),
])
def test_timm_state_dicts_load_and_give_timms_logits(tmp_path, name, twin, options):
    reference, path = _timm_checkpoint(tmp_path, twin)
    model, report = build_model(read_weights(path), name, img_size=32, **options)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (model.eval()(x) - reference(x)).abs().max().item()
    print(f"{twin} → {name} {options}: max |Δlogits| {diff:.1e}; identity: {len(report.identity)} tensors")
    assert diff < 1e-5
    assert bool(report.identity) == bool(options)


def _official_block_forward(block, omega, lamb1, lamb2):
    """Wang et al.'s ViT block: explicit AttnScale with `attn.lamb`, FeatScale terms added twice."""

    def forward(x):
        attn = block.attn
        B, N, C = x.shape
        h = block.norm1(x)
        q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        a = 1 / N + (a - 1 / N) * (1 + omega[None, :, None, None])
        y = attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
        y_d = y.mean(1, keepdim=True)
        y_h = y - y_d
        y_d, y_h = y_d * lamb1, y_h * lamb2
        y = y + y_d + y_h
        x = x + (y + y_d + y_h)
        return x + block.mlp(block.norm2(x))

    return forward


def test_official_attnscale_featscale_checkpoint_converts(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10).eval()
    state = dict(reference.state_dict())
    for i, block in enumerate(reference.blocks):
        omega, lamb1, lamb2 = torch.randn(3) * 0.5, torch.randn(192) * 0.1, torch.randn(192) * 0.1
        state[f"blocks.{i}.attn.lamb"], state[f"blocks.{i}.lamb1"], state[f"blocks.{i}.lamb2"] = omega, lamb1, lamb2
        block.forward = _official_block_forward(block, omega, lamb1, lamb2)
    path = tmp_path / "featscale_tiny.pth"
    torch.save({"model": state}, path)
    model, report = build_model(read_weights(path), "deit_tiny_12", img_size=32, attnscale=True, featscale=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (model.eval()(x) - reference(x)).abs().max().item()
    assert len(report.converted) == 36 and not report.identity
    assert diff < 1e-5


class GongAttention(torch.nn.Module):
    """Gong et al.'s attention (PatchVisionTransformer, `deit/models.py`), transcribed: talking
    heads as bias-free `proj_pre` / `proj_post`, the scale applied after q·kᵀ. (Their forward also
    returns a constant 0 beside the output, which their block ignores; dropped here.)"""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0, use_talk=True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = torch.nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = 0.0
        self.proj = torch.nn.Linear(dim, dim)
        self.proj_drop = torch.nn.Dropout(proj_drop)
        self.use_talk = use_talk
        if self.use_talk:
            self.proj_pre = torch.nn.Linear(num_heads, num_heads, bias=False)
            self.proj_post = torch.nn.Linear(num_heads, num_heads, bias=False)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if self.use_talk:
            attn = self.proj_pre(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        if self.use_talk:
            attn = self.proj_post(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


def _gong_block_forward(block):
    """Their `Block.forward` (no LayerScale), on a timm block whose `attn` is `GongAttention`."""

    def forward(x):
        x = x + block.drop_path1(block.attn(block.norm1(x)))
        return x + block.drop_path2(block.mlp(block.norm2(x)))

    return forward


def test_gong_checkpoint_with_their_talking_heads_loads(tmp_path):
    """A checkpoint in Gong et al.'s exact key layout (their attention in timm's ViT, their patch
    head, `model` / `model_ema` wrappers) gives their model's logits; the load report lists the
    conversion and nothing at identity."""
    torch.manual_seed(3)
    reference = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10).eval()
    for block in reference.blocks:
        gong = GongAttention(192, num_heads=3, qkv_bias=True)
        gong.qkv.load_state_dict(block.attn.qkv.state_dict())
        gong.proj.load_state_dict(block.attn.proj.state_dict())
        with torch.no_grad():
            gong.proj_pre.weight.copy_(torch.eye(3) + 0.3 * torch.randn(3, 3))
            gong.proj_post.weight.copy_(torch.eye(3) + 0.3 * torch.randn(3, 3))
        block.attn = gong
        block.forward = _gong_block_forward(block)
    reference.patch_head = torch.nn.Linear(192, 10)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = reference.state_dict()
    assert "blocks.0.attn.proj_pre.weight" in state and "blocks.0.attn.proj_pre.bias" not in state
    assert "blocks.11.attn.proj_post.weight" in state and "patch_head.weight" in state
    path = tmp_path / "vit_b12_gong.pth"
    torch.save({"model": state, "model_ema": state, "epoch": 399}, path)

    model, report = build_model(read_weights(path), "deit_tiny_12", img_size=32)  # switches read from the keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (model.eval()(x) - reference(x)).abs().max().item()
    print(f"Gong-format checkpoint → deit_tiny_12: max |Δlogits| {diff:.1e}; {report.lines()}")
    assert diff < 1e-5
    assert isinstance(model.blocks[0].attn, TalkingHeadsAttention) and model.patch_head is not None
    assert torch.equal(model.blocks[5].attn.proj_l.bias, torch.zeros(3))
    assert len(report.converted) == 24 and not report.identity and not report.fresh
    assert "converted: blocks.{0..11}.attn.proj_pre.weight → blocks.{0..11}.attn.proj_l.weight (bias 0), " \
           "blocks.{0..11}.attn.proj_post.weight → blocks.{0..11}.attn.proj_w.weight (bias 0)" in "\n".join(report.lines())
    ema, _ = build_model(read_weights(path, ema=True), "deit_tiny_12", img_size=32)
    with torch.no_grad():
        assert torch.equal(ema.eval()(x), model(x))


def test_heads_the_model_lacks_are_left_out_and_reported():
    """A checkpoint trained with ℓ_token (a patch head) finetunes into a model without one, and any
    checkpoint loads into a head-less feature model (timm's num_classes=0); other extra parameters
    stay an error."""
    source = create_model("deit_tiny_12", img_size=32, patch_size=8, num_classes=10, patch_head=True)
    state = source.state_dict()
    plain = create_model("deit_tiny_12", img_size=32, patch_size=8, num_classes=10)
    fitted, report = adapt_state_dict(dict(state), plain, "run", "vitdeep")
    plain.load_state_dict(fitted)
    assert report.dropped == ["patch_head.bias", "patch_head.weight"]
    assert any("left out: patch_head" in line for line in report.lines())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), source.eval()(x))
    features = create_model("deit_tiny_12", img_size=32, patch_size=8, num_classes=0)
    fitted, report = adapt_state_dict(dict(state), features, "run", "vitdeep")
    assert set(report.dropped) == {"head.bias", "head.weight", "patch_head.bias", "patch_head.weight"}
    with pytest.raises(UserError, match="has parameters this model lacks: dist_token"):
        adapt_state_dict({**state, "dist_token": torch.zeros(1, 1, 192)}, plain, "run", "vitdeep")


def test_timm_vit_large_loads_as_deit_large_24_with_depth_and_width_checks(tmp_path):
    """timm's ViT-L/16 (`vit_large_patch16_224`, the network Gong et al. finetune from ImageNet-22k)
    has exactly deit_large_24's keys and shapes (compared at full size on the meta device); a
    narrow copy with the real key names loads and gives timm's logits; at another depth or width
    the load fails with one line naming both."""
    with torch.device("meta"):
        timm_large = timm.create_model("vit_large_patch16_224")
        ours_large = create_model("deit_large_24")
    theirs, ours = timm_large.state_dict(), ours_large.state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
    assert len(ours_large.blocks) == 24 and ours_large.embed_dim == 1024

    torch.manual_seed(4)
    narrow = timm.create_model("vit_large_patch16_224", img_size=32, embed_dim=64, num_heads=4, num_classes=10).eval()
    with torch.no_grad():
        for p in narrow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "vit_large_patch16_224.pth"
    torch.save(narrow.state_dict(), path)
    model, report = build_model(read_weights(path), "deit_large_24", img_size=32, embed_dim=64, num_heads=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.eval()(x) - narrow(x)).abs().max().item() < 1e-5
    assert not report.identity and not report.converted
    for name, options, needle in (
        ("deit_large_12", {"embed_dim": 64, "num_heads": 4}, "source depth 24, width 64; model depth 12, width 64"),
        ("deit_large_24", {}, "source depth 24, width 64; model depth 24, width 1024"),
    ):
        with pytest.raises(UserError, match=re.escape(needle)) as error:
            build_model(read_weights(path), name, img_size=32, **options)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("source, extra, needle", [
    ("missing", [], "checkpoint not found"),
    ("garbage", [], "is not a checkpoint torch can read safely"),
    ("timm_small", ["--model", "deit_tiny_12"], "source depth 12, width 384; model depth 6, width 64"),
    ("timm_large", ["--model", "deit_large_12", "--depth", "12"], "source depth 24, width 64; model depth 12, width 64"),
    ("run", ["--img-size", "30"], "img_size=30 is not divisible by patch_size=4"),
])
@pytest.mark.slow
def test_bad_sources_exit_2(zero3_run, digit_shards, tmp_path, capsys, source, extra, needle):
    paths = {"missing": tmp_path / "nope.pth", "garbage": tmp_path / "garbage.pth", "run": zero3_run}
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    if source == "timm_small":
        paths[source] = _timm_checkpoint(tmp_path, "deit_small_patch16_224")[1]
    if source == "timm_large":
        torch.save(timm.create_model("vit_large_patch16_224", img_size=32, embed_dim=64, num_heads=4, num_classes=10).state_dict(),
                   tmp_path / "vit_large.pth")
        paths[source] = tmp_path / "vit_large.pth"
    out = tmp_path / "out"
    refuses(["finetune", "--from", str(paths[source]), "--data", str(digit_shards), "--out", str(out), *SMALL_32, *extra],
            capsys, needle, out)


#: The 2-rank ZeRO-2 run in tests/data: a deit_tiny_12 of depth 2, width 32, at 16 px.
PER_RANK_RUN = Path(__file__).parent / "data" / "per_rank_run"


def test_a_plain_state_dict_without_model_says_the_model_was_the_default(digit_shards, tmp_path, capsys):
    """Issue 26: the mismatch was reported against deit_small_24, which the user never named."""
    source = tmp_path / "tiny.pth"
    tiny = create_model("deit_tiny_12", depth=2, embed_dim=32, num_heads=2, img_size=16, patch_size=4, num_classes=10)
    torch.save({"model": tiny.state_dict()}, source)
    out = tmp_path / "out"
    common = ["--from", str(source), "--data", str(digit_shards), "--out", str(out), "--img-size", "16", "--dry-run"]
    refuses(["finetune", *common], capsys, f"--model deit_small_24 is the default, not read from {source}", out)
    error = refuses(["finetune", *common, "--model", "deit_base_12"], capsys, "model depth 12, width 768", out)
    assert "default" not in error


@pytest.mark.parametrize("named", [["--config", "deit_base_24_losses_512"], ["--model", "deit_base_24"]], ids=["recipe", "flag"])
@pytest.mark.parametrize("command", ["finetune", "plan"])
def test_a_finetune_named_another_model_than_its_source_is_refused(named, command, digit_shards, tmp_path, capsys):
    """Issue 26: a recipe for deit_base_24 from a deit_tiny_12 source labelled the source's 2-block,
    width-32 architecture deit_base_24; refused, naming where the name came from and the source."""
    out = tmp_path / "out"
    args = ["--from", str(PER_RANK_RUN), *named, "--data", str(digit_shards)]
    refuses([command, *args, *(["--out", str(out), "--dry-run"] if command == "finetune" else [])], capsys,
            f"the model is deit_base_24 (from {' '.join(named) if named[0] == '--config' else '--model'}), but --from "
            f"{PER_RANK_RUN} holds a deit_tiny_12 (depth 2, width 32)", out)
