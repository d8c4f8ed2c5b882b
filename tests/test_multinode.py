"""Two nodes on one machine, and the launch/ scripts.

Each "node" is a separate `bash launch/multinode.sh` with NODE_RANK 0 or 1: DeepSpeed's own
launcher in its per-node (`--no_ssh`) mode, one CPU rank per node, over gloo. The nodes talk
over two network namespaces joined by a veth pair when the test may create them (root with
`ip`), else over loopback; VITDEEP_TEST_NETWORK=netns|loopback forces one. Real DeepSpeed
engines, real shards; only Slurm is stood in for (tests/scripts/fake_srun).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.launch import BIN, SMALL, cpu_env, free_port
from vitdeep.engine.checkpoint import MARKER, complete_checkpoints, read_marker

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = Path(__file__).parent / "scripts"
CHECKSUM_SCRIPT = SCRIPTS / "train_and_checksum.py"


def _load_checksum_module():
    spec = importlib.util.spec_from_file_location("train_and_checksum", CHECKSUM_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the network between the two nodes ---------------------------------------------------------


@dataclass
class Network:
    kind: str  # "netns" or "loopback"
    hosts: tuple[str, str]  # the hostfile's names; the first is MASTER_ADDR
    prefixes: tuple[list[str], list[str]]  # command prefix that puts a process on node 0 / node 1
    envs: tuple[dict[str, str], dict[str, str]]
    namespaces: tuple[str, ...] = ()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _remove_namespaces(names) -> None:
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _make_namespaces() -> tuple[Network | None, str]:
    """Two namespaces joined by a veth pair (10.77.0.1 ↔ 10.77.0.2); (None, why) when not allowed."""
    if shutil.which("ip") is None:
        return None, "no `ip` command"
    tag = f"vd{os.getpid()}"
    names, links, addrs = (f"{tag}n0", f"{tag}n1"), (f"{tag}a", f"{tag}b"), ("10.77.0.1", "10.77.0.2")
    made: list[str] = []
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for name, link, addr in zip(names, links, addrs):
            _ip("link", "set", link, "netns", name)
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", link)
            _ip("-n", name, "link", "set", link, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("netns", "exec", names[0], "true")  # some sandboxes let one create namespaces but not enter them
    except (subprocess.SubprocessError, OSError) as error:
        _remove_namespaces(made)
        subprocess.run(["ip", "link", "del", links[0]], capture_output=True, timeout=30)
        detail = getattr(error, "stderr", "") or str(error)
        return None, detail.strip().splitlines()[0] if detail.strip() else type(error).__name__
    prefixes = tuple(["ip", "netns", "exec", name] for name in names)
    # gloo finds its own address through the host name, which lives outside the namespaces
    envs = tuple({"GLOO_SOCKET_IFNAME": link} for link in links)
    return Network("netns", addrs, prefixes, envs, names), ""


@pytest.fixture(scope="module")
def network():
    wanted = os.environ.get("VITDEEP_TEST_NETWORK", "auto")
    made, why = (None, "VITDEEP_TEST_NETWORK=loopback") if wanted == "loopback" else _make_namespaces()
    if made is None:
        if wanted == "netns":
            pytest.fail(f"cannot create network namespaces: {why}")
        print(f"two nodes over loopback (no network namespaces: {why})")
        made = Network("loopback", ("127.0.0.1", "127.0.0.2"), ([], []), ({}, {}))
    else:
        print(f"two nodes in network namespaces {made.namespaces[0]} ({made.hosts[0]}) and {made.namespaces[1]} ({made.hosts[1]})")
    try:
        yield made
    finally:
        _remove_namespaces(made.namespaces)


# -- two nodes --------------------------------------------------------------------------------


@dataclass
class Node:
    rank: int
    process: subprocess.Popen
    log: Path

    def output(self, stream: str) -> str:
        return (self.log / f"node{self.rank}.{stream}").read_text(errors="replace")

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass


class TwoNodes:
    """`launch/multinode.sh` started once per node, in `workdir`, writing to `out`."""

    def __init__(self, network: Network, shards: Path, workdir: Path, args: list[str], **env: str) -> None:
        self.network, self.out, self.workdir = network, workdir / "run", workdir
        hostfile = workdir / "hostfile"
        hostfile.write_text("".join(f"{host} slots=1\n" for host in network.hosts))
        port = str(free_port())
        self.nodes: list[Node] = []
        for rank in (0, 1):
            node_env = cpu_env(
                HOSTFILE=str(hostfile), NODE_RANK=str(rank), MASTER_PORT=port, DATA=str(shards), OUT=str(self.out),
                DEEPSPEED=str(BIN / "deepspeed"), **network.envs[rank], **env,
            )
            cmd = [*network.prefixes[rank], "bash", str(LAUNCH / "multinode.sh"), *args]
            with open(workdir / f"node{rank}.out", "w") as out, open(workdir / f"node{rank}.err", "w") as err:
                process = subprocess.Popen(cmd, cwd=workdir, env=node_env, stdout=out, stderr=err, start_new_session=True)
            self.nodes.append(Node(rank, process, workdir))

    def logs(self) -> str:
        return "\n".join(
            f"--- node {n.rank} {stream} (exit {n.process.poll()})\n{n.output(stream)[-5000:]}" for n in self.nodes for stream in ("out", "err")
        )

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [n.process.wait(timeout=max(deadline - time.monotonic(), 0.1)) for n in self.nodes]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the nodes did not finish within {timeout:.0f} s\n{self.logs()}")

    def wait_for(self, condition, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if any(n.process.poll() is not None for n in self.nodes):
                self.kill()
                raise AssertionError(f"a node ended before the condition held\n{self.logs()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting\n{self.logs()}")
            time.sleep(0.05)

    def kill(self) -> None:
        for node in self.nodes:
            node.signal(signal.SIGKILL)
        for node in self.nodes:
            try:
                node.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def started():
    """Start TwoNodes through this; whatever is left running at the end is killed."""
    runs: list[TwoNodes] = []

    def start(*args, **kwargs) -> TwoNodes:
        runs.append(TwoNodes(*args, **kwargs))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows if row["kind"] == "train"]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error")]


@pytest.mark.slow
def test_two_nodes_train_zero2_to_the_same_weights_and_one_checkpoint(network, digit_shards, tmp_path, started):
    # per-node mode reads ./.deepspeed_env for what a node's environment lacks
    (tmp_path / ".deepspeed_env").write_text("VITDEEP_TEST_ENV=from-deepspeed-env\n")
    sums = tmp_path / "checksums"
    begin = time.monotonic()
    run = started(network, digit_shards, tmp_path, [*SMALL, "--steps", "6", "--ds-config", "zero2_bf16", "--dist-timeout", "1"],
                  ENTRY=str(CHECKSUM_SCRIPT), VITDEEP_TEST_CHECKSUMS=str(sums))
    codes = run.wait(timeout=300)
    assert codes == [0, 0], run.logs()
    print(f"two nodes ({network.kind}), ZeRO-2, 6 steps: {time.monotonic() - begin:.1f} s")

    records = [json.loads((sums / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["node_rank"] for r in records] == ["0", "1"]
    assert all(r["test_env"] == "from-deepspeed-env" for r in records)
    if network.kind == "netns":
        assert records[0]["netns"] != records[1]["netns"]
        assert [r["gloo_ifname"] for r in records] == [network.envs[0]["GLOO_SOCKET_IFNAME"], network.envs[1]["GLOO_SOCKET_IFNAME"]]
    assert records[0]["dtype"] == "torch.bfloat16"
    assert records[0]["digest"] == records[1]["digest"], "the nodes ended with different weights"

    # one checkpoint in the shared OUT, both nodes' parts in it
    out = run.out
    (checkpoint,) = complete_checkpoints(out)
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == [checkpoint.name]
    marker = read_marker(checkpoint)
    assert (marker["step"], marker["world_size"], marker["zero_stage"]) == (6, 2, 2)
    files = {p.name for p in checkpoint.iterdir()}
    assert {"rank_00000.pt", "rank_00001.pt", "mp_rank_00_model_states.pt", MARKER} <= files
    assert any("zero_pp_rank_0_" in f for f in files) and any("zero_pp_rank_1_" in f for f in files)
    # consolidated from both nodes' optimizer partitions, it is what each node holds
    from vitdeep.engine.weights import read_weights

    state = read_weights(out).state_dict
    digest = _load_checksum_module().weights_digest({n: state[n].to(torch.bfloat16) for n in records[0]["names"]})
    assert digest == records[0]["digest"]

    # only global rank 0 (node 0) shows progress and writes logs / TensorBoard
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    assert len(list((out / "tb").iterdir())) == 1
    node0, node1 = (n.output("err") for n in run.nodes)
    assert "img/s" in node0 and "img/s" not in node1
    assert "Traceback" not in node0 + node1


DIST_TIMEOUT_MIN = 0.25


def _train_until_a_checkpoint(network, digit_shards, tmp_path, started) -> TwoNodes:
    args = [*SMALL, "--steps", "500", "--ds-config", "zero2_bf16", "--save-every", "2", "--dist-timeout", str(DIST_TIMEOUT_MIN)]
    run = started(network, digit_shards, tmp_path, args)
    run.wait_for(lambda: bool(complete_checkpoints(run.out)) and len(steps_logged(run.out)) >= 3)
    return run


def _signal_node_1(run: TwoNodes, sig: int) -> tuple[int, float]:
    """Send `sig` to node 1; node 0's exit code and the seconds it took to exit."""
    run.nodes[1].signal(sig)
    sent = time.monotonic()
    code = run.nodes[0].process.wait(timeout=DIST_TIMEOUT_MIN * 60 + 60)
    return code, time.monotonic() - sent


