"""Reading a grid's MLflow runs back: what `status`, `frontier` and a starting driver ask.

One search returns every trial run of a grid as a :class:`RunRecord` (its tags, params and
latest metrics). Against an MLflow server the search goes straight to the server's REST API
(``runs/search``, API 2.0) as JSON, sixteen searches at once (one per first hex digit of the
trial id). That skips importing MLflow and decoding its protobuf messages: for 1,000 runs on a
2-core machine, MLflow's import took 2.3 s and the decoding 1.5 s of the 9 s `status` took
(see ``benchmarks/status_scale.py``). Other stores (SQLite, files), and servers reached
through an MLflow auth plugin, are read through ``MlflowClient``. Nothing here writes; the
writing side is :mod:`mlpgrid.tracking.writer`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpgrid.data.files import regular_file
from mlpgrid.grid import metrics
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.grid.spec import GridSpec, TrialConfig
from mlpgrid.system import locks, waits
from mlpgrid.tracking.points import Point

# Run states, kept in the run's ``status`` tag.
RUNNING, FINISHED, FAILED, DIVERGED = "running", "finished", "failed", "diverged"
# A trial whose run says running but that no process trains (its driver was stopped or killed);
# run again, it continues from its last checkpoint.
INTERRUPTED = "interrupted"
# Each state's colour on a terminal (click's names), in the status table and the live view.
STATE_COLOURS = {FINISHED: "green", DIVERGED: "yellow", FAILED: "red", INTERRUPTED: "magenta", RUNNING: "cyan"}
DONE = (FINISHED, DIVERGED)  # never run again: a diverged trial would diverge again

TRIAL_RUNS = "tags.mlpgrid_role = 'trial'"
PAGE_SIZE = 1000  # runs per search request, the most an MLflow server gives
GRID_RUN = "tags.mlpgrid_role = 'grid'"


def tracking_uri(storage: StorageLayout, override: str | None = None) -> str:
    """The given URI, else a SQLite store in the storage directory. A SQLite path given relative
    is made absolute here, where it was meant: a Ray worker runs in a folder of its own."""
    if override and override.startswith("sqlite:///") and not override.startswith("sqlite:////"):
        return f"sqlite:///{Path(override.removeprefix('sqlite:///')).absolute()}"
    return override or f"sqlite:///{storage.mlflow_db}"


@dataclass(frozen=True)
class GridRun:
    """Where a grid's runs live; plain data, handed to every trial."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    grid_file: str = ""  # the file run now; each trial's run records the file that first ran it


@dataclass(frozen=True)
class RunRecord:
    """A run as a search returns it: ``status`` is MLflow's (RUNNING, FINISHED, FAILED, KILLED);
    the trial's own state is its ``status`` tag."""

    run_id: str
    status: str
    end_time: int | None  # ms since the epoch; None while it runs
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of each


# MLflow settings that change how its client talks to a server in ways the REST reader does
# not copy (auth plugins, request signing, workspaces): with any of them set, MlflowClient reads.
_CLIENT_ONLY_SETTINGS = ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_WORKSPACE")


