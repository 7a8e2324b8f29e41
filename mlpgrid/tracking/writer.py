"""MLflow records of a grid: one experiment per grid, a parent run, one run per trial.

A trial's run is found again by its ``trial_id`` tag whenever the trial runs again (resume,
retry), so a trial never has two runs. Metrics logged while a trial trains go through an
:class:`Outbox`: a thread sends them and, while the tracking server cannot be reached, keeps
them and tries again, so training neither waits for the server nor loses what it measured.
Epoch metrics are logged with ``step = epoch``; on resume the run is reconciled with the
history stored in the checkpoint, so an epoch whose metrics were lost between checkpoint and
logging is filled in and none is logged twice. Reading the runs back is :mod:`mlpgrid.tracking.reader`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# MLflow draws a progress bar per artifact download when tqdm is installed; our output is ours.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from mlpgrid.grid import metrics
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.grid.spec import GridSpec, Trial, varying_settings
from mlpgrid.system.locks import exclusive
from mlpgrid.tracking import reader
from mlpgrid.tracking.reader import FINISHED, INTERRUPTED, RUNNING, GridRun

log = logging.getLogger(__name__)


def open_grid(grid: GridSpec, uri: str, storage: StorageLayout) -> GridRun:
    """The grid's experiment and parent run, created on first use.

    Drivers started together on one local store take turns (:attr:`StorageLayout.tracking_lock`):
    creating the SQLite schema twice at once fails. A server serialises for itself; an
    experiment another driver created meanwhile is used as it is.
    """
    local = uri.startswith("sqlite:") or uri.startswith("file:")
    if not local:
        return _open_grid(grid, uri, None)
    reader.check_store(uri)
    storage.root.mkdir(parents=True, exist_ok=True)
    relocate_store(storage, uri)
    with exclusive(storage.tracking_lock, wait_s=300):
        return _open_grid(grid, uri, storage.artifacts.as_uri())


def relocate_store(storage: StorageLayout, uri: str) -> None:
    """Point a moved or copied storage's own MLflow store at the artifacts beside it.

    MLflow records each experiment's and run's artifact location as an absolute path, so after
    ``mv .mlpgrid elsewhere`` (or a copy) new artifacts would go to the old place. Where ``uri`` is
    the store inside ``storage``, the locations under another ``mlartifacts`` folder are rewritten
    to this one's. MLflow has no call that changes a location: its database is updated directly
    (tables ``experiments`` and ``runs``, in one transaction, under the tracking lock).
    """
    if uri != reader.tracking_uri(storage) or not storage.mlflow_db.is_file():
        return
    here = storage.artifacts.as_uri()
    with exclusive(storage.tracking_lock, wait_s=300), contextlib.closing(sqlite3.connect(storage.mlflow_db)) as db, db:
        moved = [old for (old,) in db.execute("SELECT DISTINCT artifact_location FROM experiments")
                 if old and old != here and old.rstrip("/").endswith("/" + storage.artifacts.name)]  # fmt: skip
        for old in moved:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?", (here, old))
            under = "substr(artifact_uri, 1, ?) = ?"  # a run's folder under the old location
            db.execute(f"UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE {under}",
                       (here, len(old) + 1, len(old) + 1, old + "/"))  # fmt: skip
        if moved:
            log.info("%s: MLflow artifacts moved from %s to %s", storage.root, ", ".join(moved), here)


# MLflow 3's UI opens an experiment of this kind on its runs and metrics, not on GenAI traces.
_KIND = "mlflow.experimentKind"
_EXPERIMENT_TAGS = {_KIND: "custom_model_development"}


def _open_grid(grid: GridSpec, uri: str, artifacts: str | None) -> GridRun:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid.name)
    if experiment is None:
        # An explicit artifact location for a local store: otherwise artifacts land in ./mlruns
        # of whichever process creates the experiment. A server decides for itself.
        try:
            experiment_id = client.create_experiment(grid.name, artifact_location=artifacts, tags=_EXPERIMENT_TAGS)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(grid.name)
            assert found is not None, "created meanwhile by another driver"
            experiment_id = found.experiment_id
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(_KIND) != _EXPERIMENT_TAGS[_KIND]:  # made by an earlier version
            client.set_experiment_tag(experiment_id, _KIND, _EXPERIMENT_TAGS[_KIND])
    parent_id = reader.parent_run_id(uri, experiment_id)
    client.set_experiment_tag(experiment_id, VIEW_TAG, runs_view(grid))
    if parent_id is None:
        parent = client.create_run(experiment_id, run_name=grid.name, tags={"mlpgrid_role": "grid"})
        parent_id = parent.info.run_id
        client.log_text(parent_id, Path(grid.path).read_text(), "grid.yaml")
    else:
        client.update_run(parent_id, status="RUNNING")
    return GridRun(uri, experiment_id, parent_id, str(grid.path.resolve()))


# A saved view of MLflow's runs page (its "Views" menu; opened by ?viewStateShareKey=mlpgrid): the
# trials with the columns that matter and a chart of error against compute. MLflow 3 keeps saved
# views as experiment tags of this name, the view's state as JSON.
VIEW_ID = "mlpgrid"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"


def view_address(server: str, experiment_id: str, chart: bool = False) -> str:
    """The address of the grid's saved view on an MLflow server (its runs table, or its chart)."""
    return (f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_ID}"
            f"&workflowType=machine_learning" + ("&compareRunsMode=CHART" if chart else ""))  # fmt: skip


