"""``mlpgrid frontier`` on a real MLflow store holding a grid's trial runs.

The runs are recorded through the same tracking API the trainer uses, with errors from a known
law instead of hours of training (training and its records are tested in test_runner.py).
"""

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlpgrid.cli import cli
from mlpgrid.grid import metrics, spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader, writer
from synthetic_law import Law

GRID = """name: synthetic
base: {optimizer: adamw, lr: 1.0e-3}
grid:
  model: [B-1/Wi-32, B-1/Wi-64, B-2/Wi-128, B-2/Wi-256]
  examples: [2000, 6000, 20000, 60000]
  epochs: [1, 4]
"""


def record(grid_run, trial, status="finished", error=None):
    """A trial run as the trainer leaves it: params, tags, epoch metrics, final state."""
    run = writer.TrialRun.open(grid_run, trial)
    if error is not None:
        values = dict.fromkeys(metrics.EPOCH, 1.0) | {"epoch": trial.config.epochs, "test_error": error}
        run.log_epochs([values])
    if status != "running":
        run.finish(status, error="boom" if status != "finished" else None)


def law_error(trial, rng):
    cfg = trial.config
    return float(Law().error(trial.params, cfg.num_examples * cfg.epochs) * np.exp(rng.normal(0, 0.01)))


@pytest.fixture
def recorded_grid(tmp_path, write_grid):
    """A 32-trial grid whose runs all finished, but one failed, one diverged and one running."""
    path, storage = write_grid(GRID), tmp_path / "store"
    grid = spec.load(path)
    grid_run = writer.open_grid(grid, reader.tracking_uri(StorageLayout(storage)), StorageLayout(storage))
    rng = np.random.default_rng(0)
    for i, trial in enumerate(grid.trials):
        status = {0: "failed", 1: "diverged", 2: "running"}.get(i, "finished")
        record(grid_run, trial, status, law_error(trial, rng) if status != "failed" else None)
    return path, storage, grid_run


def frontier(*args):
    result = CliRunner().invoke(cli, ["frontier", *map(str, args)])
    return result


def is_png(path):
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    return data[:8] == b"\x89PNG\r\n\x1a\n" and width >= 1000 and height >= 600


def test_frontier_fits_queries_plots_and_logs(tmp_path, recorded_grid):
    path, storage, grid_run = recorded_grid
    plots = tmp_path / "plots"
    result = frontier(path, "--storage", storage, "--budget", "1e13", "--budget", "3.5e14", "--json",
                      "--plot-dir", plots, "--bootstrap", "40")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["points"] == 29 and report["excluded"] == 2
    assert report["left_out"] == {"failed": 1, "diverged": 1, "running": 1, "without test_error": 0}
    fit = report["fit"]
    assert set(fit) >= {"a", "b", "alpha", "e_inf", "ci"} and 0 < fit["alpha"] < 1
    assert fit["ci"]["alpha"][0] <= fit["alpha"] <= fit["ci"]["alpha"][1]
    alloc = report["allocation"]
    assert set(alloc) >= {"params_exponent", "examples_exponent", "ci"}
    assert [q["budget"] for q in report["queries"]] == [1e13, 3.5e14]
    for q in report["queries"]:
        low, high = q["error_ci"]
        assert low <= q["error"] <= high
        assert q["model"].startswith("B-") and q["compute"] == pytest.approx(q["budget"], rel=0.15)
        assert 1 <= q["examples"] <= 60000 and q["epochs"] >= 1
    assert report["queries"][0]["error"] > report["queries"][1]["error"]
    assert report["labels"]["error"] == "test error"
    assert set(report["approaches"]) == {"envelope", "isoflop", "parametric"}
    law = report["approaches"]["parametric"]["law"]
    assert min(law["alpha"], law["beta"]) > 0 and 1 <= law["converged"] <= law["starts"] == 64
    for q in report["queries"]:
        for name, answer in q["approaches"].items():
            if name == "isoflop":  # most resamples of 29 trials lack 3 usable profiles: no interval from the few
                assert answer["params_ci"] is None
                continue
            low, high = answer["params_ci"]  # percentiles of the resamples: near the estimate, not always around it
            assert low < high and low / 1.5 <= answer["params"] <= high * 1.5, name
            assert answer["examples_per_param"] == pytest.approx(answer["examples_seen"] / answer["params"])
    figures = sorted(p.name for p in plots.iterdir())
    assert figures == ["allocation.png", "bottlenecks.png", "error_vs_compute.png", "isoflop.png"]
    assert all(is_png(plots / name) for name in figures)
    client = MlflowClient(grid_run.tracking_uri)
    logged = {a.path for a in client.list_artifacts(grid_run.parent_run_id, "frontier")}
    assert logged == {f"frontier/{name}" for name in [*figures, "frontier.json"]}

    human = frontier(path, "--storage", storage, "--budget", "1e13", "--bootstrap", "20")
    assert human.exit_code == 0, human.output
    assert "29 points (left out: 1 failed, 1 diverged, 1 running)" in human.output
    assert "E(C) = " in human.output and "P*(C) ∝ C^a, D*(C) = (N·T)* ∝ C^b, three ways" in human.output
    assert all(f"\n{name} " in human.output for name in ("1 envelope", "2 IsoFLOP", "3 E(P, D)"))
    assert "budget C" in human.output and "3 E(P, D)" in human.output.splitlines()[-1]