class _Server:
    """An MLflow server's REST API, with the credentials MLflow's client would send: the
    ``MLFLOW_TRACKING_*`` token, user and password, and TLS settings."""

    def __init__(self, uri: str):
        parts = urllib.parse.urlsplit(uri)
        if parts.username is not None:
            # Credentials in the URI itself (http://user:password@host) go in a header, as urllib
            # would not send them; the address is used without them.
            uri = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
        self.base = uri.rstrip("/") + "/api/2.0/mlflow/"
        env = os.environ
        self.headers = {"Content-Type": "application/json"}
        if parts.username is not None:
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif env.get("MLFLOW_TRACKING_TOKEN"):
            self.headers["Authorization"] = f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"
        elif env.get("MLFLOW_TRACKING_USERNAME"):
            pair = f"{env['MLFLOW_TRACKING_USERNAME']}:{env.get('MLFLOW_TRACKING_PASSWORD', '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        self.context = None
        if uri.startswith("https:"):
            self.context = ssl.create_default_context(cafile=env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))
            if env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
                self.context.check_hostname, self.context.verify_mode = False, ssl.CERT_NONE
            if env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
                self.context.load_cert_chain(env["MLFLOW_TRACKING_CLIENT_CERT_PATH"])
        self.timeout_s = float(env.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 120))

    def call(self, endpoint: str, body: dict[str, Any] | None = None, query: dict[str, str] | None = None) -> dict:
        """POST ``body`` (or GET with ``query``) to ``endpoint``; MLflow's error message on failure.
        A server error (HTTP 5xx: one restarting, or overloaded) is asked again, within a bound."""
        url = self.base + endpoint + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=self.headers, method="POST" if data else "GET")

        def attempt(_: float) -> dict:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                answer = e.read().decode(errors="replace")
                if e.code >= 500:
                    raise _ServerBusy(f"{shown(url)}: HTTP {e.code} {answer[:300]}") from None
                try:
                    answer = json.loads(answer)
                except ValueError:
                    raise RuntimeError(f"{shown(url)}: HTTP {e.code} {answer[:300]}") from None
                raise _ServerError(answer.get("error_code", str(e.code)), answer.get("message", "")) from None

        return waits.wait_for(f"the MLflow server at {shown(self.base)}", attempt, retry_on=_ServerBusy)

    def search(self, experiment_id: str, where: str, **options: Any) -> list[dict]:
        """Every run of the experiment that ``where`` selects, as the server's JSON, page by page."""
        runs, token = [], None
        while True:
            body = {"experiment_ids": [experiment_id], "filter": where, "max_results": PAGE_SIZE, **options}
            page = self.call("runs/search", body | ({"page_token": token} if token else {}))
            runs += page.get("runs", [])
            token = page.get("next_page_token")
            if not token or options.get("max_results"):
                return runs


class _ServerBusy(RuntimeError):
    """The server answered with an error of its own (HTTP 5xx): worth asking again."""


class _ServerError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


def shown(text: str) -> str:
    """``text`` (a message, a URI) with the password of any URI in it replaced by ``***``: the one
    rule for what mlpgrid prints of a tracking URI."""
    return re.sub(r"(://[^/\s:@]+:)[^/\s@]+@", r"\1***@", text)


def _server(uri: str) -> _Server | None:
    """The REST reader for ``uri``, or None where MlflowClient must read."""
    plain = not any(os.environ.get(k) for k in _CLIENT_ONLY_SETTINGS)
    return _Server(uri) if uri.startswith(("http://", "https://")) and plain else None


def _record_of_json(run: dict) -> RunRecord:
    data = run.get("data", {})
    return RunRecord(
        run_id=run["info"]["run_id"], status=run["info"].get("status", "RUNNING"),
        end_time=int(run["info"]["end_time"]) if run["info"].get("end_time") else None,
        tags={t["key"]: t.get("value", "") for t in data.get("tags", [])},
        params={p["key"]: p.get("value", "") for p in data.get("params", [])},
        metrics={m["key"]: float(m["value"]) for m in data.get("metrics", [])},  # "NaN" too
    )  # fmt: skip


def record_of(run: Any) -> RunRecord:
    """An ``mlflow.entities.Run`` as a :class:`RunRecord`."""
    info, data = run.info, run.data
    return RunRecord(info.run_id, info.status, info.end_time, dict(data.tags), dict(data.params), dict(data.metrics))


def _client(uri: str) -> Any:
    from mlflow import MlflowClient  # only where the REST reader does not serve

    return MlflowClient(uri)


def parent_run_id(uri: str, experiment_id: str) -> str | None:
    """The grid's parent run: the first one made, should two drivers on a server both make one."""
    order = ["attributes.start_time ASC"]
    if server := _server(uri):
        found = server.search(experiment_id, GRID_RUN, max_results=1, order_by=order)
        return found[0]["info"]["run_id"] if found else None
    parents = _client(uri).search_runs([experiment_id], GRID_RUN, max_results=1, order_by=order)
    return parents[0].info.run_id if parents else None


