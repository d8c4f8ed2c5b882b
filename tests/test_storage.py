"""Storage that stalls, breaks or vanishes, and processes that must not outlive the command.

A real HTTP server on localhost serves the real digit shards and misbehaves on cue, per request:
it stalls half-way, cuts the connection half-way, answers 500 or 404, trickles slowly but
steadily, or ignores `Range`. Reads run under a short timeout (half a second), so the whole file
takes seconds. The subprocess tests run `vitdeep eval` for real and kill it with each signal.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import torch

from tests.launch import cpu_env, single_cmd
from vitdeep.data.options import ReadPolicy
from vitdeep.data.pipeline import eval_loader
from vitdeep.data.samples import MISSING, UNREADABLE_SHARD, BadDataLog, ReadStats, count_samples, shard_samples
from vitdeep.data.storage import ShardReadError, open_shard, use_read_policy
from vitdeep.engine.evaluate import evaluate

FAST = ReadPolicy(read_timeout=0.5, read_retries=2)
VAL = [f"val-{i:06d}.tar" for i in range(6)]  # 50 samples each, the last 47


@dataclass
class Route:
    """How the server answers the requests for one URL prefix: `faults` in turn ("stall" or "cut"
    at the file's middle byte, "500", "404"; afterwards it serves well), for files named `target`
    (default: every shard)."""

    faults: list[str] = field(default_factory=list)
    ranges: bool = True
    delay: float = 0.0  # seconds between chunks
    chunk: int = 8192
    target: str | None = None
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (file, Range header)

    def fault(self, name: str) -> str:
        if (self.target or ".tar") not in name:
            return "ok"
        served = sum(1 for requested, _ in self.requests if requested == name) - 1
        return self.faults[served] if served < len(self.faults) else "ok"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server: ShardServer = self.server
        prefix, _, name = self.path.lstrip("/").partition("/")
        route = server.routes[prefix]
        with server.lock:
            route.requests.append((name, self.headers.get("Range")))
            fault = route.fault(name)
        body = server.files.get(name)
        if body is None or fault in ("404", "500"):
            self.send_error(500 if fault == "500" else 404)
            return
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(wanted.group(1)) if wanted and route.ranges else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", '"1"')
        self.end_headers()
        payload = body[start:]
        if fault in ("stall", "cut"):  # at the file's middle byte, also when resumed
            self.wfile.write(payload[: max(len(body) // 2 - start, 0)])
            self.wfile.flush()
            if fault == "stall":
                server.stalled.set()
                server.release.wait()
            return  # "cut": the connection closes short of its Content-Length
        for offset in range(0, len(payload), route.chunk):
            self.wfile.write(payload[offset : offset + route.chunk])
            if route.delay:
                self.wfile.flush()
                time.sleep(route.delay)


class ShardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.routes: dict[str, Route] = {}
        self.lock = threading.Lock()
        self.stalled = threading.Event()
        self.release = threading.Event()

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up on a stalled or slow response

    def route(self, prefix: str, route: Route | None = None) -> str:
        """Serve the shards under `/prefix/` as `route` says; returns that location's URL."""
        self.routes[prefix] = route or Route()
        return f"http://127.0.0.1:{self.server_port}/{prefix}"


@pytest.fixture(scope="module")
def server(digit_shards):
    files = {path.name: path.read_bytes() for path in Path(digit_shards).iterdir()}
    with ShardServer(files) as shard_server:
        thread = threading.Thread(target=shard_server.serve_forever, daemon=True)
        thread.start()
        yield shard_server
        shard_server.release.set()
        shard_server.shutdown()


@pytest.fixture
def fast_reads():
    use_read_policy(FAST)
    yield FAST
    use_read_policy(ReadPolicy())


def _read(urls, workers: int = 0, max_bad_fraction: float = 1.0):
    """(keys in order, ReadStats) of an evaluation pass over `urls`."""
    loader = eval_loader(urls, micro_batch=25, img_size=32, crop_ratio=0.875, rank=0, world_size=1,
                         num_workers=workers, with_keys=True, max_bad_fraction=max_bad_fraction)
    keys = [key for _, _, batch in loader for key in batch]
    return keys, loader.stats


def _retries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vitdeep.data.storage"]


@pytest.mark.parametrize("name, route, reason", [
    ("stall-once", Route(["stall"]), "nothing received for 0.5 s"),
    ("cut-once", Route(["cut"]), "connection closed"),
    ("cut-ignoring-range", Route(["cut", "cut"], ranges=False), "connection closed"),
    ("error-twice", Route(["500", "500"]), "HTTP 500"),
])
def test_a_transient_failure_is_retried_and_costs_nothing(server, digit_shards, fast_reads, caplog, name, route, reason):
    """The stream goes on from the byte where it broke: Range when the server has it, else read
    again and skipped. Every sample arrives once, in order, and each retry is one warning."""
    caplog.set_level(logging.WARNING)
    url = f"{server.route(name, route)}/{VAL[0]}"
    keys, stats = _read(url)
    assert keys == _read(str(Path(digit_shards) / VAL[0]))[0] and len(keys) == 50
    assert stats.samples == 50 and not stats.bad
    warnings = _retries(caplog)
    assert len(warnings) == len(route.faults) and all(url in w and reason in w for w in warnings), warnings
    assert [f"retry {i} of 2" in w for i, w in enumerate(warnings, 1)] == [True] * len(warnings)
    ranges = [header for file, header in route.requests if file == VAL[0]]
    size = len(server.files[VAL[0]])
    if route.faults[0] == "500":
        assert ranges == [None] * 3
    elif route.ranges:
        assert ranges == [None, f"bytes={size // 2}-"]
    else:  # asked for a range, got the whole file and skipped what it had (cut again right there)
        assert ranges == [None, f"bytes={size // 2}-", f"bytes={size // 2}-"]


def test_a_slow_but_steady_server_never_times_out(server, fast_reads, caplog):
    caplog.set_level(logging.WARNING)
    url = f"{server.route('slow', Route(delay=0.25, chunk=16384))}/{VAL[0]}"  # 7 chunks, half a timeout apart
    started = time.monotonic()
    keys, stats = _read(url)
    took = time.monotonic() - started
    assert len(keys) == 50 and not stats.bad and not _retries(caplog)
    assert took > 3 * FAST.read_timeout, f"the server was not slow ({took:.2f} s)"


def test_what_is_finally_unread_counts_as_missing_exactly(server, fast_reads):
    """Whole shards per reader: a shard that stalls for good, one that keeps failing with 500, one
    that is not there (404) and a good one. Each lost exactly what it did not deliver."""
    urls = [f"{server.route('good')}/{VAL[0]}", f"{server.route('hang', Route(['stall'] * 3))}/{VAL[1]}",
            f"{server.route('down', Route(['500'] * 3))}/{VAL[2]}", f"{server.route('gone', Route(['404']))}/{VAL[3]}"]
    started = time.monotonic()
    keys, stats = _read(urls, workers=2)
    took = time.monotonic() - started
    delivered = sum(1 for key in keys if key in _keys_of(server, VAL[1]))
    assert 0 < delivered < 50, "the stalled shard delivered its first half"
    assert stats.samples == 50 + delivered == len(keys)
    assert stats.bad == {MISSING: (50 - delivered) + 50 + 50}, stats.bad
    assert took < 10, f"3 tries of 0.5 s and waits of 0.5 + 0.5 s should take about 3 s, took {took:.1f} s"


def _keys_of(server: ShardServer, name: str) -> set[str]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(server.files[name])) as archive:
        return {member.name.rsplit(".", 1)[0] for member in archive}