def test_the_fit_options_reach_the_report(recorded_grid):
    path, storage, _ = recorded_grid
    base = ["--storage", storage, "--json", "--bootstrap", "20"]
    default = json.loads(frontier(path, *base).output)
    assert default["options"] == {"space": "log", "bins_per_decade": 4, "e_inf": None, "starts": 64}
    chosen = json.loads(frontier(path, *base, "--seed", "3", "--bins-per-decade", "2", "--e-inf", "0.01",
                                 "--starts", "8").output)  # fmt: skip
    assert chosen["options"] == {"space": "log", "bins_per_decade": 2, "e_inf": 0.01, "starts": 8}
    assert chosen["bootstrap"]["seed"] == 3
    assert chosen["fit"]["e_inf"] == 0.01 and chosen["approaches"]["parametric"]["law"]["e_inf"] == pytest.approx(0.01)
    assert chosen["approaches"]["parametric"]["law"]["starts"] == 8
    assert len(chosen["approaches"]["envelope"]["bins"]) < len(default["approaches"]["envelope"]["bins"])
    too_high = frontier(path, "--storage", storage, "--e-inf", "0.9", "--bootstrap", "0")
    assert too_high.exit_code == 1 and "fixed E_inf of 0.9 must be at least 0 and below every error" in too_high.output


def test_proposed_trials_are_runnable_and_reported_against_the_prediction(tmp_path, recorded_grid):
    path, storage, grid_run = recorded_grid
    out = tmp_path / "next.yaml"
    result = frontier(path, "--storage", storage, "--propose", "3e12", "--out", out, "--bootstrap", "20")
    assert result.exit_code == 0, result.output
    proposed = spec.load(out)
    assert proposed.name == "synthetic" and 3 <= len(proposed.trials) <= 5
    assert all(t.compute == pytest.approx(3e12, rel=0.15) for t in proposed.trials)
    assert all(t.config.lr == 1e-3 and t.config.optimizer == "adamw" for t in proposed.trials)
    sizes = sorted(t.params for t in proposed.trials)
    assert sizes[-1] / sizes[0] > 4, "a spread of model sizes on both sides of P*"

    rng = np.random.default_rng(1)
    measured = {t.id: law_error(t, rng) for t in proposed.trials}
    for trial in proposed.trials:
        record(grid_run, trial, "finished", measured[trial.id])
    again = frontier(path, "--storage", storage, "--json", "--bootstrap", "20")
    assert again.exit_code == 0, again.output
    [report] = json.loads(again.output)["proposals"]
    assert report["budget"] == 3e12 and report["file"] == str(out)
    assert {t["trial_id"]: t["measured_error"] for t in report["trials"]} == measured
    assert all(t["predicted_error"] > 0 for t in report["trials"])

    # An output never replaces a file: not the source grid, not an earlier proposal.
    for target in (path, out):
        before = target.read_bytes()
        refused = frontier(path, "--storage", storage, "--propose", "3e12", "--out", target, "--bootstrap", "20")
        assert refused.exit_code == 2 and f"--out {target}: exists; an output never replaces" in refused.output
        assert target.read_bytes() == before
    missing = frontier(path, "--storage", storage, "--propose", "3e12", "--out", tmp_path / "no" / "next.yaml")
    assert missing.exit_code == 2 and "no such directory" in missing.output
    assert len(json.loads(frontier(path, "--storage", storage, "--json", "--bootstrap", "0").output)["proposals"]) == 1