def _check_one_clear_line(run: TwoNodes, needle: str) -> str:
    err = run.nodes[0].output("err")
    lines = error_lines(err)
    assert len(lines) == 1, run.logs()
    assert needle in lines[0] and "Traceback" not in err, run.logs()
    return lines[0]


@pytest.mark.slow
def test_killing_a_node_ends_the_other_with_one_clear_line(network, digit_shards, tmp_path, started):
    run = _train_until_a_checkpoint(network, digit_shards, tmp_path, started)
    code, seconds = _signal_node_1(run, signal.SIGKILL)
    print(f"node 1 killed: node 0 exited {code} after {seconds:.1f} s ({network.kind})")
    assert code != 0
    assert seconds < DIST_TIMEOUT_MIN * 60 + 15
    line = _check_one_clear_line(run, "lost contact with another rank")
    newest = complete_checkpoints(run.out)[-1]
    assert str(newest) in line and "resume with --resume auto" in line
    print(line)


@pytest.mark.slow
def test_a_hung_node_ends_the_other_at_the_dist_timeout(network, digit_shards, tmp_path, started):
    """A node that stops answering without closing its connections: only --dist-timeout ends the wait."""
    run = _train_until_a_checkpoint(network, digit_shards, tmp_path, started)
    code, seconds = _signal_node_1(run, signal.SIGSTOP)
    print(f"node 1 frozen: node 0 exited {code} after {seconds:.1f} s (--dist-timeout {DIST_TIMEOUT_MIN * 60:.0f} s, {network.kind})")
    assert code != 0
    assert DIST_TIMEOUT_MIN * 60 * 0.8 < seconds < DIST_TIMEOUT_MIN * 60 + 15
    print(_check_one_clear_line(run, "lost contact with another rank"))
    assert "Timed out" in error_lines(run.nodes[0].output("err"))[0]


