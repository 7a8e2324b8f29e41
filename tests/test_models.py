import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from mlpgrid import architecture, models
from mlpgrid.cli import cli

IN_64 = 64 * 64 * 3

# Table 3 of Bachmann et al.: parameters at 64x64x3 with an ImageNet-21k head.
TABLE_3 = {
    "B-6/Wi-256": 9e6,
    "B-12/Wi-256": 12e6,
    "B-6/Wi-512": 24e6,
    "B-12/Wi-512": 37e6,
    "B-6/Wi-1024": 74e6,
    "B-12/Wi-1024": 124e6,
}


@pytest.mark.parametrize("name,expected", TABLE_3.items())
def test_table_3_parameter_counts(name, expected):
    cfg = architecture.config_for(name, IN_64, 10450)
    assert abs(architecture.count_params(cfg) - expected) <= 1e6


def test_table_7_b12_wi768():
    cfg = architecture.config_for("B-12/Wi-768", IN_64, 1000)
    assert round(architecture.count_params(cfg) / 1e6, 2) == 66.89
    assert abs(architecture.forward_flops(cfg) - 66.8e6) < 0.1e6


OPTION_SETS = [
    {},
    {"activation": "relu", "norm": "batchnorm"},
    {"norm": "none", "skip": False},
    {"norm_position": "post", "expansion": 1},
    {"expansion": 0, "skip": True, "dropout": 0.1},
]


@pytest.mark.parametrize("family", ["B", "S"])
@pytest.mark.parametrize("options", OPTION_SETS)
def test_counted_params_match_the_built_model(family, options):
    cfg = architecture.config_for(f"{family}-3/Wi-48", 7 * 7 * 3, 11, **options)
    built = models.MLP(cfg)
    assert architecture.count_params(cfg) == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize("name", ["B-3/Wi-32", "S-4/Wi-40"])
def test_matmul_flops_match_torch_flop_counter(name):
    # torch counts 2 FLOPs per multiply-add and ignores norms: compare the matmul part.
    cfg = architecture.config_for(name, 5 * 5 * 3, 7, norm="none")
    with FlopCounterMode(display=False) as counter:
        models.MLP(cfg)(torch.zeros(1, 3, 5, 5))
    assert counter.get_total_flops() == architecture.HARDWARE_FLOPS_PER_MAC * architecture.forward_flops(cfg)


def test_layernorm_adds_five_flops_per_element_like_fvcore():
    plain = architecture.config_for("B-2/Wi-16", 12, 3, norm="none")
    normed = architecture.config_for("B-2/Wi-16", 12, 3)
    assert architecture.forward_flops(normed) - architecture.forward_flops(plain) == 2 * 5 * 16


def test_b_mlp_block_is_pre_norm_inverted_bottleneck():
    cfg = architecture.config_for("B-1/Wi-8", 4, 2)
    block = models.MLP(cfg).blocks[0]
    first, last = block.fn[0], block.fn[3]
    assert (first.in_features, first.out_features, last.out_features) == (8, 32, 8)
    z = torch.randn(5, 8)
    expected = z + last(torch.nn.functional.gelu(first(block.norm(z))))
    torch.testing.assert_close(block(z), expected)


def test_s_mlp_block_has_no_skip_and_relu():
    cfg = architecture.config_for("S-1/Wi-8", 4, 2)
    block = models.MLP(cfg).blocks[0]
    z = torch.randn(5, 8)
    torch.testing.assert_close(block(z), torch.relu(block.fn[0](block.norm(z))))


@pytest.mark.parametrize("bad", ["B-12/Wi-", "X-2/Wi-64", "B-0/Wi-64", "b-2/wi-64", "B-2/W-64"])
def test_bad_model_names_are_refused(bad):
    with pytest.raises(ValueError, match="B-<depth>/Wi-<width>"):
        architecture.parse_name(bad)


def test_compute_is_flops_times_three_n_t():
    assert architecture.compute(1000, 50, 4) == 1000 * 3 * 50 * 4


def test_model_info_cli_json():
    out = CliRunner().invoke(
        cli, ["model-info", "B-12/Wi-1024", "--resolution", "64", "--channels", "3", "--classes", "10450", "--json"]
    )
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert set(info) == {"name", "params", "forward_flops"}
    assert info["name"] == "B-12/Wi-1024" and abs(info["params"] - 124e6) <= 1e6


def test_model_info_cli_refuses_bad_name():
    out = CliRunner().invoke(cli, ["model-info", "B-12/W-1024"])
    assert out.exit_code != 0 and "unknown model 'B-12/W-1024'" in out.output
