"""Any grid file either parses to trials or is refused with a message naming the file: never a traceback.

The examples are derandomized, so CI checks the same ones every run (a random search found a
grid-file path with a NUL byte that crashed the parser; it is refused now)."""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import REPO
from mlpgrid.grid import spec
from mlpgrid.grid.spec import RunOptions, SpecError

TOP = ["name", "description", "metric", "data", "run", "base", "grid", "zip"]
KNOWN = TOP + list(spec.FIELDS) + [f for f in RunOptions.__dataclass_fields__] + ["modle", "n", "bs"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10), st.sampled_from(["B-2/Wi-64", "S-1/Wi-8", "fashion-mnist", "lion", "auto", "1e-3", "[1"]),
)  # fmt: skip
KEYS = st.one_of(st.sampled_from(KNOWN), st.text(max_size=8))
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=10
)
DOCUMENTS = st.dictionaries(st.one_of(st.sampled_from(TOP), KEYS), VALUES, max_size=6)


def parse(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.yaml"
        path.write_text(text)
        try:
            grid = spec.load(path)
        except SpecError as e:
            assert str(path) in str(e), "the message names the file"
            return
        assert grid.trials, "a grid that parses has trials"


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS)
@example({"data": {"name": "\x00"}})  # a path with a NUL byte once crashed the parser
def test_any_mapping_parses_or_is_refused_with_a_message(document):
    parse(yaml.safe_dump(document))


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_any_text_parses_or_is_refused_with_a_message(text):
    parse(text)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    base=st.dictionaries(st.sampled_from(list(spec.FIELDS)), SCALARS, max_size=8),
    axis=st.sampled_from(list(spec.FIELDS)),
    values=st.lists(SCALARS, max_size=3),
)
def test_fields_with_values_of_any_type(base, axis, values):
    document = {"base": {"model": "B-1/Wi-8", "examples": 100, "epochs": 1, **base}, "grid": {axis: values}}
    parse(yaml.safe_dump(document))