def test_points_from_csv(tmp_path, recorded_grid):
    path, storage, grid_run = recorded_grid
    table = json.loads(frontier(path, "--storage", storage, "--json", "--bootstrap", "0").output)
    csv = tmp_path / "points.csv"
    rows = ["compute,error,params,examples,epochs"]
    rows += [f"{p['compute']},{p['error']},{p['params']},{p['examples']},{p['epochs']}" for p in table["frontier"]]
    csv.write_text("\n".join(rows) + "\n")
    result = frontier("--from-csv", csv, "--json", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["fit"]["alpha"] == pytest.approx(table["fit"]["alpha"], rel=1e-6)
    assert table["plots"] == [], "no figures unless asked for"
    logged = {a.path for a in MlflowClient(grid_run.tracking_uri).list_artifacts(grid_run.parent_run_id, "frontier")}
    assert logged == {"frontier/frontier.json"}


def test_clear_refusals(tmp_path, write_grid, recorded_grid):
    path, storage, grid_run = recorded_grid
    result = frontier(path, "--storage", storage, "--metric", "linear_probe_error")
    assert result.exit_code == 1
    assert "no finished trial with metric 'linear_probe_error'" in result.output
    assert "29 without linear_probe_error" in result.output

    nothing = frontier(path, "--storage", tmp_path / "empty")
    assert nothing.exit_code == 1 and "no finished trial" in nothing.output and "no trial runs" in nothing.output

    few = tmp_path / "few.csv"
    few.write_text("compute,error,params,examples,epochs\n1e9,0.5,1e5,1e4,1\n1e10,0.4,1e5,1e4,10\n")
    refused = frontier("--from-csv", few)
    assert refused.exit_code == 1 and "needs at least 5 frontier points" in refused.output

    assert "give a GRID_FILE" in frontier().output
    for bad in ("nan", "inf", "1e400"):
        for option in ("--budget", "--propose"):
            refused = frontier("--from-csv", few, option, bad)
            assert refused.exit_code == 2 and f"{bad!r} is not a finite number" in refused.output
    assert "--propose needs" in frontier(path, "--storage", storage, "--propose", "1e12").output


def test_json_output_is_json_without_nan():
    from mlpgrid.cli import _json

    written = _json({"ci": [float("nan"), float("inf")], "fit": {"a": 1.5}})
    assert json.loads(written) == {"ci": [None, None], "fit": {"a": 1.5}}


CONSTANT_GRID = """name: curves
base: {optimizer: adamw, lr: 1.0e-3, warmup_epochs: 1}
grid:
  model: [B-1/Wi-32, B-1/Wi-64, B-2/Wi-128, B-2/Wi-256]
  examples: [2000, 6000, 20000, 60000]
  epochs: [4]
  schedule: [constant, cosine]
"""


def test_curves_add_the_earlier_epochs_of_constant_learning_rate_trials(tmp_path, write_grid):
    """Each epoch from the end of warm-up on of a constant-lr trial is a point; a cosine trial
    gives only its end; and the report says which trials gave what, and why."""
    path, storage = write_grid(CONSTANT_GRID), tmp_path / "store"
    grid = spec.load(path)
    grid_run = writer.open_grid(grid, reader.tracking_uri(StorageLayout(storage)), StorageLayout(storage))
    rng = np.random.default_rng(0)
    for trial in grid.trials:
        run, cfg = writer.TrialRun.open(grid_run, trial), trial.config
        errors = [float(Law().error(trial.params, cfg.num_examples * t) * np.exp(rng.normal(0, 0.01)))
                  for t in range(1, cfg.epochs + 1)]  # fmt: skip
        run.log_epochs([dict.fromkeys(metrics.EPOCH, 1.0) | {"epoch": t + 1, "test_error": e}
                        for t, e in enumerate(errors)])  # fmt: skip
        run.finish("finished")
    plain = json.loads(frontier(path, "--storage", storage, "--json", "--bootstrap", "0").output)
    result = frontier(path, "--storage", storage, "--json", "--bootstrap", "0", "--curves")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    constant, cosine = reader.CURVE_CONSTANT, reader.CURVE_COSINE
    curves = {"points": 16 * 3, "trials": {constant: 16, cosine: 16}, "constant_rate": []}
    assert report["curves"] == curves, "epochs 1, 2, 3 of 4; no wsd trial"
    assert report["points"] == plain["points"] + 48 == 80
    ends = {p["settings"].get("end") for p in report["frontier"]}
    assert ends & {"epoch 1 of 4", "epoch 2 of 4", "epoch 3 of 4"}, "earlier epochs reach the frontier"
    refused = frontier("--from-csv", path, "--curves")
    assert refused.exit_code == 2 and "--curves reads the per-epoch errors of a grid's runs" in refused.output


FAMILIES_GRID = """name: families
base: {optimizer: adamw, lr: 1.0e-3}
grid:
  model: [B-1/Wi-32, B-1/Wi-64, B-2/Wi-128, B-2/Wi-256, Mixer-S/14, Mixer-S/7, Mixer-B/14, Mixer-B/7]
  examples: [2000, 6000, 20000, 60000]
  epochs: [1, 4]
"""


def test_each_family_gets_its_own_fit(tmp_path, write_grid):
    path, storage = write_grid(FAMILIES_GRID), tmp_path / "store"
    grid = spec.load(path)
    grid_run = writer.open_grid(grid, reader.tracking_uri(StorageLayout(storage)), StorageLayout(storage))
    rng = np.random.default_rng(0)
    for trial in grid.trials:
        record(grid_run, trial, "finished", law_error(trial, rng))
    result = frontier(path, "--storage", storage, "--json", "--bootstrap", "10", "--by-family", "--plot-dir",
                      tmp_path / "plots")  # fmt: skip
    assert result.exit_code == 0, result.output
    families = json.loads(result.output)["families"]
    assert set(families) == {"B", "Mixer"} and [f["points"] for f in families.values()] == [32, 32]
    assert all(0 < f["fit"]["alpha"] < 1 for f in families.values())
    assert (tmp_path / "plots" / "families.png").stat().st_size > 10_000
    human = frontier(path, "--storage", storage, "--bootstrap", "0", "--by-family")
    assert "By family" in human.output and "\nMixer " in human.output
    csv = tmp_path / "points.csv"
    csv.write_text("compute,error,params,examples,epochs\n1e12,0.2,1e6,5e4,4\n")
    refused = frontier("--from-csv", csv, "--by-family", "--bootstrap", "0")
    assert refused.exit_code == 1 and "--by-family needs each point's model name" in refused.output


def test_intervals_from_a_minority_of_resamples_are_not_printed(tmp_path):
    """Five frontier points: most resamples draw fewer than five distinct ones and cannot fit E(C);
    the few that can would give an interval of almost nothing."""
    csv = tmp_path / "five.csv"
    compute = np.logspace(10, 14, 5)
    rows = [f"{c},{0.1 + 30 * c**-0.15},{c**0.5 / 10},{c**0.5 / 3},1" for c in compute]
    csv.write_text("compute,error,params,examples,epochs\n" + "\n".join(rows) + "\n")
    result = frontier("--from-csv", csv, "--bootstrap", "40")
    assert result.exit_code == 0, result.output
    assert "n/a: intervals need most resamples fitted" in result.output
    assert "alpha 0.1500 n/a" in result.output and "[" not in result.output.split("E(C) =")[1].splitlines()[1]
