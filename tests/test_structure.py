"""How the code is laid out, where it matters to users: the storage layout, the grid-file
reference in the README, and what a Ray worker has to import."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout


def test_storage_layout_is_absolute_and_per_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = StorageLayout(Path("store"))
    assert storage.root == tmp_path / "store" and storage.mlflow_db == tmp_path / "store" / "mlflow.db"
    trial = storage.grid("quickstart").trial("3fa2c1d0e9b8")
    assert trial.checkpoints == tmp_path / "store" / "quickstart" / "3fa2c1d0e9b8" / "checkpoints"
    assert {trial.lock.parent, trial.stages.parent} == {trial.root}
    assert not (tmp_path / "store").exists(), "a layout only names paths"


def test_the_readmes_grid_file_reference_is_made_from_the_code():
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- grid-file reference: python -m mlpgrid.grid.spec -->\n")
    end = readme.index("<!-- end of grid-file reference -->")
    shown = readme[start:end].split("\n", 1)[1]
    assert shown == spec.reference(), "regenerate it with python -m mlpgrid.grid.spec"
    for name in [*spec.FIELDS, "checkpoint_every_steps", "data_budget_gb", "gpus_per_trial", "compile"]:
        assert f"| `{name}` |" in shown


def imports(blocked: list[str], modules: list[str], shown: str) -> str:
    """In a fresh interpreter with ``blocked`` unimportable, import ``modules`` and print
    ``shown`` (an expression); what it printed."""
    probe = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))  # importing these now fails\n"
        f"import {', '.join(modules)}\n"
        f"print({shown})\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_a_ray_worker_needs_neither_scipy_nor_matplotlib():
    """The module Ray imports for a worker's function imports without the frontier's and the
    figures' libraries (MLflow imports SciPy itself where it is installed, and goes on without)."""
    loaded = set(eval(imports(["scipy", "matplotlib"], ["mlpgrid.execution.ray_tune"],
                              "sorted(m for m in sys.modules if m.startswith('mlpgrid.'))")))  # fmt: skip
    assert "mlpgrid.execution.runner" in loaded and "mlpgrid.training.loop" in loaded
    assert not loaded & {
        "mlpgrid.analysis.frontier",
        "mlpgrid.analysis.plots",
        "mlpgrid.analysis.report",
        "mlpgrid.models.bench",
        "mlpgrid.cli",
    }


def test_status_and_frontier_import_no_torch_and_mlflow_only_to_log():
    """What `status` and `frontier` import stays free of torch, and of MLflow's client, SciPy's
    optimizer and matplotlib until a report is fitted, logged or drawn: each costs 0.6 to 2.3 s."""
    later = ["mlflow", "matplotlib", "scipy.optimize"]
    modules = ["mlpgrid.cli", "mlpgrid.tracking.reader", "mlpgrid.grid.locks", "mlpgrid.analysis.report"]
    shown = imports(["torch"], modules, f"[m for m in {later!r} if m in sys.modules]")
    assert shown == "[]", f"imported at start: {shown}"