def test_a_dataset_directory_of_another_layout_is_refused_before_training(tmp_path, fashion_mnist):
    from click.testing import CliRunner

    from mlpgrid.cli import cli

    path = tmp_path / "grid.yaml"  # CIFAR-10 pointed at Fashion-MNIST's idx files
    path.write_text(f"data:\n  cifar-10: {fashion_mnist}\nbase: {{dataset: cifar-10, model: B-1/Wi-16, epochs: 1}}\n")
    result = CliRunner().invoke(cli, ["run", str(path), "--storage", str(tmp_path / "s")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "dataset cifar-10:" in result.output and "missing data_batch_1" in result.output
    assert not (tmp_path / "s").exists(), "nothing written"


def _laughs(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nbase: {{model: B-1/Wi-16, epochs: 1}}\ngrid: {{seed: *a{levels - 1}}}\n"


HOSTILE = {
    "10^7 trials": ("base: {model: B-1/Wi-16}\ngrid:\n" + "".join(f"  {k}: [{', '.join(map(str, range(1, 11)))}]\n"
                    for k in ("epochs", "seed", "batch_size", "examples", "lr", "weight_decay", "warmup_epochs")),
                    "expands to 10,000,000 trials, more than run.max_trials (100,000)"),
    "billion laughs": (_laughs(9), "expands to more than 1,000,000 values"),
    "3000 levels": ("base: {model: B-1/Wi-16, epochs: 1}\nx: " + "[" * 3000 + "]" * 3000 + "\n",
                    "nested more than 100"),
    "inf": ("base: {model: B-1/Wi-16, epochs: 1, weight_decay: .inf}\n", "weight_decay: must be a finite number"),
    "nan in run": ("run: {data_budget_gb: .nan}\nbase: {model: B-1/Wi-16, epochs: 1}\n",
                   "run.data_budget_gb: expected"),
    "1e400": ("base: {model: B-1/Wi-16, epochs: 1, lr: 1e400}\n", "lr: must be a finite number, got inf"),
    "padded": ("base: {model: B-01/Wi-16, epochs: 1}\n", "unknown model 'B-01/Wi-16'"),
    "non-ASCII digits": ("base: {model: 'B-1/Wi-１６', epochs: 1}\n", "unknown model 'B-1/Wi-１６'"),
    "200 digits": ("base: {model: B-1/Wi-" + "9" * 200 + ", epochs: 1}\n", "unknown model"),
    "too wide": ("base: {model: B-1/Wi-999999, epochs: 1}\n", "at most depth 1024 and width 131072"),
    "huge number": ("base: {model: B-1/Wi-16, epochs: " + "9" * 40 + "}\n", "must be at most 1e+12 in size"),
    "400 characters": ("name: " + "a" * 400 + "\nbase: {model: B-1/Wi-16, epochs: 1}\n", "name: expected up to 100"),
    "outside storage": ("name: ..\nbase: {model: B-1/Wi-16, epochs: 1}\n", "not starting with '.'"),
    "a file in storage": ("name: mlflow.db\nbase: {model: B-1/Wi-16, epochs: 1}\n", "is a file mlpgrid keeps"),
    "probe all": ("base: {model: B-1/Wi-16, epochs: 1, probe_datasets: [fashion-mnist], probe_examples: 70000}\n",
                  "leaving none to pre-train on"),
}  # fmt: skip


@pytest.mark.parametrize("attack", list(HOSTILE))
def test_hostile_grid_files_are_refused_with_the_reason(tmp_path, attack):
    text, reason = HOSTILE[attack]
    path = tmp_path / "grid.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError, match=re.escape(reason)):
        spec.load(path)


def test_files_that_are_not_grid_files_are_refused_unread(tmp_path):
    with pytest.raises(SpecError, match="/dev/zero: a device, not a regular file: a grid file must be one"):
        spec.load("/dev/zero")
    big = tmp_path / "big.yaml"
    big.write_text("#" * (spec.MAX_FILE_BYTES + 1))
    with pytest.raises(SpecError, match=f"big.yaml: {spec.MAX_FILE_BYTES + 1:,} bytes, more than "
                                        f"{spec.MAX_FILE_BYTES:,}: not a grid file"):  # fmt: skip
        spec.load(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match=r"latin.yaml: not UTF-8 text \(byte 9 is 0xe9\)"):
        spec.load(latin)


def test_a_symlink_loop_in_data_is_refused_with_its_entry(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    path = tmp_path / "grid.yaml"
    path.write_text(
        f"data: {{cifar-10: {tmp_path / 'loop'}}}\nbase: {{dataset: cifar-10, model: B-1/Wi-16, epochs: 1}}\n"
    )
    with pytest.raises(SpecError, match=r"data.cifar-10: .*loop: cannot be resolved \(Symlink loop"):
        spec.load(path)


def test_a_grid_may_raise_its_trial_cap():
    text = "run: {max_trials: 20}\nbase: {model: B-1/Wi-16}\ngrid: {epochs: [1, 2, 3, 4, 5], seed: [0, 1, 2, 3]}\n"
    assert len(spec.parse(text, Path("g.yaml")).trials) == 20
    with pytest.raises(SpecError, match="expands to 20 trials, more than run.max_trials \\(19\\)"):
        spec.parse(text.replace("20}", "19}"), Path("g.yaml"))


def test_an_output_that_cannot_be_written_whole_leaves_nothing(tmp_path):
    """A disk that fills up mid-write (here: a file-size limit, EFBIG, in a child process):
    the output is refused with the reason and no partial file is left behind."""
    out = tmp_path / "next.yaml"
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from mlpgrid.analysis import outputs\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        f"    outputs.write_new(Path({str(out)!r}), 'x' * 100_000)\n"
        "except outputs.OutputError as e:\n"
        "    sys.exit(str(e))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1 and f"{out}: cannot write it: File too large" in done.stderr
    assert not out.exists()


def test_a_fifo_or_a_device_as_a_grid_file_or_csv_is_refused_not_waited_on(tmp_path):
    """Reading a FIFO waits for a writer that never comes; /dev/zero never ends; a CSV field past
    the csv module's limit raised. Each is refused with a line naming the file."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.csv"
    huge.write_text("compute,error,params,examples\n1," + "9" * 200_000 + ",1,1\n")
    cases = [(["run", str(fifo), "--dry-run"], f"{fifo}: a FIFO, not a regular file: a grid file must be one"),
             (["run", "/dev/zero", "--dry-run"], "/dev/zero: a device, not a regular file: a grid file must be one"),
             (["frontier", "--from-csv", str(fifo)], f"{fifo}: a FIFO, not a regular file: a CSV of trials must be"),
             (["frontier", "--from-csv", "/dev/zero"], "/dev/zero: a device, not a regular file"),
             (["frontier", "--from-csv", str(huge)], f"{huge}: not a CSV of trials (field larger")]  # fmt: skip
    for args, said in cases:
        out = subprocess.run([sys.executable, "-m", "mlpgrid", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert out.returncode == 1 and said in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