@pytest.mark.slow
def test_sigterm_to_one_nodes_script_stops_both_nodes_at_one_step_with_a_checkpoint(network, digit_shards, tmp_path, started):
    """SIGTERM to node 0's launch script alone (not its launcher, not its ranks, as Slurm's warning
    signal or a scheduler would send it): the script passes it to its rank, the two nodes agree at
    the next step, save there together and exit 75; `--resume auto` then finishes the run."""
    args = [*SMALL, "--ds-config", "zero2_bf16", "--save-every", "100", "--dist-timeout", "1"]
    run = started(network, digit_shards, tmp_path, [*args, "--steps", "500"])
    run.wait_for(lambda: len(steps_logged(run.out)) >= 3)
    run.nodes[0].process.send_signal(signal.SIGTERM)
    codes = run.wait(timeout=240)
    assert codes == [75, 75], run.logs()
    (checkpoint,) = complete_checkpoints(run.out)
    step = read_marker(checkpoint)["step"]
    assert 3 <= step < 100 and step == max(steps_logged(run.out)), run.logs()
    node0 = run.nodes[0].output("err")
    assert f"stopped by SIGTERM at step {step}; checkpoint {checkpoint}; resume with --resume auto" in node0, run.logs()
    assert "asking the ranks" in node0 and "Traceback" not in node0 + run.nodes[1].output("err")
    resumed = started(network, digit_shards, tmp_path, [*args, "--steps", str(step + 2), "--resume", "auto"])
    assert resumed.wait(timeout=300) == [0, 0], resumed.logs()
    assert read_marker(complete_checkpoints(run.out)[-1])["step"] == step + 2
    assert steps_logged(run.out) == list(range(1, step + 3))