def find_grid(grid: GridSpec, uri: str) -> GridRun | None:
    """The grid's experiment and parent run if they exist; creates nothing."""
    check_store(uri)
    if missing_store(uri):
        return None  # asking would create the database
    if server := _server(uri):
        try:
            experiment_id = server.call("experiments/get-by-name", query={"experiment_name": grid.name})
        except _ServerError as e:
            if e.code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None
        experiment_id = experiment_id["experiment"]["experiment_id"]
    else:
        experiment = _client(uri).get_experiment_by_name(grid.name)
        if experiment is None:
            return None
        experiment_id = experiment.experiment_id
    parent_id = parent_run_id(uri, experiment_id)
    return GridRun(uri, experiment_id, parent_id, str(grid.path.resolve())) if parent_id else None


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store at ``uri``; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_store(uri: str) -> None:
    """ValueError if the database of a local SQLite store at ``uri`` is there but no regular file
    (a directory: MLflow would retry opening it for minutes)."""
    path = _sqlite_file(uri)
    if path is not None and (path.exists() or path.is_symlink()):
        regular_file(path, 1 << 62, "an MLflow SQLite database")  # of any size


def missing_store(uri: str) -> Path | None:
    """The database file of a local SQLite store at ``uri`` that is not there (asking MLflow about
    it would create it), else None."""
    path = _sqlite_file(uri)
    return path if path is not None and not path.exists() else None


def scaled_versions(grid: GridSpec, uri: str) -> list[str]:
    """The names of the experiments of ``grid`` run with ``--scale`` in the store at ``uri``."""
    if missing_store(uri):
        return []
    found = _client(uri).search_experiments(filter_string=f"name LIKE '{grid.name}-scale%'")
    return sorted(e.name for e in found)


def trial_runs(grid_run: GridRun) -> dict[str, RunRecord]:
    """``{trial id: run}`` of every trial run the grid's experiment holds."""
    if server := _server(grid_run.tracking_uri):
        # Trial ids are hex: one search per first digit, at once, so a server with several
        # workers answers them side by side (1,000 runs: 3.2 s in one search, 1.7 s in 16).
        shards = [f"{TRIAL_RUNS} and tags.trial_id LIKE '{digit}%'" for digit in "0123456789abcdef"]
        with ThreadPoolExecutor(4) as pool:
            found = [run for shard in pool.map(lambda w: server.search(grid_run.experiment_id, w), shards)
                     for run in shard]  # fmt: skip
        runs = [_record_of_json(run) for run in found]
    else:
        client, runs, token = _client(grid_run.tracking_uri), [], None
        while True:
            page = client.search_runs([grid_run.experiment_id], TRIAL_RUNS, max_results=PAGE_SIZE, page_token=token)
            runs += [record_of(run) for run in page]
            token = page.token
            if not token:
                break
    return {run.tags["trial_id"]: run for run in runs}


def changed_trials(grid: GridSpec, grid_run: GridRun, runs: dict[str, RunRecord]) -> list[str]:
    """The ended trials this grid file ran that it no longer holds, each as
    ``<trial id>: field <as run> -> <in the file>, ...`` against the file's most similar trial.

    A trial is named by a hash of its settings, so editing a setting does not change a trial,
    it makes another one: these are the trials an edit would leave behind. Not so an edit of the
    stages after pre-training alone (a probe added): the new trial starts from the ended one's
    model. Trials other files ran into the same experiment (proposals from ``frontier
    --propose``) are not this file's.
    ``runs`` are the grid's trial runs (:func:`trial_runs`).
    """
    defaults = {f.name: str(f.default) for f in dataclasses.fields(TrialConfig)}
    current = [{k: str(v) for k, v in t.config_dict().items()} for t in grid.trials]
    in_file = {t.id for t in grid.trials}
    pretrainings = {t.pretraining_id for t in grid.trials}  # stages edited: the model carries over
    lines = []
    for trial_id, run in sorted(runs.items()):
        mine = run.tags.get("grid_file") == grid_run.grid_file
        kept = trial_id in in_file or run.tags.get("pretraining") in pretrainings
        if not mine or run.tags.get("status") not in DONE or kept:
            continue
        ran = {**defaults, **run.params}  # settings added since the run took their defaults
        nearest = min(current, key=lambda now: sum(ran.get(k) != v for k, v in now.items()))
        changes = ", ".join(f"{k} {ran.get(k)} -> {v}" for k, v in nearest.items() if ran.get(k) != v)
        lines.append(f"{trial_id}: {changes}")
    return lines