def test_every_reader_counts_its_share_of_a_lost_shard(server, fast_reads):
    """Fewer shards than readers: each reader reads all and keeps every third sample; the lost
    positions are counted by the reader they belonged to, so the total is exact."""
    urls = [f"{server.route('good')}/{VAL[0]}", f"{server.route('hang-all', Route(['stall'] * 9))}/{VAL[1]}"]
    keys, stats = _read(urls, workers=3)
    assert len(keys) == len(set(keys)) == stats.samples
    assert stats.samples + stats.bad[MISSING] == 100 and set(stats.bad) == {MISSING}
    assert 50 < stats.samples < 100


def test_a_local_shard_deleted_after_planning_counts_as_missing(digit_shards, tmp_path, caplog):
    for name in VAL[:3]:
        shutil.copy(Path(digit_shards) / name, tmp_path / name)
    urls = [str(tmp_path / name) for name in VAL[:3]]
    by_shards = eval_loader(urls, micro_batch=25, img_size=32, crop_ratio=0.875, rank=0, world_size=1, num_workers=0,
                            max_bad_fraction=1.0)
    modulo = eval_loader(urls, micro_batch=25, img_size=32, crop_ratio=0.875, rank=0, world_size=1, num_workers=4,
                         max_bad_fraction=1.0)
    (tmp_path / VAL[1]).unlink()
    for loader in (by_shards, modulo):
        assert sum(len(labels) for _, labels in loader) == 100
        assert loader.stats.bad == {MISSING: 50}
    assert sum(f"unreadable shard {urls[1]} after 0 samples" in r.getMessage() for r in caplog.records) == 1
    for expected, counted in ((50, {MISSING: 50}), (None, {UNREADABLE_SHARD: 1})):
        stats = ReadStats()
        assert not list(shard_samples(urls[1], BadDataLog(stats), expected)) and stats.bad == counted


