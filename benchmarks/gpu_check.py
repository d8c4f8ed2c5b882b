"""The prepared GPU check (`make gpu-check`, `bash benchmarks/gpu_check.sh`): everything in vitdeep
that only a GPU exercises, in one command of at most 5 minutes on one CUDA GPU.

Stages, in order (a failed stage is recorded and the next ones still run; the exit status is 1 if
any stage failed or the whole check overran its budget, 2 if it cannot start):

1. shards      the 1,797 scikit-learn digits upscaled to 224 px (bicubic), written as PNG shards
2. train ×4    `vitdeep train` of `deit_small_24` under torchrun, 200 steps each, with
               `zero2_bf16`, `zero2_fp16` (a NaN injected into one loss: vitdeep's guard must skip
               it before the fp16 loss scaler sees it, so the scale is unchanged across it, and
               vitdeep's and DeepSpeed's step counts agree), `zero3_bf16`, `zero3_offload`. Each
               run records (`gpu_check_run.py`) NCCL, the fused AdamW, pinned batches, where the
               fp32 masters live (CPU and pinned for offload), the weights' dtype.
3. finetune    the `zero2_bf16` run at 384 px (`zero2_autocast_bf16`: the autocast mode on a GPU)
4. eval        the finetuned run on the 297 held-out digits (each exactly once)
5. export      `--ema` to safetensors; timm's `vitdeep_deit_small_24` must give vitdeep's logits
6. bench       `benchmarks/run_all.py --quick --only 1,2,3,4,8` on the CUDA shapes: DeiT-B/24
               images/s and MFU at 224 and 384 px against timm's twin, the remedies' overhead,
               fused vs explicit AttnScale at 577 and 1,025 tokens, the engine overhead rows
               (bf16 and autocast against a plain loop), `engine.compile()` against eager

Results: `benchmarks/results/gpu-<card>.json` and `.md` (`--out` to change), logs and runs under
`--work` (default `runs/gpu-check`).

Budget on one H100, estimated from published numbers (nothing here has run on a GPU yet: the
first run's per-stage seconds in the results file replace these guesses). DeiT-S/24 costs
3 × 9.2 GFLOP per image per training step; at 25-30 % of the 989 TFLOP/s bf16 peak that is
≈ 3,000 img/s, so the data loader sets the pace (8 workers decoding 224-px PNGs with DeiT's crop,
flip and colour jitter, RandAugment off; the vitdeep loader measured 430 img/s on 2 slow cores
with RandAugment on): ≈ 1,500 img/s, 200 steps × 64 images ≈ 9 s per run, `zero3_offload` ≈ 20 s
(a CPU AdamW step over 44 M parameters plus the PCIe copies, ≈ 100 ms). Each launch adds ≈ 17 s
(imports, NCCL, workers, a 0.7 GB checkpoint). Stages: shards 8 s; train 26 + 26 + 30 + 40 s;
finetune 25 s (one validation, raw and EMA); eval 10 s; export 12 s; bench ≈ 120 s (imports 8 s;
DeiT-B/24 built 13 times at ≈ 1.5 s; ≈ 11 timed steps per case at 45-80 ms; the first inductor
compile of DeiT-B/12's training step with the losses ≈ 40 s: B/24's would be ≈ 80 s). In all
≈ 300 s: tight. `--train-steps N` is the knob if a run overshoots (the check then fails with
"over the 300 s budget" and says which stage took the time). Hard stop: every stage's timeout is
cut so the check ends by 9 minutes, under the 10-minute limit of one device command.

`--cpu-smoke` runs the CPU-safe subset at tiny shapes (16-px digits, a 2-block width-64 DeiT,
2 CPU ranks, a few steps; `zero2_bf16` with the NaN, `zero3_bf16`, the autocast finetune — no
fp16, no offload — and the benchmarks' `--smoke` shapes without group 2), so `make test` keeps
this script working.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "gpu_check_run.py"
#: What the check may take on a GPU, and when every stage's timeout runs out (one device command
#: may run 10 minutes).
BUDGET_S, HARD_STOP_S = 300, 540


@dataclass(frozen=True)
class TrainSpec:
    ds_config: str
    inject: bool = False
    timeout_s: int = 120


@dataclass(frozen=True)
class Profile:
    name: str
    img_size: int
    finetune_size: int
    #: model and recipe options for every run (the digits at `img_size`)
    run_args: tuple[str, ...]
    ranks: int
    steps: int
    finetune_steps: int
    #: micro-batch index (on the last rank) whose loss becomes NaN in the run with `inject`
    inject_at: int
    #: validate the finetuning run at its epoch's end (raw and EMA: `PartitionedEma.applied()`)
    finetune_val: bool
    trains: tuple[TrainSpec, ...]
    finetune_ds: str
    bench_args: tuple[str, ...]
    budget_s: int | None
    #: every stage's timeout is cut to end the check by then (None: the stages' own timeouts)
    hard_stop_s: int | None
    workers: int
    timeouts: dict[str, int]


GPU = Profile(
    name="gpu", img_size=224, finetune_size=384,
    run_args=("--model", "deit_small_24", "--global-batch", "64", "--micro-batch", "64", "--lr", "3e-4",
              "--warmup-steps", "20", "--mixup", "0", "--cutmix", "0", "--rand-augment", "", "--log-every", "10"),
    ranks=1, steps=200, finetune_steps=30, inject_at=100, finetune_val=True,
    trains=(TrainSpec("zero2_bf16"), TrainSpec("zero2_fp16", inject=True), TrainSpec("zero3_bf16"),
            TrainSpec("zero3_offload", timeout_s=150)),
    finetune_ds="zero2_autocast_bf16", bench_args=("--quick", "--only", "1,2,3,4,8"), budget_s=BUDGET_S,
    hard_stop_s=HARD_STOP_S, workers=8,
    timeouts={"shards": 60, "finetune": 120, "eval": 60, "export": 60, "bench": 300},
)
SMOKE = Profile(
    name="cpu-smoke", img_size=16, finetune_size=24,
    run_args=("--model", "deit_tiny_12", "--depth", "2", "--embed-dim", "64", "--num-heads", "4", "--patch-size", "4",
              "--global-batch", "32", "--micro-batch", "16", "--lr", "2e-3", "--warmup-steps", "2", "--mixup", "0",
              "--cutmix", "0", "--rand-augment", "", "--reprob", "0", "--log-every", "1"),
    ranks=2, steps=4, finetune_steps=2, inject_at=3, finetune_val=False,
    trains=(TrainSpec("zero2_bf16", inject=True, timeout_s=300), TrainSpec("zero3_bf16", timeout_s=300)),
    finetune_ds="zero2_autocast_bf16", bench_args=("--smoke", "--only", "1,3,4,8"), budget_s=None,
    hard_stop_s=None, workers=1,
    timeouts={"shards": 120, "finetune": 300, "eval": 120, "export": 120, "bench": 400},
)


class CheckFailed(Exception):
    """A stage ran but what it produced is wrong."""


@dataclass
class Stage:
    name: str
    ok: bool = False
    seconds: float = 0.0
    facts: dict = field(default_factory=dict)
    error: str = ""


class Check:
    """Runs the stages of one profile in `work` and collects what they found."""

    def __init__(self, profile: Profile, work: Path) -> None:
        self.p, self.work = profile, work
        self.start = time.perf_counter()
        self.stages: list[Stage] = []
        self.python = sys.executable
        self.shards = work / "shards"
        (work / "logs").mkdir(parents=True, exist_ok=True)

    # -- running -----------------------------------------------------------------------------

    def timeout(self, seconds: int) -> int:
        """`seconds`, cut to end by the profile's hard stop."""
        if self.p.hard_stop_s is None:
            return seconds
        return max(1, min(seconds, int(self.p.hard_stop_s - (time.perf_counter() - self.start))))

    def stage(self, name: str, fn, *args) -> Stage:
        stage = Stage(name)
        t0 = time.perf_counter()
        try:
            stage.facts = fn(*args) or {}
            stage.ok = True
        except CheckFailed as error:
            stage.error = str(error)
        except subprocess.TimeoutExpired as error:
            stage.error = f"timed out after {error.timeout:.0f} s"
        except Exception as error:  # a broken stage must not hide the others
            stage.error = f"{type(error).__name__}: {error}"
        stage.seconds = time.perf_counter() - t0
        self.stages.append(stage)
        status = "ok" if stage.ok else f"FAILED: {stage.error}"
        print(f"[gpu-check] {name}: {status} ({stage.seconds:.0f} s)", flush=True)
        return stage

    def command(self, name: str, cmd: list[str], timeout: int, **env: str) -> None:
        """Run `cmd` (its output into logs/NAME.log); a timeout kills its whole process group."""
        log = self.work / "logs" / f"{re.sub(r'[^a-z0-9]+', '_', name.lower())}.log"
        timeout = self.timeout(timeout)
        with log.open("w") as handle:
            process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                       start_new_session=True)
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
        if code != 0:
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
            raise CheckFailed(f"exit code {code} ({log}): " + " | ".join(tail)[-600:])

    def launch(self, args: list[str]) -> list[str]:
        """torchrun: the lightest launcher (the deepspeed launcher imports DeepSpeed twice before the
        ranks start, 15-20 s here; it has its own tests)."""
        from vitdeep.engine.deepspeed import free_port

        return [self.python, "-m", "torch.distributed.run", "--nproc_per_node", str(self.p.ranks), "--master_port",
                str(free_port()), str(RUNNER), *args]

    # -- stages ------------------------------------------------------------------------------

    def write_shards(self) -> dict:
        from vitdeep.data.digits import write_digits_imagefolder
        from vitdeep.data.shards import write_shards

        counts = write_digits_imagefolder(self.work / "images", size=self.p.img_size)
        write_shards(self.work / "images", self.shards, shard_size="100", workers=8, overwrite=True)
        return {"images": counts, "img_size": self.p.img_size}

    def train(self, spec: TrainSpec) -> dict:
        out = self.work / f"train_{spec.ds_config}"
        args = ["train", "--data", str(self.shards), "--out", str(out), *self.p.run_args, "--img-size", str(self.p.img_size),
                "--steps", str(self.p.steps), "--save-every", str(10 * self.p.steps), "--workers", str(self.p.workers),
                "--ds-config", spec.ds_config]
        env = {"VITDEEP_CHECK_RECORD": str(out / "record")}
        if spec.inject:
            env["VITDEEP_CHECK_INJECT"] = str(self.p.inject_at)
        self.command(f"train {spec.ds_config}", self.launch(args), spec.timeout_s, **env)
        return self.check_run(out, self.p.steps, spec)

    def check_run(self, out: Path, steps: int, spec: TrainSpec) -> dict:
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [row for row in rows if row["kind"] == "train"]
        records = {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in (out / "record").glob("rank_*.json")}
        rank0 = records[0]
        injected = 1 if spec.inject else 0
        cuda = self.p.name == "gpu"
        facts = {key: rank0[key] for key in ("backend", "precision", "zero_stage", "weights_dtype", "optimizer",
                                              "fused_adamw", "masters_device", "masters_pinned", "first_batch_pinned",
                                              "engine_skipped_steps", "loss_scale_final", "peak_gpu_memory_gb")}
        facts.update(steps=summary["steps"], skipped_micro_batches=summary["skipped_steps"],
                     images_per_s=train[-1]["images_per_s"], first_ce=train[0]["ce"], last_ce=train[-1]["ce"])
        problems = []
        if summary["steps"] != steps or rank0["engine_global_steps"] != steps:
            problems.append(f"steps: vitdeep {summary['steps']}, DeepSpeed {rank0['engine_global_steps']}, planned {steps}")
        if summary["skipped_steps"] != injected:
            problems.append(f"{summary['skipped_steps']} micro-batches skipped by the NaN guard, expected {injected}")
        if not all(math.isfinite(row["loss"]) for row in train):
            problems.append("a logged loss is not finite")
        expected_dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(rank0["precision"], "torch.float32")
        if rank0["weights_dtype"] != expected_dtype:
            problems.append(f"weights are {rank0['weights_dtype']} under {rank0['precision']}")
        if rank0["backend"] != ("nccl" if cuda else "gloo"):
            problems.append(f"process group backend {rank0['backend']}")
        if not rank0["fused_adamw"] or (cuda and not rank0["first_batch_pinned"]):
            problems.append(f"fused AdamW {rank0['fused_adamw']}, pinned batches {rank0['first_batch_pinned']}")
        if "offload" in spec.ds_config and not (rank0["masters_device"] == "cpu" and rank0["masters_pinned"]):
            problems.append(f"offloaded fp32 masters on {rank0['masters_device']}, pinned {rank0['masters_pinned']}")
        if spec.inject:
            last = records[max(records)]
            around = last["loss_scale_around_injection"]
            facts["loss_scale_around_injection"] = around
            if not around or around[0] != around[1]:
                problems.append(f"the loss scale changed across the skipped NaN micro-batch: {around}")
            if rank0["engine_skipped_steps"] > 0.1 * steps:
                problems.append(f"DeepSpeed skipped {rank0['engine_skipped_steps']} of {steps} steps on overflow")
        if steps >= 100:
            head, tail = (sum(row["ce"] for row in part) / len(part) for part in (train[:3], train[-3:]))
            if not tail < head:
                problems.append(f"cross-entropy did not fall: {head:.3f} → {tail:.3f}")
        if problems:
            raise CheckFailed("; ".join(problems))
        return facts

    def finetune(self) -> dict:
        source, out = self.work / "train_zero2_bf16", self.work / "finetune"
        args = ["finetune", "--from", str(source), "--data", str(self.shards), "--out", str(out), *self.p.run_args,
                "--img-size", str(self.p.finetune_size), "--steps", str(self.p.finetune_steps),
                "--workers", str(self.p.workers), "--ds-config", self.p.finetune_ds]
        if self.p.finetune_val:
            args += ["--val", str(self.shards)]
        self.command("finetune", self.launch(args), self.p.timeouts["finetune"], VITDEEP_CHECK_RECORD=str(out / "record"))
        facts = self.check_run(out, self.p.finetune_steps, TrainSpec(self.p.finetune_ds))
        from vitdeep.engine.checkpoint import complete_checkpoints, read_marker

        marker = read_marker(complete_checkpoints(out)[-1])
        if marker["model_kwargs"]["img_size"] != self.p.finetune_size:
            raise CheckFailed(f"the finetuned checkpoint is at {marker['model_kwargs']['img_size']} px")
        if self.p.finetune_val:
            val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            val = [row for row in val if row["kind"] == "val"]
            if not val or not {"top1", "ema_top1"} <= set(val[0]):
                raise CheckFailed("the finetuning run logged no validation of the model and its EMA")
            facts.update(val_top1=val[0]["top1"], val_ema_top1=val[0]["ema_top1"])
        return facts

    def evaluate(self) -> dict:
        result = self.work / "eval.json"
        self.command("eval", [self.python, "-m", "vitdeep", "eval", "--checkpoint", str(self.work / "finetune"), "--data",
                              str(self.shards), "--workers", str(self.p.workers), "--out", str(result)],
                     self.p.timeouts["eval"])
        found = json.loads(result.read_text())
        if found["count"] != 297 or not 0 <= found["top1"] <= 100:
            raise CheckFailed(f"eval read {found['count']} of 297 images, top-1 {found['top1']}")
        return {k: found[k] for k in ("count", "top1", "top5", "loss") if k in found}

    def export(self) -> dict:
        import timm
        import torch

        from vitdeep.engine.weights import build_model, read_weights

        path = self.work / "export.safetensors"
        self.command("export", [self.python, "-m", "vitdeep", "export", str(self.work / "finetune"), str(path), "--ema"],
                     self.p.timeouts["export"])
        ours, _ = build_model(read_weights(path))
        theirs = timm.create_model(f"vitdeep_{read_weights(path).model}", pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(path)))
        x = torch.randn(2, 3, self.p.finetune_size, self.p.finetune_size)
        with torch.no_grad():
            difference = (ours.eval()(x) - theirs.eval()(x)).abs().max().item()
        if difference != 0:
            raise CheckFailed(f"timm's model gives other logits than vitdeep's (max difference {difference:.2e})")
        return {"bytes": path.stat().st_size}

    def bench(self) -> dict:
        rows = self.work / "bench.json"
        self.command("bench", [self.python, str(HERE / "run_all.py"), *self.p.bench_args, "--json", str(rows)],
                     self.p.timeouts["bench"])
        record = json.loads(rows.read_text())
        if record["failed"]:
            raise CheckFailed(f"benchmark groups failed: {', '.join(record['failed'])}")
        return record

    def run(self) -> None:
        self.stage("shards", self.write_shards)
        for spec in self.p.trains:
            self.stage(f"train {spec.ds_config}" + (" + NaN" if spec.inject else ""), self.train, spec)
        self.stage(f"finetune {self.p.finetune_size} px ({self.p.finetune_ds})", self.finetune)
        self.stage("eval", self.evaluate)
        self.stage("export + timm", self.export)
        self.stage("bench", self.bench)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def over_budget(self) -> bool:
        return self.p.budget_s is not None and self.seconds > self.p.budget_s