def data_tag(dataset: str) -> str:
    """The tag of a trial's run naming the checksum of the prepared dataset it trains on."""
    return f"data.{dataset}.sha256"


def data_changed(runs: dict[str, RunRecord], checksums: dict[str, str]) -> list[str]:
    """The trials whose runs (:func:`trial_runs`) record a prepared dataset of another checksum
    than ``checksums`` (by dataset name) gives, each as ``<trial id>: <dataset> <as run> -> <now>``:
    trained, in part or whole, on data that has changed since."""
    lines = []
    for trial_id, run in sorted(runs.items()):
        for name, now in sorted(checksums.items()):
            then = run.tags.get(data_tag(name))
            if then is not None and then != now:
                lines.append(f"{trial_id}: {name} {then[:12]} -> {now[:12]}")
    return lines


@dataclass
class StatusRow:
    """One trial of a grid as ``status`` shows it."""

    trial_id: str
    model: str
    params: float  # P
    examples: int  # N
    epochs: int  # T
    compute: float  # C
    state: str  # pending (no run yet), running, finished, failed, diverged, interrupted
    last_epoch: int = 0
    test_error: float | None = None
    best_test_error: float | None = None
    startup_seconds: float | None = None
    error: str | None = None
    run_id: str | None = None
    trained_compute: float | None = None  # what a wsd trial trained itself (a branch: its cooldown)


def grid_status(grid: GridSpec, grid_run: GridRun | None, storage: StorageLayout) -> list[StatusRow]:
    """One row per trial of the grid: its state (pending without a run), epochs, errors. The one
    place that says a trial was interrupted: its run says running, but no process holds its lock
    (its driver was killed)."""
    trial_dirs = storage.grid(grid.name)
    runs = trial_runs(grid_run) if grid_run else {}
    rows = []
    for trial in grid.trials:
        cfg, run = trial.config, runs.get(trial.id)
        row = StatusRow(trial.id, cfg.model, trial.params, cfg.num_examples, cfg.epochs, trial.compute, "pending")
        if run is not None:
            row = dataclasses.replace(
                row, state=run.tags.get("status", RUNNING), last_epoch=int(run.metrics.get("epoch", 0)),
                test_error=run.metrics.get(metrics.TEST_ERROR),
                best_test_error=run.metrics.get(metrics.BEST_TEST_ERROR),
                startup_seconds=run.metrics.get("startup_seconds"), error=run.tags.get("error"), run_id=run.run_id,
                trained_compute=run.metrics.get("trained_compute"),
            )  # fmt: skip
        lock = trial_dirs.trial(trial.id).lock
        if row.state == RUNNING and lock.exists() and locks.holder(lock) is None:
            row = dataclasses.replace(row, state=INTERRUPTED)
        rows.append(row)
    return rows


# Run params that place a trial on the compute plot; every other param is a setting.
_POINT_PARAMS = ("model", "examples", "epochs", "seed")


def finished_points(grid_run: GridRun, metric: str,
                    runs: dict[str, RunRecord] | None = None) -> tuple[list[Point], dict[str, int]]:  # fmt: skip
    """A point per finished trial run of the grid's experiment, with ``metric`` (its last
    value) as the error; and how many runs were left out, by reason. ``runs``: the grid's trial
    runs if already read (:func:`trial_runs`)."""
    points, counts = [], {"failed": 0, "diverged": 0, "running": 0, f"without {metric}": 0}
    for trial_id, run in (trial_runs(grid_run) if runs is None else runs).items():
        state, tags = run.tags.get("status", RUNNING), run.tags
        if state != FINISHED:
            counts[state if state in counts else "running"] += 1
        elif metric not in run.metrics:
            counts[f"without {metric}"] += 1
        else:
            settings = tuple(sorted((k, v) for k, v in run.params.items() if k not in _POINT_PARAMS))
            points.append(Point(
                compute=float(tags["compute"]), error=run.metrics[metric], params=float(tags["params"]),
                examples=float(tags["examples"]), epochs=float(tags["epochs"]), model=tags["model"],
                trial_id=trial_id, settings=settings,
            ))  # fmt: skip
    return points, counts


