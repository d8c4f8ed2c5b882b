"""CPU threads of one training process, on quiet cores and beside one busy core.

A single-process CPU run (`vitdeep train` without a launcher) starts one torch thread per usable
core. torch's OpenMP threads spin while they wait for each other (libgomp's default), so when
another process holds one of the cores every parallel region waits for a descheduled thread: a
training step can run several times slower than on one thread. `OMP_WAIT_POLICY=PASSIVE` (the
`vitdeep` command's default unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set) lets waiting threads
sleep. Each setting runs in its own process (libgomp reads its environment once), quiet and then
beside a busy-loop process; training images/s of AdamW steps on a 24-block width-64 ViT at 32 px,
batch 32, the best of three passes.

    .venv/bin/python benchmarks/cpu_threads.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

STEP = r"""
import sys, time, torch
from vitdeep.models import create_model
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
model = create_model("deit_tiny_24", img_size=32, patch_size=4, embed_dim=64, num_heads=4, num_classes=10)
optimizer = torch.optim.AdamW(model.parameters())
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
def step():
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
for _ in range(3):
    step()
best = 0.0
for _ in range(3):
    start = time.perf_counter()
    for _ in range(5):
        step()
    best = max(best, 5 * 32 / (time.perf_counter() - start))
print(best)
"""

#: (label, threads, environment added)
SETTINGS = [
    ("all usable cores, OpenMP threads spin while waiting (libgomp's default)", None, {}),
    ("all usable cores, OMP_WAIT_POLICY=PASSIVE (vitdeep's default)", None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("1 thread", 1, {}),
]


def rate(threads: int, extra: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", STEP, str(threads)], env={**env, **extra}, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def run() -> list[tuple[str, float, float]]:
    from vitdeep.cores import usable_cores

    cores = usable_cores()
    quiet = [rate(threads or cores, extra) for _, threads, extra in SETTINGS]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        loaded = [rate(threads or cores, extra) for _, threads, extra in SETTINGS]
    finally:
        hog.kill()
        hog.wait()
    return [(label, q, b) for (label, _, _), q, b in zip(SETTINGS, quiet, loaded)]


def main() -> None:
    from vitdeep.cores import usable_cores

    print(f"| threads of one training process ({usable_cores()} usable cores) | quiet (img/s) | one core busy (img/s) |")
    print("|---|---:|---:|")
    for label, quiet, loaded in run():
        print(f"| {label} | {quiet:.0f} | {loaded:.0f} |")


if __name__ == "__main__":
    main()