def write_results(check: Check, out: Path) -> tuple[Path, Path]:
    """`gpu-<card>.json` and `.md`: every stage with its seconds, facts or error, and the benchmark rows."""
    sys.path.insert(0, str(HERE))
    import common
    from run_all import markdown

    info = common.machine()
    bench = next((s.facts for s in check.stages if s.name == "bench" and s.ok), None)
    record = {
        "machine": info, "profile": check.p.name, "date": time.strftime("%Y-%m-%d"), "seconds": check.seconds,
        "budget_s": check.p.budget_s, "over_budget": check.over_budget,
        "passed": all(s.ok for s in check.stages) and not check.over_budget,
        "stages": [{"name": s.name, "ok": s.ok, "seconds": round(s.seconds, 1), "error": s.error,
                    "facts": s.facts if s.name != "bench" else {"rows": len(s.facts.get("rows", []))}} for s in check.stages],
        "bench": bench,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-" + (info["slug"] if check.p.name == "gpu" else "cpu-smoke")
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(record, indent=1, default=str, ensure_ascii=False) + "\n")
    lines = [f"`make gpu-check` on **{info['name']}** ({check.p.name}), {record['date']}: "
             f"{'passed' if record['passed'] else '**FAILED**'} in {check.seconds:.0f} s"
             + (f" (budget {check.p.budget_s} s)" if check.p.budget_s else ""), "",
             "| stage | result | seconds | what it found |", "|---|---|---:|---|"]
    for s in check.stages:
        found = s.error if not s.ok else ", ".join(f"{k} {v}" for k, v in s.facts.items() if k != "rows" and v is not None)
        if s.name == "bench" and s.ok:
            found = f"{len(s.facts['rows'])} rows, below"
        lines.append(f"| {s.name} | {'ok' if s.ok else '**failed**'} | {s.seconds:.0f} | {found} |")
    text = "\n".join(lines) + "\n"
    if bench:
        rows = [common.Row(**{k: v for k, v in r.items() if k not in ("ratio", "met", "status", "goal")},
                           goal=_goal(r["goal"])) for r in bench["rows"]]
        text += "\n" + markdown(rows, bench["machine"], bench["date"], bench["total_seconds"], common.shapes(smoke=check.p.name != "gpu"))
    md_path.write_text(text)
    return json_path, md_path


