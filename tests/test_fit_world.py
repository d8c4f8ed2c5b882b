"""`vitdeep fit-world` and the launch scripts that ask it: a run requeued on another allocation goes
on on the most ranks its lanes fit (the scripts are run for real, with a stand-in for srun)."""

import json
from pathlib import Path

import pytest

from tests.test_multinode import BIN, _slurm_env, refused, script
from vitdeep.commands.fit_world import fit_world
from vitdeep.engine.markers import MARKER, tag_for
from vitdeep.errors import UserError


def _run_with_checkpoint(out: Path, world_size: int, lanes: int | None, global_batch: int = 1024, step: int = 300) -> Path:
    """A run directory whose newest checkpoint marker was written by `world_size` ranks (in the lane
    order when `lanes` is given, else in the per-rank order of runs before it)."""
    path = out / "checkpoints" / tag_for(step)
    path.mkdir(parents=True)
    marker = {"step": step, "epoch": 1, "batch_in_epoch": 0, "model": "deit_base_24", "model_kwargs": {}, "zero_stage": 2,
              "world_size": world_size, "config": {}}
    if lanes is not None:
        marker["stream"] = {"format": "lanes-1", "lanes": lanes, "global_batch": global_batch, "paired": True, "shuffle_buffer": 256}
    (path / MARKER).write_text(json.dumps(marker))
    return out


def test_fit_world_takes_the_most_ranks_the_lanes_fit_on_the_fewest_nodes(tmp_path):
    run = _run_with_checkpoint(tmp_path / "run", 16, lanes=64)
    assert fit_world(run, 3, 8)[:2] == (2, 8)
    assert fit_world(run, 4, 8)[:2] == (4, 8)
    assert fit_world(run, 5, 6)[:2] == (4, 4)
    assert fit_world(run, 1, 3)[:2] == (1, 2)
    nodes, gpus, why = fit_world(run, 3, 8)
    assert "64 lanes (1, 2, 4, 8, 16, 32 ranks fit): resuming on 16 ranks, 2 node(s) × 8, of the 3 × 8 allocated" in why
    assert fit_world(tmp_path / "new", 3, 8) == (3, 8, None), "a new run takes the whole allocation"


def test_fit_world_keeps_a_run_of_the_per_rank_order_on_its_own_size_and_refuses_what_cannot_fit(tmp_path):
    old = _run_with_checkpoint(tmp_path / "old", 16, lanes=None)
    assert fit_world(old, 4, 8)[:2] == (2, 8)
    with pytest.raises(UserError, match="resumes on 16 ranks: 1 node\\(s\\) × 8 GPU\\(s\\) hold none of them"):
        fit_world(old, 1, 8)


def test_a_requeued_slurm_job_starts_the_most_ranks_the_run_fits(tmp_path):
    run = _run_with_checkpoint(tmp_path / "run", 16, lanes=64)
    env = {**_slurm_env(tmp_path, SLURM_GPUS_ON_NODE="8", DATA="/d", OUT=str(run)), "SLURM_JOB_NODELIST": "gpu-a,gpu-b,gpu-c",
           "SLURM_JOB_NUM_NODES": "3"}
    result = script("slurm.sbatch", cwd=tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert "resuming on 16 ranks, 2 node(s) × 8, of the 3 × 8 allocated" in result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert commands[0].startswith("+ srun --nodes=2 --ntasks=2 ")
    assert len(commands) == 3 and all("--nnodes 2 --nproc_per_node 8 " in c and "--master_addr gpu-a " in c for c in commands[1:])
    small = {**env, "SLURM_GPUS_ON_NODE": "3", "SLURM_JOB_NODELIST": "gpu-a,gpu-b", "SLURM_JOB_NUM_NODES": "2",
             "OUT": str(_run_with_checkpoint(tmp_path / "old", 16, None))}
    refused(script("slurm.sbatch", cwd=tmp_path, **small), "resumes on 16 ranks: 2 node(s) × 3 GPU(s) hold none of them")


def test_the_hostfile_launcher_resumes_on_fewer_or_more_hosts(tmp_path):
    run = _run_with_checkpoint(tmp_path / "run", 8, lanes=32)
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"node-{i} slots=8\n" for i in range(5)))
    result = script("multinode.sh", cwd=tmp_path, HOSTFILE=str(hosts), DATA="/d", OUT=str(run), NODE_RANK="0", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    assert "32 lanes (1, 2, 4, 8, 16 ranks fit): resuming on 16 ranks, 2 node(s) × 8, of the 5 × 8 allocated" in result.stderr
    assert "--num_nodes 2 --num_gpus 8 " in result.stdout.splitlines()[-1]
    spare = script("multinode.sh", cwd=tmp_path, HOSTFILE=str(hosts), DATA="/d", OUT=str(run), NODE_RANK="4", DRY_RUN="1")
    assert spare.returncode == 0 and "node 4 is not needed" in spare.stdout
    hosts.write_text("node-0 slots=8\n")
    one = script("multinode.sh", cwd=tmp_path, HOSTFILE=str(hosts), DATA="/d", OUT=str(run), NODE_RANK="0", DRY_RUN="1")
    assert one.returncode == 0 and "resuming on 8 ranks, 1 node(s) × 8, all of the 1 × 8 allocated" in one.stderr, one.stderr
    assert one.stdout.splitlines()[-1].startswith(f"+ {BIN / 'deepspeed'} --hostfile {hosts} ")
