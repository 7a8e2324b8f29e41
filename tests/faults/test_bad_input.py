"""Any grid file either parses to trials or is refused with a message naming the file: never a traceback.

The examples are derandomized, so CI checks the same ones every run (a random search found a
grid-file path with a NUL byte that crashed the parser; it is refused now)."""

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mlpgrid import spec
from mlpgrid.spec import RunOptions, SpecError

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