def _goal(text: str | None) -> tuple[str, float] | None:
    """A row's goal back from its printed form (`≥ 0.95`)."""
    if not text:
        return None
    op, value = text.split()
    return {"≥": ">=", "≤": "<="}[op], float(value)


def main() -> int:
    parser = argparse.ArgumentParser(description="vitdeep's prepared GPU check (make gpu-check)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the CPU-safe subset at tiny shapes on 2 CPU ranks")
    parser.add_argument("--work", type=Path, default=Path("runs/gpu-check"), help="runs, shards and logs")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; smoke: --work)")
    parser.add_argument("--train-steps", type=int, default=None, help="steps of each training run (GPU default 200): "
                        "the knob to rebalance the budget with")
    args = parser.parse_args()

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run `bash benchmarks/gpu_check.sh --cpu-smoke` for the CPU subset", file=sys.stderr)
        return 2
    profile = SMOKE if args.cpu_smoke else GPU
    if args.train_steps:
        profile = replace(profile, steps=args.train_steps, inject_at=min(profile.inject_at, args.train_steps // 2))
    check = Check(profile, args.work.resolve())
    check.run()
    json_path, md_path = write_results(check, args.out or (args.work if args.cpu_smoke else HERE / "results"))
    failed = [s.name for s in check.stages if not s.ok]
    verdict = "passed" if not failed and not check.over_budget else "FAILED"
    detail = (f"; failed: {', '.join(failed)}" if failed else "") + (
        f"; over the {profile.budget_s} s budget" if check.over_budget else "")
    print(f"[gpu-check] {verdict} in {check.seconds:.0f} s{detail}; results: {json_path} and {md_path}", flush=True)
    return 0 if verdict == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