# -- the scripts: refusals, dry runs, the Slurm mapping ------------------------------------------


def script(name: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    base.update({"DEEPSPEED": str(BIN / "deepspeed"), "TORCHRUN": str(BIN / "torchrun"), **env})
    return subprocess.run(["bash", str(LAUNCH / name), *args], cwd=cwd, env=base, capture_output=True, text=True, timeout=60)


LAUNCH_VARS = {"HOSTFILE", "DATA", "OUT", "VAL", "MODEL", "DS_CONFIG", "COMMAND", "MASTER_ADDR", "MASTER_PORT", "NNODES",
               "GPUS_PER_NODE", "NODE_RANK", "ENV_VARS", "ENTRY", "DRY_RUN", "FROM", "LAUNCHER", "LAUNCH_DIR"}


def refused(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and needle in result.stderr, result.stderr
    assert "+ " not in result.stdout  # nothing was started


@pytest.mark.parametrize("name", ["multinode.sh", "torchrun.sh", "slurm.sbatch", "finetune_384.sh", "finetune_512.sh", "_common.sh", "_finetune.sh"])
def test_launch_scripts_are_valid_bash(name):
    assert subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True).returncode == 0


@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8\n")
    return path


def test_multinode_without_a_hostfile_stops_with_one_line(tmp_path):
    refused(script("multinode.sh", cwd=tmp_path), "no hostfile: set HOSTFILE")
    refused(script("multinode.sh", cwd=tmp_path, HOSTFILE="nowhere"), "HOSTFILE=nowhere does not exist")


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"HOSTFILE": "bad"}, "'node-a gpus=8' is not 'HOST slots=GPUS'"),
        ({}, "DATA is not set"),
        ({"DATA": "shards"}, "OUT is not set"),
        ({"DATA": "shards", "OUT": "run", "NODE_RANK": "2"}, "NODE_RANK=2 must be 0..1"),
        ({"DATA": "shards", "OUT": "run", "NNODES": "3"}, "NNODES=3 but HOSTFILE"),
        ({"DATA": "shards", "OUT": "run", "COMMAND": "eval"}, "COMMAND=eval must be train or finetune"),
    ],
)
def test_multinode_refuses_missing_or_wrong_values(tmp_path, hostfile, env, needle):
    (tmp_path / "bad").write_text("node-a gpus=8\n")
    refused(script("multinode.sh", cwd=tmp_path, **{"HOSTFILE": str(hostfile), **env}), needle)


@pytest.mark.skipif(shutil.which("pdsh") is not None, reason="pdsh is installed here")
def test_multinode_over_ssh_needs_pdsh(tmp_path, hostfile):
    refused(script("multinode.sh", cwd=tmp_path, HOSTFILE=str(hostfile), DATA="d", OUT="o"), "pdsh not found")
    assert not (tmp_path / ".deepspeed_env").exists()


def test_multinode_dry_run_prints_the_command(tmp_path):
    result = script("multinode.sh", "--epochs", "3", cwd=tmp_path, HOSTFILE=str(LAUNCH / "hostfile.example"), DATA="/data/train",
                    OUT="runs/a", MODEL="deit_base_24", NODE_RANK="1", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1]
    expected = (f"--master_addr gpu-node-01 --master_port 29500 --no_ssh --node_rank 1 --module vitdeep train --data /data/train "
                f"--out {tmp_path}/runs/a --model deit_base_24 --epochs 3")
    assert command.startswith(f"+ {BIN / 'deepspeed'} --hostfile {LAUNCH / 'hostfile.example'} ") and command.endswith(expected)


