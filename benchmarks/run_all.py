"""`make bench`: every benchmark group, one table, written to `benchmarks/results/<machine>.{json,md}`.

Groups (each also runs alone: `.venv/bin/python benchmarks/<module>.py`):

1. model_speed.py   vitdeep `deit_*_12` training step vs timm's identical ViT
2. remedies.py      step time with talking heads, AttnScale, FeatScale and the losses vs plain + CE
3. attnscale.py     fused AttnScale vs the explicit N×N form at 197 and 577 tokens: time, memory
4. engine.py        DeepSpeed ZeRO-2 bf16 step vs a plain PyTorch loop with autocast
5. utilisation.py   training FLOP/s over the measured matmul peak at depths 12/24/48
6. memory.py        activation checkpointing at depth 24/48; ZeRO stages per rank on 2 ranks
7. data_throughput  vitdeep's WebDataset loaders vs torchvision ImageFolder
8. compile_speed.py a training step through the engine with engine.compile() (`--compile`) vs eager
9. sample_randomness.py erasing, mixing and drop path drawn per sample (elastic runs) vs timm's per batch
10. data_throughput  per-core decode + augment: full-size / capped shards, reduced decoding, vs ImageFolder

Every row is a ratio against a baseline measured in the same process (the ZeRO rows: the same
2-rank run), with both absolute numbers beside it; times are medians of interleaved rounds after
warm-up, and the ratio's inter-quartile range over the rounds is printed with it. CPU machines
use small shapes (the whole run takes a few minutes on 2 cores), CUDA machines the paper's.

    .venv/bin/python benchmarks/run_all.py [--quick] [--smoke] [--threads N] [--only 1,3] [--out DIR] [--json FILE]

`--smoke` runs tiny shapes that only check the code (`benchmarks/gpu_check.sh --cpu-smoke`);
`--json FILE` writes the rows of any selection there (`gpu_check.sh` collects them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path

# DeepSpeed picks its accelerator from the environment; without a GPU it is the CPU.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import attnscale  # noqa: E402
import common  # noqa: E402
import compile_speed  # noqa: E402
import data_throughput  # noqa: E402
import engine  # noqa: E402
import memory  # noqa: E402
import model_speed  # noqa: E402
import remedies  # noqa: E402
import sample_randomness  # noqa: E402
import utilisation  # noqa: E402
from common import RESULTS, Row, Shapes, console, machine, print_rows  # noqa: E402

DATA_GROUP = "7 data pipeline"


def data_rows(s: Shapes) -> list[Row]:
    """The data issue's table (`data_throughput.run`) as rows; fewer photos and passes on CPU."""
    if s.device == "cuda":
        passes = 3
        rows = data_throughput.run(workers=min(8, os.cpu_count() or 2), passes=passes)
    else:
        passes = 2
        rows = data_throughput.run(images=768 if s.reps > 3 else 256, passes=passes)
    threads = torch.get_num_threads()
    out = []
    for r in rows:
        p = r["images"]
        out.append(Row(DATA_GROUP, f"{r['pipeline']}: vitdeep WebDataset vs torchvision ImageFolder", "torchvision",
                       r["torchvision_img_s"], "vitdeep", r["vitdeep_img_s"], "img/s",
                       note=f"{p['count']} real photos (JPEG, mean {p['width']}×{p['height']}), {r['img_size']} px, "
                            f"batch {r['batch']}, {r['workers']} workers; best of {passes} passes each",
                       extra={k: v for k, v in r.items() if k != "images"}))
    torch.set_num_threads(threads)
    return out


FEEDING_GROUP = "10 input cost per core"
#: The input issue's goals (vitdeep / ImageFolder on the same photos): capped shards on the bench
#: photos, reduced decoding on photos of 1,000 px or more.
FEEDING_GOALS = {1: (">=", 1.2), 3: (">=", 1.5)}


def feeding_rows(s: Shapes) -> list[Row]:
    """`data_throughput.run_feeding` as rows: per-core decode + augment rates, one worker."""
    images, passes = (512, 2) if s.reps > 3 else (128, 1)
    rows = data_throughput.run_feeding(images=images, passes=passes)
    torch.set_num_threads(1)
    out = []
    for index, r in enumerate(rows):
        p = r["images"]
        out.append(Row(FEEDING_GROUP, f"{r['pipeline']}: vitdeep vs torchvision ImageFolder on the originals", "torchvision",
                       r["torchvision_img_s_per_core"], "vitdeep", r["vitdeep_img_s_per_core"], "img/s",
                       goal=FEEDING_GOALS.get(index),
                       note=f"per core: {p['count']} photos (JPEG, mean {p['width']}×{p['height']}, {p['kbytes']} KB), {r['img_size']} px, "
                            f"DeiT's augmentation to uint8 batches of {r['batch']}, {r['workers']} worker; best of {passes} passes each",
                       extra={k: v for k, v in r.items() if k != "images"} | {"photos": p}))
    return out