def runs_view(grid: GridSpec) -> str:
    """The grid's saved view: its trials (not the grid's parent run) by compute, each shown by
    model, N, T, the settings that vary, C, its error, best error and status; every run listed
    and in the charts; a scatter of the grid's metric against C (runs coloured by model)."""
    columns = ["params.`model`", "params.`examples`", "params.`epochs`",
               *(f"params.`{n}`" for n in varying_settings(grid.trials)),
               "metrics.`compute`", f"metrics.`{grid.metric}`", f"metrics.`{metrics.BEST_TEST_ERROR}`",
               "tags.`status`"]  # fmt: skip
    chart = {"uuid": "mlpgrid-error-vs-compute", "type": "SCATTER", "deleted": False, "isGenerated": False,
             "metricSectionId": "mlpgrid-scaling", "runsCountToCompare": len(grid.trials),
             "xaxis": {"key": "compute", "type": "METRIC"},
             "yaxis": {"key": grid.metric, "type": "METRIC"}}  # fmt: skip
    state = {
        "searchFilter": "tags.mlpgrid_role = 'trial'", "orderByKey": "metrics.`compute`", "orderByAsc": True,
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": columns, "columnOrder": [], "columnWidths": {"tags.`mlflow.runName`": 260},
        "runsHiddenMode": "SHOW_ALL", "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
        "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {},
        "compareRunCharts": [chart],
        "compareRunSections": [{"uuid": "mlpgrid-scaling", "name": f"{grid.name}: error against compute C",
                                "display": True, "isReordered": False, "deleted": False}],
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }  # fmt: skip
    now = int(time.time() * 1000)
    return json.dumps({"name": f"{grid.name}: trials", "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


# A run's colour in MLflow's charts, by its model's size: models within about 2x of each other
# may share one, larger steps never do.
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")  # fmt: skip


def run_colour(params: int) -> str:
    return _PALETTE[round(3 * math.log10(max(params, 1))) % len(_PALETTE)]


def trial_run(grid_run: GridRun, trial_id: str) -> Any:
    """The trial's MLflow run, or None before it has one."""
    client = MlflowClient(grid_run.tracking_uri)
    found = client.search_runs([grid_run.experiment_id], f"tags.trial_id = '{trial_id}'", max_results=1)
    return found[0] if found else None


def trial_tags(trial: Trial) -> dict[str, str]:
    cfg = trial.config
    return {
        "mlpgrid_role": "trial",
        "trial_id": trial.id,
        "model": cfg.model,
        "params": str(trial.params),
        "examples": str(cfg.num_examples),
        "epochs": str(cfg.epochs),
        "forward_flops": str(trial.forward_flops),
        "compute": f"{trial.compute:.6e}",
        "seed": str(cfg.seed),
        "pretraining": trial.pretraining_id,  # trials of one pre-training share its model
    } | {name: str(value) for name, value in trial.deployed_sizes.items()}


# MLflow metric names of config settings whose own name a per-epoch metric has (the rate at each epoch).
_SETTING_METRICS = {"lr": "peak_lr"}


def trial_numbers(trial: Trial, tags: dict[str, str] | None = None) -> dict[str, float]:
    """The trial's numbers as MLflow metrics (step 0), so that its UI can filter runs by range
    (``metrics.compute > 1e15``) and draw them on a chart's axes, which it does not do with
    params and tags (strings): P, N, T, C and FLOP(f) as ``params``, ``examples``, ``epochs``,
    ``compute`` and ``forward_flops``, every numeric setting under its own name (the peak
    learning rate as ``peak_lr``), a RepMLPNet's merged form's sizes
    (:attr:`~mlpgrid.grid.spec.Trial.deployed_sizes`) and a trunk's ``trained_compute`` from ``tags``."""
    numbers: dict[str, float] = {}
    for name, value in trial.config_dict().items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            numbers[_SETTING_METRICS.get(name, name)] = float(value)
    numbers |= {"params": float(trial.params), "examples": float(trial.config.num_examples),
                "forward_flops": float(trial.forward_flops), "compute": trial.compute}  # fmt: skip
    numbers |= {name: float(value) for name, value in trial.deployed_sizes.items()}
    if tags and "trained_compute" in tags:
        numbers["trained_compute"] = float(tags["trained_compute"])
    return numbers


# Answers that no retry would change.
_REFUSED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


class Outbox:
    """Metrics on their way to MLflow runs, sent in order by one background thread for every run
    of this process that logs to the same tracking URI (:meth:`of`).

    A worker training a group logs all its members' epochs through it, one batch at a time: with
    a sending thread per run, sixteen members' epochs written to one SQLite store at once kept
    some threads waiting 30 s (SQLAlchemy's pool timeout) for each batch, and each member's end
    waited for them (a 16-member lr sweep of B-1/Wi-16, in process on 2 cores).

    A batch the server does not take is kept and sent again (every ``retry_s``) until it is:
    nothing is lost while the server is away, and nothing is doubled when it returns — a
    metric is stored once per (key, step, timestamp, value), and a resent batch repeats those
    exactly. The thread lives as long as the process.
    """

    _by_uri: dict[str, Outbox] = {}
    _opening = threading.Lock()

    def __init__(self, client: MlflowClient, retry_s: float = 2.0):
        self.client, self.retry_s = client, retry_s
        self._pending: collections.deque[tuple[str, list[Metric]]] = collections.deque()  # (run id, batch)
        self._changed = threading.Condition()
        threading.Thread(target=self._send_forever, daemon=True, name="mlflow-outbox").start()

    @classmethod
    def of(cls, client: MlflowClient) -> Outbox:
        """The outbox of ``client``'s tracking URI in this process."""
        with cls._opening:
            if client.tracking_uri not in cls._by_uri:
                cls._by_uri[client.tracking_uri] = cls(client)
            return cls._by_uri[client.tracking_uri]

    def put(self, run_id: str, batch: list[Metric]) -> None:
        """Queue ``batch`` for run ``run_id``, after everything queued before it."""
        with self._changed:
            self._pending.append((run_id, batch))
            self._changed.notify_all()

    def _send_forever(self) -> None:
        while True:
            with self._changed:
                while not self._pending:
                    self._changed.wait()
                run_id, batch = self._pending[0]
            try:
                self.client.log_batch(run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - whatever the failure, nothing is dropped unless refused
                if getattr(e, "error_code", None) not in _REFUSED:  # away or busy: keep it, try again
                    log.warning("tracking server did not take %d metrics (%s); retrying", len(batch), e)
                    time.sleep(self.retry_s)
                    continue
                log.error("tracking server refused %d metrics for good: %s", len(batch), e)
            with self._changed:
                self._pending.popleft()
                self._changed.notify_all()

    def flush(self, run_id: str, timeout_s: float) -> None:
        """Wait until everything put for run ``run_id`` so far has arrived; TimeoutError if it
        has not by then."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while left := [batch for run, batch in self._pending if run == run_id]:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise TimeoutError(f"{sum(map(len, left))} metrics not delivered to the tracking server")
                self._changed.wait(wait)


class TrialRun:
    """The single MLflow run of one trial."""

    # How long the end of a trial waits for the tracking server to take its last metrics. If it
    # never does, the trial fails; its retry logs them again from the checkpoint's history.
    FLUSH_TIMEOUT_S = float(os.environ.get("MLPGRID_TRACKING_WAIT_S", 600))

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self.logged_epochs = {m.step for m in client.get_metric_history(run_id, "epoch")}
        self.best = min((m.value for m in client.get_metric_history(run_id, metrics.TEST_ERROR)), default=math.inf)
        self.attempt = len(client.get_metric_history(run_id, "startup_seconds"))
        self.outbox = Outbox.of(client)

    @classmethod
    def open(cls, grid_run: GridRun, trial: Trial, tags: dict[str, str] | None = None,
             name: str | None = None) -> TrialRun:  # fmt: skip
        """Reopen the trial's run, or create it (params, tags, numbers, config artifact) the
        first time, named ``name`` (default: model, N and T).

        ``tags`` describe this attempt (e.g. the Ray trial and node) and replace earlier ones.
        """
        client = MlflowClient(grid_run.tracking_uri)
        run = trial_run(grid_run, trial.id)
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            if "error" in run.data.tags:  # left by an earlier attempt
                client.delete_tag(run.info.run_id, "error")
        else:
            cfg = trial.config
            parent = {"mlflow.parentRunId": grid_run.parent_run_id, "grid_file": grid_run.grid_file,
                      "mlflow.runColor": run_colour(trial.params)}  # fmt: skip
            identity = {**trial_tags(trial), **parent}
            name = name or f"{cfg.model} N={cfg.num_examples} T={cfg.epochs}"
            run = client.create_run(grid_run.experiment_id, run_name=name, tags=identity)
        run_id = run.info.run_id
        if not run.data.params:  # new, or cut off before its params were logged
            config = trial.config_dict()
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in config.items()])
            client.log_text(run_id, json.dumps(config, indent=2), "trial_config.json")
        attempt = {"status": RUNNING} | (tags or {})
        numbers = [] if "compute" in run.data.metrics else trial_numbers(trial, tags).items()  # once
        client.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in numbers],
                         tags=[RunTag(k, v) for k, v in attempt.items()])  # fmt: skip
        return cls(client, run_id)

    def log_epochs(self, history: list[dict[str, Any]]) -> None:
        """Log the epochs of ``history`` this run does not hold yet."""
        now = int(time.time() * 1000)
        batch = []
        for m in sorted(history, key=lambda m: m["epoch"]):
            if m["epoch"] in self.logged_epochs:
                continue
            values = {key: m[key] for key in metrics.PER_EPOCH if key in m}
            if metrics.TEST_ERROR in m:  # an epoch evaluated (run.evaluate_every)
                self.best = min(self.best, m[metrics.TEST_ERROR])
                values[metrics.BEST_TEST_ERROR] = self.best  # so status reads it without the history
            batch += [Metric(key, float(v), now, m["epoch"]) for key, v in values.items()]
        if batch:
            self.outbox.put(self.run_id, batch)
            self.logged_epochs |= {m["epoch"] for m in history}

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until the metrics logged so far have arrived (TimeoutError after ``timeout_s``,
        default :attr:`FLUSH_TIMEOUT_S`)."""
        self.outbox.flush(self.run_id, self.FLUSH_TIMEOUT_S if timeout_s is None else timeout_s)

    def log_stages(self, values: dict[str, float]) -> None:
        """The metrics of the stages after pre-training, each logged once."""
        self.flush()
        logged = self.client.get_run(self.run_id).data.metrics
        now = int(time.time() * 1000)
        new = [Metric(k, float(v), now, 0) for k, v in values.items() if k not in logged]
        if new:
            self.client.log_batch(self.run_id, metrics=new)

    def log_attempt(self, values: dict[str, float]) -> None:
        """What this attempt at the trial took before training: ``startup_seconds`` from the
        runner's launch to the first step, ``compile_seconds`` of it compiling the model."""
        now = int(time.time() * 1000)
        self.outbox.put(self.run_id, [Metric(k, float(values[k]), now, self.attempt)
                                      for k in metrics.ATTEMPT if k in values])  # fmt: skip

    def log_file(self, path: str | Path) -> None:
        """A file the trial made (its first-layer picture), as an artifact of its run."""
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str, *, error: str | None = None, checkpoint: str | None = None,
               problems: list[str] | None = None) -> None:  # fmt: skip
        """Deliver what is still in the outbox, then record how the trial ended: ``status``, the
        ``error`` that ended it, its final ``checkpoint`` directory, and the damaged checkpoints
        it passed over (``problems``)."""
        self.flush()
        tags = {"status": status} | ({"error": error[-4000:]} if error else {})
        tags |= {"checkpoint": checkpoint} if checkpoint else {}
        tags |= {"checkpoint_problems": "\n".join(problems)[-4000:]} if problems else {}
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if error:
            self.client.log_text(self.run_id, error, "error.txt")
        self.client.set_terminated(self.run_id, "FINISHED" if status == FINISHED else "FAILED")


def mark_interrupted(grid_run: GridRun, trial_ids: list[str]) -> None:
    """Record that the trials' runs were cut off (:data:`INTERRUPTED`): no process trains them."""
    client = MlflowClient(grid_run.tracking_uri)
    found = reader.trial_runs(grid_run)  # one search, not one per trial
    for trial_id in trial_ids:
        run = found.get(trial_id)
        if run is not None and run.tags.get("status") == RUNNING:
            client.set_tag(run.run_id, "status", INTERRUPTED)
            client.set_terminated(run.run_id, "KILLED")


def end_grid(grid_run: GridRun, all_ended: bool) -> None:
    """The grid's parent run ends with the driver: FINISHED once every trial has ended, else
    KILLED (trials are left; a re-run opens it again)."""
    MlflowClient(grid_run.tracking_uri).set_terminated(grid_run.parent_run_id, "FINISHED" if all_ended else "KILLED")


def log_artifacts(grid_run: GridRun, files: dict[str, str]) -> None:
    """Log ``{artifact path: text}`` on the grid's parent run."""
    client = MlflowClient(grid_run.tracking_uri)
    for path, text in files.items():
        client.log_text(grid_run.parent_run_id, text, path)


def log_files(grid_run: GridRun, paths: list[Path], folder: str) -> None:
    client = MlflowClient(grid_run.tracking_uri)
    for path in paths:
        client.log_artifact(grid_run.parent_run_id, str(path), folder)


def proposals(grid_run: GridRun) -> list[dict[str, Any]]:
    """The proposals (``mlpgrid frontier --propose``) recorded on the grid's parent run."""
    client = MlflowClient(grid_run.tracking_uri)
    found = [a.path for a in client.list_artifacts(grid_run.parent_run_id, "proposals") if a.path.endswith(".json")]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(found):
            records.append(json.loads(Path(client.download_artifacts(grid_run.parent_run_id, path, tmp)).read_text()))
    return records
