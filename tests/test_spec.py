from pathlib import Path

import pytest
from click.testing import CliRunner

from mlpgrid.cli import cli
from mlpgrid.grid import spec
from mlpgrid.grid.spec import SpecError

REPO = Path(__file__).resolve().parents[1]

VALID = """
base:
  optimizer: lion
  lr: 1e-4
grid:
  model: [B-2/Wi-64, S-2/Wi-64]
  examples: [600, 6000]
  epochs: [1, 2, 4]
zip:
  batch_size: [64, 128]
  weight_decay: [0.0, 0.001]
"""


def refused(write_grid, text: str) -> str:
    path = write_grid(text)
    with pytest.raises(SpecError) as e:
        spec.load(path)
    message = str(e.value)
    assert str(path) in message, "every message names the file"
    return message


def test_cartesian_product_times_zipped_axes(write_grid):
    grid = spec.load(write_grid(VALID))
    assert len(grid.trials) == 2 * 2 * 3 * 2
    pairs = {(t.config.batch_size, t.config.weight_decay) for t in grid.trials}
    assert pairs == {(64, 0.0), (128, 0.001)}
    assert all(t.config.lr == 1e-4 for t in grid.trials), "1e-4 reads as a number"


def test_several_zip_groups(write_grid):
    grid = spec.load(
        write_grid("base: {model: B-1/Wi-8, epochs: 1}\nzip:\n  - {lr: [0.1, 0.2]}\n  - {seed: [1, 2, 3]}\n")
    )
    assert len(grid.trials) == 6


def test_ids_are_stable_and_ignore_how_the_file_is_written(write_grid):
    first = [t.id for t in spec.load(write_grid(VALID, "a.yaml")).trials]
    again = [t.id for t in spec.load(write_grid(VALID, "b.yaml")).trials]
    assert first == again and len(set(first)) == len(first)
    reordered = VALID.replace("  optimizer: lion\n  lr: 1e-4\n", "  lr: 0.0001\n  optimizer: lion\n")
    assert sorted(t.id for t in spec.load(write_grid(reordered, "c.yaml")).trials) == sorted(first)


def test_id_is_a_hash_of_the_resolved_config(write_grid):
    one = spec.load(write_grid("base: {model: B-1/Wi-8, epochs: 1, lr: 1}\n", "a.yaml")).trials[0]
    same = spec.load(write_grid("base: {model: B-1/Wi-8, epochs: 1, lr: 1.0, optimizer: lion}\n", "b.yaml")).trials[0]
    other = spec.load(write_grid("base: {model: B-1/Wi-8, epochs: 1, lr: 1.0, seed: 1}\n", "c.yaml")).trials[0]
    assert one.id == same.id != other.id
    assert one.id == spec.trial_id(one.config)


def test_quickstart_grid_is_valid():
    grid = spec.load(REPO / "grids" / "quickstart.yaml")
    assert len(grid.trials) == 18
    assert {t.config.model for t in grid.trials} == {"B-2/Wi-64", "B-2/Wi-128", "B-4/Wi-256"}


def test_unknown_key_suggests_the_right_one(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1, learning_rate: 0.1}\n")
    assert "base.learning_rate: unknown field 'learning_rate'; did you mean 'lr'?" in message


def test_unknown_top_level_key(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1}\ngrids:\n  seed: [1, 2]\n")
    assert "grids: unknown field 'grids'; did you mean 'grid'?" in message


def test_wrong_type(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: two}\n")
    assert "base.epochs: expected int, got str 'two'" in message


def test_bool_is_not_a_number(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1, batch_size: true}\n")
    assert "base.batch_size: expected int, got bool True" in message


def test_negative_examples(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1}\ngrid:\n  examples: [100, -5]\n")
    assert "grid.examples[1]: must be >= 1, got -5" in message


def test_unknown_model(write_grid):
    message = refused(write_grid, "base: {epochs: 1}\ngrid:\n  model: [B-2/Wi-64, B-2/Wx-64]\n")
    assert "grid.model[1]: unknown model 'B-2/Wx-64'; expected 'B-<depth>/Wi-<width>'" in message


def test_stochastic_depth_is_for_patch_models_and_keeps_trials_apart(write_grid):
    message = refused(write_grid, "base: {epochs: 1, drop_path: 0.1}\ngrid:\n  model: [Mixer-S/7, B-2/Wi-64]\n")
    assert "grid.model[1]: B-2/Wi-64: drop_path (stochastic depth) applies to Mixer and ResMLP only" in message
    from mlpgrid.execution.groups import group_key

    (trial,) = spec.load(write_grid("base: {model: ResMLP-S12/7, epochs: 1, drop_path: 0.1}\n")).trials
    assert trial.config.model_config().drop_path == 0.1
    assert group_key(trial.config) is None, "its masks come from its own random stream"


def test_unknown_dataset(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1, dataset: imagenet42}\n")
    assert (
        "base.dataset: unknown dataset 'imagenet42'; built in: fashion-mnist, cifar-10" in message
        and "mlpgrid data prepare" in message
    )


def test_unknown_optimizer(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1}\ngrid:\n  optimizer: [lion, lamb]\n")
    assert "grid.optimizer[1]: unknown optimizer 'lamb'; allowed: lion, adamw, sgd" in message


def test_more_examples_than_the_dataset_has(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1}\ngrid:\n  examples: [1000, 70000]\n")
    assert "grid.examples[1]: 70000 examples requested but fashion-mnist has 60000 training images" in message


def test_missing_required_field(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8}\n")
    assert "epochs: required field missing" in message


