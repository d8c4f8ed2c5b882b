"""Experiment trackers beside TensorBoard and metrics.jsonl, off by default (`tracker`).

`mlflow` (`pip install 'vitdeep[mlflow]'`) is the one built in: rank 0 sends MLflow what it writes
to TensorBoard — the same scalars at the same steps under the same names (`train/loss`,
`val/top1`, `oversmoothing/cossim/last`, …) — the events (the over-smoothing alarm) as text
files, and the run's options once, as parameters (`optim.lr`, …). The store is
`MLFLOW_TRACKING_URI` where set (a server, a database), else the SQLite database `OUT/mlflow.db`
(MLflow 3 refuses its old folder store; `mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db`
shows it); the experiment is
`MLFLOW_EXPERIMENT_NAME`, else "vitdeep"; the run is named after the output folder. A resumed run
goes on in the same MLflow run (its id is kept in `OUT/tracker.json`); the steps it trains again
are logged again, and MLflow keeps both values of such a step.

A tracker of another kind is one class with the three methods of `Tracker`, named in `TRACKERS`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from vitdeep.errors import UserError
from vitdeep.paths import write_json_atomic

#: Where a run keeps its tracker's run id, so that a resume goes on in the same tracker run.
TRACKER_FILE = "tracker.json"
#: MLflow's limits: characters of a parameter value, entries of one `log_batch`.
MLFLOW_PARAM_CHARS = 6000
MLFLOW_BATCH = 100


class Tracker(Protocol):
    #: The tracker's own id of this run (kept in `OUT/tracker.json` for a resume).
    run_id: str

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars of one step, named as TensorBoard names them (`train/loss`)."""

    def text(self, step: int, name: str, message: str) -> None:
        """An event of one step (`alarm/event`)."""

    def close(self, failed: bool) -> None:
        """The run ended: finished, or failed / stopped (`failed`)."""


class MlflowTracker:
    """An MLflow run through `MlflowClient` (no process-global active run to leak into other code)."""

    def __init__(self, out: Path, options: dict[str, dict[str, Any]], run_id: str | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = MlflowClient(tracking_uri=mlflow_store(out))
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "vitdeep"
            experiment = self._client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment is not None else self._client.create_experiment(name)
            run_id = self._client.create_run(experiment_id, run_name=out.name, tags={"vitdeep.out": str(out.resolve())}).info.run_id
            # parameters are write-once in MLflow: a resumed run keeps those of its start
            params = [Param(f"{section}.{key}", str(value)[:MLFLOW_PARAM_CHARS])
                      for section, values in options.items() for key, value in values.items()]
            for first in range(0, len(params), MLFLOW_BATCH):
                self._client.log_batch(run_id, params=params[first:first + MLFLOW_BATCH])
        else:
            self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, step) for name, value in values.items()]
        for first in range(0, len(metrics), MLFLOW_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[first:first + MLFLOW_BATCH])

    def text(self, step: int, name: str, message: str) -> None:
        self._client.log_text(self.run_id, message, f"{name.replace('/', '_')}_step_{step:08d}.txt")

    def close(self, failed: bool) -> None:
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def mlflow_store(out: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else the run's own SQLite database."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"


def check_mlflow_store() -> None:
    """A store the user named must answer now, not after the run has started; the run's own
    database is made when the run starts."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:  # MLflow raises its own, requests' and SQLAlchemy's errors alike
        raise UserError(f"`tracker` mlflow: the store MLFLOW_TRACKING_URI={uri} does not answer: "
                        f"{str(error).splitlines()[0] if str(error) else type(error).__name__}", params=("tracker",)) from None


#: Tracker name → (the module it needs, its extra, the class).
TRACKERS: dict[str, tuple[str, str, Callable[[Path, dict, str | None], Tracker]]] = {
    "mlflow": ("mlflow", "mlflow", MlflowTracker),
}


def check_tracker(name: str) -> None:
    """Refuse a tracker that is not installed, before the run writes anything."""
    if name == "none":
        return
    module, extra, _ = TRACKERS[name]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"`tracker` {name} needs {module}: pip install 'vitdeep[{extra}]'", params=("tracker",))
    if name == "mlflow":
        check_mlflow_store()


def open_tracker(name: str, out: Path, options: dict[str, dict[str, Any]], resumed: bool) -> Tracker | None:
    """The run's tracker (None for "none"): a new tracker run, or, for a resumed run, the one its
    output folder started (`OUT/tracker.json`)."""
    if name == "none":
        return None
    record = out / TRACKER_FILE
    saved = None
    if resumed and record.is_file():
        try:
            entry = json.loads(record.read_text())
            saved = entry.get("run_id") if isinstance(entry, dict) and entry.get("tracker") == name else None
        except (OSError, ValueError):  # unreadable: the resumed run starts a tracker run of its own
            saved = None
    tracker = TRACKERS[name][2](out, options, saved if isinstance(saved, str) else None)
    write_json_atomic(record, {"tracker": name, "run_id": tracker.run_id})
    return tracker