def test_hostfile_example_is_what_deepspeed_reads():
    from deepspeed.launcher.runner import fetch_hostfile

    assert fetch_hostfile(str(LAUNCH / "hostfile.example")) == {"gpu-node-01": 8, "gpu-node-02": 8}


def test_multinode_writes_deepspeed_env_for_the_ssh_launcher(tmp_path):
    single = tmp_path / "one-host"
    single.write_text("localhost slots=1\n")
    env = dict(HOSTFILE=str(single), DATA="d", OUT="o", DEEPSPEED="true", NCCL_SOCKET_IFNAME="ib0", WDS_CACHE="/scratch/wds",
               MY_SETTING="x y", ENV_VARS="MY_SETTING")
    result = script("multinode.sh", cwd=tmp_path, **env)
    assert result.returncode == 0, result.stderr
    written = (tmp_path / ".deepspeed_env").read_text().splitlines()
    pairs = dict(line.split("=", maxsplit=1) for line in written)  # how DeepSpeed's runner reads it
    assert {"NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "WARN", "WDS_CACHE": "/scratch/wds", "MY_SETTING": "x y"}.items() <= pairs.items()
    # a file the user wrote is theirs
    (tmp_path / ".deepspeed_env").write_text("NCCL_IB_HCA=mlx5\n")
    result = script("multinode.sh", cwd=tmp_path, **env)
    assert result.returncode == 0 and "as you wrote it" in result.stdout
    assert (tmp_path / ".deepspeed_env").read_text() == "NCCL_IB_HCA=mlx5\n"


def test_slurm_sbatch_without_sbatch_stops_with_one_line(tmp_path):
    refused(script("slurm.sbatch", cwd=tmp_path), "submit it with 'sbatch launch/slurm.sbatch'")


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").symlink_to(SCRIPTS / "fake_srun")
    return dict(PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NODELIST="gpu-a,gpu-b",
                SLURM_JOB_NUM_NODES="2", SLURM_CPUS_PER_TASK="32", **extra)


def test_slurm_sbatch_maps_the_allocation_to_one_torchrun_per_node(tmp_path):
    env = _slurm_env(tmp_path, SLURM_GPUS_ON_NODE="8", DATA="/d", OUT="/o")
    result = script("slurm.sbatch", "--epochs", "3", cwd=tmp_path, **env)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert commands[0].startswith("+ srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=32 bash -c")
    for node, command in enumerate(commands[1:]):
        assert command == (f"+ {BIN / 'torchrun'} --nnodes 2 --nproc_per_node 8 --node_rank {node} --master_addr gpu-a "
                           f"--master_port 24242 -m vitdeep train --data /d --out /o --epochs 3 --resume auto")
    assert len(commands) == 3
    result = script("slurm.sbatch", "--overwrite", cwd=tmp_path, **env)
    launched = [line for line in result.stdout.splitlines() if line.startswith(f"+ {BIN}")]
    assert len(launched) == 2 and all(line.endswith("--overwrite") for line in launched)


def test_slurm_requeues_a_run_that_stopped_with_a_checkpoint(tmp_path):
    """75 from the job step (the ranks saved after the warning signal) → scontrol requeue; the
    sbatch header asks Slurm for the warning signal and for requeueing."""
    env = _slurm_env(tmp_path, SLURM_GPUS_ON_NODE="8", DATA="/d", OUT="/o")
    fake = tmp_path / "bin"
    (fake / "srun").unlink()
    (fake / "srun").write_text("#!/usr/bin/env bash\nexit 75\n")
    calls = tmp_path / "scontrol.calls"
    (fake / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == show ]]; then tr , "\\n" <<< "$3"; else echo "$@" >> {calls}; fi\n'
    )
    for name in ("srun", "scontrol"):
        (fake / name).chmod(0o755)
    result = script("slurm.sbatch", cwd=tmp_path, **env)
    assert result.returncode == 75, result
    assert calls.read_text().split() == ["requeue", "4242"] and "requeueing job 4242" in result.stderr
    header = (LAUNCH / "slurm.sbatch").read_text()
    assert "\n#SBATCH --signal=USR1@" in header and "\n#SBATCH --requeue\n" in header