def test_eval_reports_the_missing_samples_of_a_stalled_shard(server, fast_reads):
    """The evaluation's accounting over all six validation shards, one of which stalls for good."""
    urls = [f"{server.route('eval-good')}/{name}" for name in VAL]
    urls[2] = f"{server.route('eval-hang', Route(['stall'] * 3))}/{VAL[2]}"
    loader = eval_loader(urls, micro_batch=32, img_size=32, crop_ratio=0.875, rank=0, world_size=1, num_workers=2,
                         max_bad_fraction=None)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    result = evaluate(model, loader, lambda images: images.float() / 255, 10, torch.device("cpu"), img_size=32)
    assert result.expected == 297 and 0 < result.missing < 50
    assert result.count + result.missing == 297 and not result.bad
    assert result.bad_data_error(max_bad_fraction=0.5) is None
    error = result.bad_data_error(max_bad_fraction=0.01)
    assert error is not None and f"{result.missing} missing (listed but not read)" in str(error)


def test_count_samples_and_info_json_read_under_the_policy(server, fast_reads, caplog):
    caplog.set_level(logging.WARNING)
    base = server.route("info-flaky", Route(["500"], target="_info.json"))
    from vitdeep.data.info import read_dataset_info

    info = read_dataset_info(f"{base}/{VAL[0]}")
    assert info.shard_sizes == (50,) and info.counted_from == "_info.json"
    assert any("_info.json" in w and "HTTP 500" in w and "retry 1 of 2" in w for w in _retries(caplog))
    hang = f"{server.route('count-hang', Route(['stall'] * 3))}/{VAL[0]}"
    started = time.monotonic()
    assert 0 < count_samples(hang) < 50
    assert time.monotonic() - started < 6
    assert count_samples(f"{server.route('count-once', Route(['stall']))}/{VAL[0]}") == 50


