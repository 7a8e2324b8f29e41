"""What a researcher sees in MLflow's own UI, in a real browser (Debian's Chromium driven by
Playwright) against a real `mlflow server` that a real `mlpgrid run` logged to: the grid's saved
view lists its trials with the columns that matter, and its chart draws error against compute."""

import os
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_server import MlflowServer

from conftest import REPO, mlpgrid_command
from mlpgrid.grid import spec
from mlpgrid.tracking.writer import view_address

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
# Headless on a machine with no network: Chromium's own background connections would be refused.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
SHOTS = Path(os.environ["MLPGRID_SCREENSHOTS"]) if "MLPGRID_SCREENSHOTS" in os.environ else None  # to look at
GRID = "name: view\nbase: {examples: 1000, epochs: 1, batch_size: 250}\ngrid:\n  model: [B-1/Wi-16, B-1/Wi-32]\n" \
       "  lr: [1.0e-3, 3.0e-3]\n"  # fmt: skip


def test_the_grids_saved_view_shows_its_trials_and_error_against_compute(tmp_path, write_grid, fashion_mnist):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: `bash scripts/setup.sh --dev` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    path = write_grid(GRID)
    grid = spec.load(path)
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        done = subprocess.run(mlpgrid_command("run", str(path), "--in-process", "--storage", str(tmp_path / "s"),
                                              "--tracking-uri", server.url),
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Next: mlpgrid frontier" in done.stdout, done.stdout
        experiment = MlflowClient(server.url).get_experiment_by_name(grid.name).experiment_id
        runs_page, chart_page = (view_address(server.url, experiment, chart) for chart in (False, True))
        assert runs_page in done.stdout, "the run ends with the view's address"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(runs_page)
                page.get_by_text("test_error", exact=True).first.wait_for(timeout=60_000)
                page.screenshot(path=SHOTS / "runs.png" if SHOTS else tmp_path / "runs.png")
                table = page.inner_text("body")
                for label in grid.labels.values():  # each trial by its name, not the grid's parent run
                    assert label[:18] in table, (label, table[:2000])
                for column in ("compute", "test_error", "best_test_error", "model", "examples", "epochs", "lr"):
                    assert page.get_by_text(column, exact=True).count() > 0, column
                assert f"{len(grid.trials)} matching runs" in table, table[-500:]

                page.goto(chart_page)
                page.get_by_text(f"{grid.name}: error against compute C").first.wait_for(timeout=60_000)
                chart = page.locator(".js-plotly-plot").first
                chart.wait_for(timeout=60_000)
                page.screenshot(path=SHOTS / "chart.png" if SHOTS else tmp_path / "chart.png")
                assert "compute" in chart.inner_text() and "test_error" in chart.inner_text()
            finally:
                browser.close()
    finally:
        server.stop()