def test_slurm_sbatch_with_the_deepspeed_launcher_writes_the_hostfile(tmp_path):
    env = _slurm_env(tmp_path, SLURM_GPUS_PER_NODE="h100:4", DATA="/d", OUT=str(tmp_path / "run"), LAUNCHER="deepspeed")
    result = script("slurm.sbatch", cwd=tmp_path, **env)
    assert result.returncode == 0, result.stderr
    hostfile = tmp_path / "run" / "slurm-4242.hostfile"
    assert hostfile.read_text() == "gpu-a slots=4\ngpu-b slots=4\n"
    commands = [line for line in result.stdout.splitlines() if line.startswith(f"+ {BIN / 'deepspeed'}")]
    assert [f"--no_ssh --node_rank {node} " in c and f"--hostfile {hostfile} " in c for node, c in enumerate(commands)] == [True, True]


def test_torchrun_refusals_and_dry_run(tmp_path):
    refused(script("torchrun.sh", cwd=tmp_path, NNODES="2", DATA="d", OUT="o", GPUS_PER_NODE="1"), "NODE_RANK is not set")
    refused(script("torchrun.sh", cwd=tmp_path, NNODES="2", NODE_RANK="1", DATA="d", OUT="o", GPUS_PER_NODE="1"), "MASTER_ADDR is not set")
    if shutil.which("nvidia-smi") is None:
        refused(script("torchrun.sh", cwd=tmp_path, DATA="d", OUT="o"), "GPUS_PER_NODE is not set and nvidia-smi lists no GPU")
    result = script("torchrun.sh", "--steps", "5", cwd=tmp_path, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", DATA="/d", OUT="/o",
                    GPUS_PER_NODE="8", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (f"+ {BIN / 'torchrun'} --nnodes 2 --nproc_per_node 8 --node_rank 1 --master_addr 10.0.0.1 "
                                              "--master_port 29500 -m vitdeep train --data /d --out /o --steps 5")


@pytest.mark.parametrize("size", [384, 512])
def test_finetune_scripts(tmp_path, size):
    name = f"finetune_{size}.sh"
    refused(script(name, cwd=tmp_path, DATA="d", OUT="o"), "FROM is not set")
    result = script(name, "--micro-batch", "16", cwd=tmp_path, FROM="/runs/deit_b24", DATA="/d", OUT="/o", GPUS_PER_NODE="8", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1]
    assert command.endswith(f"-m vitdeep finetune --data /d --out /o --from /runs/deit_b24 --img-size {size} --micro-batch 16")
    # the recipe comes from `vitdeep finetune` itself, not from the script
    assert "--lr" not in command and "--weight-decay" not in command and "--epochs" not in command
    result = script(name, cwd=tmp_path, FROM="/runs/x", DATA="/d", OUT="/o", HOSTFILE=str(LAUNCH / "hostfile.example"), NODE_RANK="0",
                    DRY_RUN="1")
    assert result.returncode == 0 and "--no_ssh --node_rank 0 --module vitdeep finetune" in result.stdout


def test_lost_peer_errors_are_told_apart_from_bugs():
    from torch.distributed import DistNetworkError, DistStoreError

    from vitdeep.engine.deepspeed import _short_reason, lost_peer_reason

    store = DistStoreError("Timed out after 31 seconds waiting for clients. 1/2 clients joined.")
    assert lost_peer_reason(store) == "Timed out after 31 seconds waiting for clients. 1/2 clients joined"
    try:
        try:
            raise DistNetworkError("failed to connect to 10.0.0.1:29500")
        except DistNetworkError as error:
            raise ValueError("while saving") from error
    except ValueError as error:
        assert lost_peer_reason(error) == "failed to connect to 10.0.0.1:29500"
    gloo = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:5306: Connection reset by peer. "
            "This is typically caused by a remote worker hanging or bugs in the application.")
    assert _short_reason(gloo) == "Read error [10.0.0.2]:5306: Connection reset by peer"
    # without a process group of several ranks, a RuntimeError is a bug and keeps its traceback
    assert lost_peer_reason(RuntimeError(gloo)) is None
    assert lost_peer_reason(ValueError("bad value")) is None