def test_a_closed_port_and_a_silent_command_fail_after_their_retries(caplog):
    caplog.set_level(logging.WARNING)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(ShardReadError, match="refused.* after 2 tries"):
        open_shard(f"http://127.0.0.1:{port}/x.tar", ReadPolicy(0.3, 1))
    assert len(_retries(caplog)) == 1
    with open_shard("pipe:sleep 30", ReadPolicy(0.3, 0)) as stream:
        sleepers = [p for p in psutil.Process().children() if "sleep 30" in " ".join(p.cmdline())]
        with pytest.raises(ShardReadError, match="printed nothing for 0.3 s"):
            stream.read()
    assert len(sleepers) == 1 and not _alive(sleepers), "the command is killed when its read fails"
    with pytest.raises(ShardReadError, match="exited with status 3"):
        open_shard("pipe:exit 3", ReadPolicy(0.3, 0)).read()


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` still running (a zombie has ended: only its exit status is left)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


# -- `vitdeep eval` as a process: one line, and nothing left behind ---------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import timm

    path = tmp_path_factory.mktemp("tiny") / "deit_tiny.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10).state_dict(), path)
    return path


def _eval(checkpoint: Path, data: str, out: Path, *extra: str) -> list[str]:
    return single_cmd(["eval", "--checkpoint", str(checkpoint), "--model", "deit_tiny_12", "--img-size", "32",
                       "--data", data, "--workers", "1", "--out", str(out), *extra])


@pytest.mark.slow
def test_eval_over_a_stalled_shard_ends_in_one_line(server, tiny_checkpoint, tmp_path):
    data = f"{server.route('cli-good')}/{VAL[0]}::{server.route('cli-hang', Route(['stall'] * 2))}/{VAL[1]}"
    out = tmp_path / "eval.json"
    done = subprocess.run(_eval(tiny_checkpoint, data, out, "--read-timeout", "0.5", "--read-retries", "1"),
                          env=cpu_env(), capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert re.fullmatch(r"error: \d+ of 100 samples read were bad \(\d+ missing \(listed but not read\)\), more than "
                        r"--max-bad-fraction 0.01 allows; see the warnings above for where", lines[-1]), lines[-1]
    assert any("cli-hang" in line and "retry 1 of 1" in line for line in lines), done.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind, stop", [("http", signal.SIGTERM), ("pipe", signal.SIGINT), ("pipe", signal.SIGKILL)],
                         ids=["http-SIGTERM", "pipe-SIGINT", "pipe-SIGKILL"])
def test_no_process_outlives_eval_whatever_ends_it(server, tiny_checkpoint, tmp_path, kind, stop):
    """`vitdeep eval` over a shard that stalls for good (the default timeout, a minute, is far
    off), stopped by a signal while its loader worker (and, for a pipe: URL, the `curl` it runs)
    waits: the command ends with one line (or is killed), and every process it started is gone
    within seconds."""
    route = Route(["stall"] * 10)
    url = f"{server.route(f'signal-{kind}-{stop.name}', route)}/{VAL[0]}"
    data = url if kind == "http" else f"pipe:curl -s {url}"
    stderr = tmp_path / "stderr"  # a file: a survivor holding a pipe would keep it open
    with stderr.open("w") as err_file:
        process = subprocess.Popen(_eval(tiny_checkpoint, data, tmp_path / "eval.json", "--num-samples", "50"),
                                   env=cpu_env(), stdout=subprocess.DEVNULL, stderr=err_file)
    try:
        deadline = time.monotonic() + 90
        while (VAL[0], None) not in route.requests and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert process.poll() is None, stderr.read_text()
        started = psutil.Process(process.pid).children(recursive=True)
        names = [p.name() for p in started]
        assert names[0] == "pt_data_worker" and ("curl" in names) == (kind == "pipe"), names
        signalled = time.monotonic()
        process.send_signal(stop)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    while _alive(started) and time.monotonic() < signalled + 5:
        time.sleep(0.05)
    took = time.monotonic() - signalled
    survivors = _alive(started)
    for survivor in survivors:
        survivor.kill()
    assert not survivors, [p.name() for p in survivors]
    print(f"{kind} {stop.name}: the command and its {len(started)} processes ({', '.join(names)}) gone in {took:.2f} s")
    if stop == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        err = stderr.read_text()
        assert process.returncode == 75 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == f"error: stopped by {stop.name} before the end; run the command again"
