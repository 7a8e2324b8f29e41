"""How the code is laid out, where it matters to users: the storage layout, the grid-file
reference in docs/, what each package may import, and what a Ray worker has to import."""

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


def test_the_grid_file_reference_is_made_from_the_code():
    readme = (REPO / "docs" / "grid-files.md").read_text()
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
        "mlpgrid.training.bench",
        "mlpgrid.cli",
    }


def test_status_and_frontier_import_no_torch_and_mlflow_only_to_log():
    """What `status` and `frontier` import stays free of torch, and of MLflow's client, SciPy's
    optimizer and matplotlib until a report is fitted, logged or drawn: each costs 0.6 to 2.3 s."""
    later = ["mlflow", "matplotlib", "scipy.optimize"]
    modules = ["mlpgrid.cli", "mlpgrid.tracking.reader", "mlpgrid.system.locks", "mlpgrid.analysis.report"]
    shown = imports(["torch"], modules, f"[m for m in {later!r} if m in sys.modules]")
    assert shown == "[]", f"imported at start: {shown}"


# What each package may import of mlpgrid (besides itself): the layers of docs/architecture.md.
LAYERS = {
    "system": set(),
    "data": {"system"},
    "models": {"system"},
    "grid": {"system", "data", "models"},
    "policy": {"system", "data", "grid", "models"},
    "training": {"system", "data", "grid", "models", "policy"},
    "tracking": {"system", "data", "grid", "models"},
    "execution": {"system", "data", "grid", "models", "policy", "training", "tracking"},
    "analysis": {"system", "data", "grid", "models", "tracking"},
}


def test_each_package_imports_only_the_layers_below_it():
    """Read from the source: every ``import mlpgrid.X`` / ``from mlpgrid.X import`` of a package's
    modules, deferred imports inside functions included, names a package it may use."""
    import ast

    found = {}
    for package in LAYERS:
        path = REPO / "mlpgrid" / package
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
        for file in files:
            for node in ast.walk(ast.parse(file.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlpgrid"):
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "mlpgrid"]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.name.startswith("mlpgrid")]
                for name in names:
                    parts = name.split(".")
                    if len(parts) > 1 and parts[1] != package and parts[1] in LAYERS | {"cli": 0}:
                        found.setdefault(f"{file.relative_to(REPO)}", set()).add(parts[1])
    upward = {f: used - LAYERS[f.split("/")[1].removesuffix(".py")] for f, used in found.items()}
    assert not {f: u for f, u in upward.items() if u}, "imports against the layers"
    assert found, "the check saw the imports"


def test_the_light_commands_load_no_training_or_execution_code():
    """``status``, ``frontier`` and ``--dry-run`` bring no training or execution code (torch)."""
    light = set(eval(imports(["torch"], ["mlpgrid.cli", "mlpgrid.tracking.reader", "mlpgrid.analysis.report",
                                         "mlpgrid.policy"],
                             "sorted(m for m in sys.modules if m.startswith('mlpgrid.'))")))  # fmt: skip
    assert not {m for m in light if m.startswith(("mlpgrid.training", "mlpgrid.execution"))}