GROUPS = {
    "1": ("1 model speed", model_speed.run),
    "2": ("2 remedy overhead", remedies.run),
    "3": ("3 AttnScale fused", attnscale.run),
    "4": ("4 engine overhead", engine.run),
    "5": ("5 utilisation", utilisation.run),
    "6": ("6 memory", memory.run),
    "7": (DATA_GROUP, data_rows),
    "8": ("8 compile", compile_speed.run),
    "9": (sample_randomness.GROUP, sample_randomness.run),
    "10": (FEEDING_GROUP, feeding_rows),
}
#: Run order: the in-process DeepSpeed engines after the plain models (they start a process
#: group and touch global state), the data loaders (worker processes) last.
ORDER = ("1", "2", "9", "3", "5", "6", "4", "8", "7", "10")


def markdown(rows: list[Row], info: dict, date: str, seconds: float, s: Shapes) -> str:
    threads = f", {info['threads']} thread{'s' if info['threads'] > 1 else ''}" if s.device == "cpu" else ""
    lines = [
        f"Measured on **{info['name']}**{threads}, torch {info['torch']}, {date}, with `make bench` "
        f"({seconds / 60:.1f} min). Ratio = vitdeep / baseline, median of interleaved rounds after warm-up; "
        "in brackets the inter-quartile range of the per-round ratio.",
        "",
        "| # | measurement | baseline | vitdeep | ratio | goal | |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        status = {"met": "met", "within noise": "within noise", "NOT met": "**not met**"}.get(r.status, "")
        lines.append(f"| {r.group.split()[0]} | {r.name} | {common.fmt(r.baseline, r.unit)} | {common.fmt(r.ours, r.unit)} | "
                     f"{r.ratio_text} | {r.goal_text} | {status} |")
    notes = [f"- {r.group.split()[0]} {r.name}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "Shapes and details:", "", *notes]
    gaps = [r for r in rows if r.status in ("NOT met", "within noise")]
    if gaps:
        lines += ["", "Goals not met on this machine:", ""]
        lines += [f"- {r.group.split()[0]} {r.name}: {r.ratio:.3f} (goal {r.goal_text}, {r.status})" for r in gaps]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="vitdeep benchmarks: every group, one table")
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds (a smoke run; results not written)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads on CPU (default 1)")
    parser.add_argument("--only", default="", help="comma-separated group numbers, e.g. 1,3 (results not written)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes that only check the code runs (results not written)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results files go")
    parser.add_argument("--json", type=Path, default=None, help="also write this selection's rows to this JSON file")
    args = parser.parse_args()

    common.configure_threads(args.threads)
    s = common.shapes(args.quick, smoke=args.smoke)
    info = machine()
    out = console()
    selected = [g for g in ORDER if not args.only or g in args.only.split(",")]
    out.print(f"[bold]vitdeep benchmarks[/] on {info['name']} ({s.device}, {info['threads']} thread(s)); groups {', '.join(selected)}")
    start = time.perf_counter()
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    failed: list[str] = []
    for key in selected:
        name, run = GROUPS[key]
        t0 = time.perf_counter()
        out.print(f"[dim]running {name} …")
        try:
            group_rows = run(s)
        except Exception:  # one broken group must not hide the others
            failed.append(name)
            out.print(f"[red]{name} failed:[/]\n{traceback.format_exc()}")
            group_rows = []
        seconds[name] = time.perf_counter() - t0
        out.print(f"[dim]{name}: {len(group_rows)} rows in {seconds[name]:.0f} s")
        rows += group_rows
    rows.sort(key=lambda r: int(r.group.split()[0]))
    total = time.perf_counter() - start
    date = dt.date.today().isoformat()
    print_rows(rows, f"vitdeep benchmarks — {info['name']} — {date} — {total / 60:.1f} min", out)

    record = {
        "machine": info, "date": date, "total_seconds": total, "group_seconds": seconds, "failed": failed,
        "shapes": {k: str(v) for k, v in common.asdict_shallow(s).items()},
        "rows": [r.to_dict() for r in rows],
    }
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=str, ensure_ascii=False) + "\n")
    if not args.quick and not args.only and not args.smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{info['slug']}.json").write_text(json.dumps(record, indent=1, default=str, ensure_ascii=False) + "\n")
        (args.out / f"{info['slug']}.md").write_text(markdown(rows, info, date, total, s))
        out.print(f"written: {args.out / (info['slug'] + '.json')} and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