def test_empty_axis(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1}\ngrid:\n  seed: []\n")
    assert "grid.seed: empty axis" in message


def test_zip_lengths_must_match(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1}\nzip:\n  lr: [0.1, 0.2]\n  seed: [1]\n")
    assert "zip: zipped axes need equal lengths" in message


def test_field_set_in_base_and_zip(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1, lr: 0.1}\nzip:\n  lr: [0.1, 0.2]\n")
    assert "zip.lr: lr is already set in base.lr" in message


def test_field_set_twice(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1}\ngrid:\n  epochs: [1, 2]\n")
    assert "grid.epochs: epochs is already set in base.epochs" in message


def test_list_in_base(write_grid):
    message = refused(write_grid, "base: {model: [B-1/Wi-8], epochs: 1}\n")
    assert "base.model: base holds single values; put lists under grid or zip" in message


def test_duplicate_trials(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 1}\ngrid:\n  lr: [0.1, 1.0e-1]\n")
    assert "grid.lr[1]: duplicate trial: same settings as grid.lr[0]" in message


def test_malformed_yaml_names_the_line(write_grid):
    message = refused(write_grid, "base:\n  model: B-1/Wi-8\n  epochs: [1\n")
    assert "malformed YAML" in message and "line" in message


def test_every_problem_is_reported_at_once(write_grid):
    message = refused(write_grid, "base: {model: B-1/Wi-8, epochs: 0, optimizer: adam, lrr: 1}\n")
    assert len(message.splitlines()) == 3


def test_yaml_cannot_run_code(write_grid):
    message = refused(write_grid, "base: !!python/object/apply:os.system ['echo pwned']\n")
    assert "malformed YAML" in message


def test_unknown_trial_id(write_grid):
    grid = spec.load(write_grid(VALID))
    with pytest.raises(SpecError, match="no trial with id 'zzz'"):
        grid.trial("zzz")
    assert grid.trial(grid.trials[3].id[:8]) is grid.trials[3]


def test_dry_run_prints_the_compute_table(write_grid):
    path = write_grid(VALID)
    result = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    grid = spec.load(path)
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "trial",
        "model",
        "params",
        "P",
        "examples",
        "N",
        "epochs",
        "T",
        "FLOP(f)",
        "compute",
        "C",
    ]
    assert len(lines) == 1 + len(grid.trials) + 2
    first = grid.trials[0]
    assert lines[1].split()[0] == first.id and f"{first.compute:.3e}" in lines[1]
    assert f"total compute C = {sum(t.compute for t in grid.trials):.3e}" in lines[-2]
    training = sum(2 * 4 * t.params * 2 for t in grid.trials)  # two of fp32 weights and Lion's one slot, the default
    final = sum(4 * t.params for t in grid.trials)
    assert lines[-1] == (
        f"storage for checkpoints: {training / 1e9:.3g} GB at most while the trials train (two each, with "
        f"optimizer state), {final / 1e9:.3g} GB once they have finished (final weights each)"
    )


def test_cli_reports_spec_errors_without_traceback(write_grid):
    path = write_grid("base: {model: B-1/Wi-8, epochs: 1, optimiser: lion}\n")
    result = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert result.exit_code == 1
    assert "Error:" in result.output and "did you mean 'optimizer'" in result.output
    assert "Traceback" not in result.output


def test_run_options_take_auto_or_a_value(write_grid):
    grid = spec.load(write_grid("run: {compile: true, gpus_per_trial: 0.5, data_budget_gb: auto}\n" + VALID))
    assert (grid.run.compile, grid.run.gpus_per_trial, grid.run.data_budget_gb) == (True, 0.5, None)
    assert spec.load(write_grid("run: {compile: auto, gpus_per_trial: auto}\n" + VALID)).run == spec.RunOptions()
    assert spec.load(write_grid("run: {gpus_per_trial: 4, workers: 2}\n" + VALID)).run.gpus_per_trial == 4
    message = refused(write_grid, "run: {compile: 1, gpus_per_trial: 1.5, checkpoint_every_steps: auto, workers: 0}\n"
                      + VALID)  # fmt: skip
    assert "run.compile: expected true, false or auto, got 1" in message
    assert ("run.gpus_per_trial: expected the share of one GPU a trial takes (0 < x <= 1), a whole number of GPUs "
            "(>= 2) or auto, got 1.5") in message  # fmt: skip
    assert "run.checkpoint_every_steps: expected a whole number, got 'auto'" in message
    assert "run.workers: expected a whole number >= 1 or auto, got 0" in message


def test_a_key_set_twice_and_declared_facts_out_of_range_are_refused_at_once(write_grid):
    """YAML keeps the last of two equal keys silently; a declared dataset of 10^9 classes once ran
    out of memory building their names, and one of zero classes was accepted with C = 0."""
    with pytest.raises(SpecError, match=r"line 3, .*'epochs' appears twice in one mapping \(the first at line 2\)"):
        spec.load(write_grid("base:\n  epochs: 1\n  epochs: 3\n  model: B-1/Wi-16\n"))
    declared = "data:\n  big: {{path: big, classes: {}, train: 1000, test: 100, resolution: 32}}\n" \
               "base: {{dataset: big, model: B-1/Wi-16, epochs: 1}}\n"  # fmt: skip
    for classes, shown in ((10**9, "1,000,000,000"), (0, "0")):
        with pytest.raises(SpecError, match=f"data.big: classes must be from 1 to 1,000,000, got {shown}"):
            spec.load(write_grid(declared.format(classes)))
    assert spec.load(write_grid(declared.format(21841))).trials[0].config.model_config().num_classes == 21841