# Why an earlier epoch of a finished trial is, or is not, where a shorter trial would have ended.
CURVE_CONSTANT = "constant learning rate: each epoch from the end of warm-up on is a shorter trial's end"
CURVE_COSINE = "cosine schedule: at an earlier epoch the learning rate had not decayed as a shorter trial's would"
CURVE_NOT_PER_EPOCH = "the metric is not logged per epoch"
CURVE_WSD = ("wsd schedule: before its cooldown the rate is constant but not cooled down: a trunk's curve is drawn,"
             " not fitted")  # fmt: skip


def curve_points(grid_run: GridRun, metric: str, runs: dict[str, RunRecord],
                 points: list[Point]) -> tuple[list[Point], dict[str, int], list[Point]]:  # fmt: skip
    """The earlier epochs of the finished trials ``points`` (from :func:`finished_points`) that
    are valid end points, as points of their own; how many trials qualify or not, by why; and
    the constant-rate curves of wsd trials (those that are no branch: a branch's are its
    trunk's), states that are no trial's end, to be drawn and not fitted.

    With a constant learning rate, a trial's model after epoch t (once warm-up is over) is the
    final model of the same trial with T = t: the batches are functions of (seed, epoch, step).
    Under a cosine schedule it is not, so those trials give only their end. Under wsd, the
    epochs before the cooldown are a constant-rate run's, which a cooldown would still lower.
    """
    reasons = dict.fromkeys((CURVE_CONSTANT, CURVE_COSINE, CURVE_WSD, CURVE_NOT_PER_EPOCH), 0)
    chosen, stable = [], []
    for p in points:
        params = runs[p.trial_id].params
        schedule = params.get("schedule", "cosine")
        if metric not in metrics.EPOCH:
            reasons[CURVE_NOT_PER_EPOCH] += 1
        elif schedule == "wsd":
            reasons[CURVE_WSD] += 1
            if "trunk" not in runs[p.trial_id].tags:
                stable.append(p)
        elif schedule != "constant":
            reasons[CURVE_COSINE] += 1
        else:
            reasons[CURVE_CONSTANT] += 1
            chosen.append(p)
    histories = metric_histories(grid_run, [runs[p.trial_id].run_id for p in chosen + stable], metric)

    def earlier(p: Point, last: float, why: str) -> list[Point]:
        warmup = float(runs[p.trial_id].params.get("warmup_epochs", 0))
        return [dataclasses.replace(
            p, compute=p.compute * epoch / p.epochs, error=error, epochs=float(epoch), trial_id=f"{p.trial_id}@{epoch}",
            settings=(*p.settings, ("end", f"epoch {epoch} of {p.epochs:g}{why}")),
        ) for epoch, error in sorted(histories[runs[p.trial_id].run_id].items()) if warmup <= epoch < last]  # fmt: skip

    extra = [q for p in chosen for q in earlier(p, p.epochs, "")]
    cooled = [(p, (1 - float(runs[p.trial_id].params.get("cooldown", 0.2))) * p.epochs) for p in stable]
    curves = [q for p, last in cooled for q in earlier(p, last, ", constant rate, not cooled down")]
    return extra, {why: n for why, n in reasons.items() if n}, curves


def metric_histories(grid_run: GridRun, run_ids: list[str], metric: str) -> dict[str, dict[int, float]]:
    """``{run id: {step: value}}`` of ``metric`` (an epoch metric's step is its epoch)."""
    server = _server(grid_run.tracking_uri)

    def history(run_id: str) -> dict[int, float]:
        if server is None:
            assert client is not None
            return {m.step: m.value for m in client.get_metric_history(run_id, metric)}
        values: list[dict[str, Any]] = []
        token: dict[str, str] = {}
        while True:
            page = server.call("metrics/get-history", query={"run_id": run_id, "metric_key": metric, **token})
            values += page.get("metrics", [])
            if not page.get("next_page_token"):
                return {int(m.get("step", 0)): float(m["value"]) for m in values}
            token = {"page_token": page["next_page_token"]}

    client = None if server else _client(grid_run.tracking_uri)
    with ThreadPoolExecutor(8 if server else 1) as pool:  # one request per run: several at once
        return dict(zip(run_ids, pool.map(history, run_ids), strict=True))
