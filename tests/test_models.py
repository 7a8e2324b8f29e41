import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from mlpgrid.cli import cli
from mlpgrid.models import architecture, networks

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
    built = networks.MLP(cfg)
    assert architecture.count_params(cfg) == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize("name", ["B-3/Wi-32", "S-4/Wi-40"])
def test_matmul_flops_match_torch_flop_counter(name):
    # torch counts 2 FLOPs per multiply-add and ignores norms: compare the matmul part.
    cfg = architecture.config_for(name, 5 * 5 * 3, 7, norm="none")
    with FlopCounterMode(display=False) as counter:
        networks.MLP(cfg)(torch.zeros(1, 3, 5, 5))
    assert counter.get_total_flops() == architecture.HARDWARE_FLOPS_PER_MAC * architecture.forward_flops(cfg)


def test_layernorm_adds_five_flops_per_element_like_fvcore():
    plain = architecture.config_for("B-2/Wi-16", 12, 3, norm="none")
    normed = architecture.config_for("B-2/Wi-16", 12, 3)
    assert architecture.forward_flops(normed) - architecture.forward_flops(plain) == 2 * 5 * 16


def test_b_mlp_block_is_pre_norm_inverted_bottleneck():
    cfg = architecture.config_for("B-1/Wi-8", 4, 2)
    block = networks.MLP(cfg).blocks[0]
    first, last = block.fn[0], block.fn[3]
    assert (first.in_features, first.out_features, last.out_features) == (8, 32, 8)
    z = torch.randn(5, 8)
    expected = z + last(torch.nn.functional.gelu(first(block.norm(z))))
    torch.testing.assert_close(block(z), expected)


def test_s_mlp_block_has_no_skip_and_relu():
    cfg = architecture.config_for("S-1/Wi-8", 4, 2)
    block = networks.MLP(cfg).blocks[0]
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


# The papers' sizes at 224x224x3 with 1000 classes (Tolstikhin et al. 2021, Table 1; Touvron
# et al. 2021, Table 1), in millions.
PATCH_PAPERS = {"Mixer-S/16": 18, "Mixer-B/16": 59, "Mixer-L/16": 207, "ResMLP-S12/16": 15, "ResMLP-S24/16": 30}
PATCH_MODELS = [f"Mixer-{s}/4" for s in architecture.MIXER_SIZES] + [f"ResMLP-{s}/4" for s in architecture.RESMLP_SIZES]


def patch_config(name, side=224, classes=1000, channels=3):
    return architecture.config_for(name, channels * side * side, classes, image=(channels, side))


@pytest.mark.parametrize("name,millions", PATCH_PAPERS.items())
def test_patch_models_have_their_papers_sizes(name, millions):
    assert architecture.count_params(patch_config(name)) / 1e6 == pytest.approx(millions, rel=0.03)


@pytest.mark.parametrize("name", PATCH_MODELS)
def test_patch_models_counted_params_match_the_built_model(name):
    cfg = patch_config(name, side=16, classes=7)
    with torch.device("meta"):
        built = networks.build(cfg)
    assert architecture.count_params(cfg) == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize("name", ["Mixer-S/4", "ResMLP-S12/4"])
def test_patch_models_matmul_flops_match_torch_flop_counter(name):
    """torch counts 2 FLOPs per multiply-add and no norms: the matmuls, plus Mixer's LayerNorms
    at 5 per element (ResMLP's Aff is elementwise, like a residual add)."""
    cfg = patch_config(name, side=16, classes=7)
    with FlopCounterMode(display=False) as counter:
        networks.build(cfg)(torch.zeros(1, 3, 16, 16))
    norms = (2 * cfg.depth + 1) * 5 * cfg.tokens * cfg.width if cfg.family == "Mixer" else 0
    assert counter.get_total_flops() == architecture.HARDWARE_FLOPS_PER_MAC * (architecture.forward_flops(cfg) - norms)


def test_patch_embedding_is_a_strided_convolution_and_blocks_are_as_the_papers():
    torch.manual_seed(0)
    cfg = patch_config("Mixer-S/4", side=8, classes=3)
    model, x = networks.build(cfg), torch.randn(2, 3, 8, 8)
    kernel = model.embed.weight.reshape(cfg.width, 3, 4, 4)
    conv = torch.nn.functional.conv2d(x, kernel, model.embed.bias, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.embed(networks.patches(x, model.cfg.patch)), conv)
    block, z = model.blocks[0], torch.randn(2, cfg.tokens, cfg.width)
    mixed = z + block.token_mlp(block.token_norm(z).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(block(z), mixed + block.channel_mlp(block.channel_norm(mixed)))
    res, y = networks.build(patch_config("ResMLP-S12/4", side=8, classes=3)).blocks[0], z[..., :384]
    mixed = y + res.token_scale * res.token_mix(res.token_affine(y).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(res(y), mixed + res.channel_scale * res.channel_mlp(res.channel_affine(mixed)))
    assert res.token_scale[0].item() == pytest.approx(0.1), "ResMLP-S12's LayerScale starts at 0.1"


def test_stochastic_depth_drops_whole_branches_per_example_in_training_only():
    drop = networks.DropPath(0.25).train()
    torch.manual_seed(0)
    out = drop(torch.ones(4000, 3, 5))
    per_example = out.flatten(1)
    assert per_example.unique().tolist() == pytest.approx([0.0, 4 / 3]), "a branch dropped whole or scaled 1/(1-p)"
    assert (per_example == per_example[:, :1]).all()
    assert (per_example[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    torch.manual_seed(0)
    cfg = architecture.config_for("ResMLP-S12/4", 3 * 8 * 8, 3, image=(3, 8), drop_path=0.5)
    model, plain = networks.build(cfg), networks.build(dataclasses.replace(cfg, drop_path=0.0))
    x = torch.randn(8, 3, 8, 8)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(x), plain.eval()(x))
    assert not torch.allclose(model.train()(x), plain.train()(x))
    with pytest.raises(ValueError, match="drop_path \\(stochastic depth\\) applies to Mixer and ResMLP only"):
        architecture.config_for("B-2/Wi-64", 784, 10, drop_path=0.1)


def test_patch_model_names_and_shapes_are_checked():
    with pytest.raises(ValueError, match="Mixer comes in sizes S, B, L, H"):
        architecture.parse_name("Mixer-X/16")
    with pytest.raises(ValueError, match="images of 28x28 do not divide into 16x16 patches"):
        patch_config("Mixer-B/16", side=28)
    with pytest.raises(ValueError, match="expansion apply to B- and S-MLPs only"):
        architecture.config_for("ResMLP-S12/4", 3 * 16 * 16, 10, image=(3, 16), expansion=2)
    assert architecture.parse_name("ResMLP-B24/8") == ("ResMLP", 24, 768)


def test_model_info_shows_patch_models():
    result = CliRunner().invoke(cli, ["model-info", "Mixer-B/4", "--resolution", "64", "--json"])
    info = json.loads(result.output)
    assert info["name"] == "Mixer-B/4" and round(info["params"] / 1e6, 1) == 59.9
    assert info["forward_flops"] == architecture.forward_flops(patch_config("Mixer-B/4", side=64))


# RepMLPNet's sizes as its README reports them at 1,000 classes: parameters (millions) and
# FLOPs (billions, its deployed form's multiply-adds: BatchNorm folded into the layer before).
REPMLPNET_PAPER = {("T", 224): (38.3, 2.8), ("T", 256): (58.7, 4.2), ("B", 224): (68.2, 6.7), ("B", 256): (96.5, 9.6),
                   ("D", 256): (86.9, 8.6), ("L", 256): (117.7, 11.5)}  # fmt: skip


@pytest.mark.parametrize("size,side", REPMLPNET_PAPER)
def test_repmlpnet_has_its_papers_sizes_in_both_forms(size, side):
    params, gflops = REPMLPNET_PAPER[size, side]
    cfg = patch_config(f"RepMLPNet-{size}/4", side=side)
    assert cfg.partitions == tuple(side // 4 // 2**i for i in range(4)), "one partition per stage map, as theirs"
    for form in (cfg, architecture.deployed(cfg)):
        assert architecture.count_params(form) / 1e6 == pytest.approx(params, abs=0.15)
    assert architecture.multiply_adds(architecture.deployed(cfg)) / 1e9 == pytest.approx(gflops, abs=0.09)
    assert architecture.forward_flops(cfg) > architecture.forward_flops(architecture.deployed(cfg))


REPMLPNET_OPTIONS = [{}, {"partition": 4, "kernels": (1, 3, 5)}, {"kernels": ()}]


@pytest.mark.parametrize("options", REPMLPNET_OPTIONS)
def test_repmlpnet_counts_match_the_built_modules_and_torchs_flop_counter_in_both_forms(options):
    """Parameters as built; multiply-adds as torch counts them (2 each; it counts no BatchNorm
    or pooling, which fvcore's FLOPs add at 2 and 1 per element)."""
    cfg = architecture.config_for("RepMLPNet-T/4", 3 * 64 * 64, 100, image=(3, 64), **options)
    trained = networks.build(cfg)
    for model in (trained, networks.inject_locality(trained.eval())):
        assert architecture.count_params(model.cfg) == sum(p.numel() for p in model.parameters())
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, 64, 64))
        assert counter.get_total_flops() == architecture.HARDWARE_FLOPS_PER_MAC * architecture.multiply_adds(model.cfg)
        assert architecture.forward_flops(model.cfg) > architecture.multiply_adds(model.cfg)


@pytest.mark.parametrize("options", REPMLPNET_OPTIONS)
def test_locality_injection_computes_what_the_trained_form_computes(options):
    """Trained weights and BatchNorm statistics (a few steps of SGD on random images), then in
    evaluation mode the merged pure MLP gives the training form's outputs."""
    torch.manual_seed(0)
    cfg = architecture.config_for("RepMLPNet-T/4", 3 * 32 * 32, 10, image=(3, 32), **options)
    model = networks.build(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    merged = networks.inject_locality(model)
    assert not merged.training and merged.cfg.deployed
    assert not any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in merged.modules()), "no conv branch left"
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-4)


def test_repmlpnet_names_options_and_shapes_are_checked():
    assert architecture.parse_name("RepMLPNet-B/4") == ("RepMLPNet", 18, 768)
    with pytest.raises(ValueError, match="RepMLPNet comes in sizes T, B, D, L"):
        architecture.parse_name("RepMLPNet-S/4")
    with pytest.raises(ValueError, match=r"halve the patch map of 28x28 images 3 times; use a side divisible by 32"):
        patch_config("RepMLPNet-T/4", side=28, classes=10, channels=1)
    with pytest.raises(ValueError, match="a local kernel's side is odd"):
        architecture.config_for("RepMLPNet-T/4", 3 * 64 * 64, 10, image=(3, 64), kernels=(1, 2))
    with pytest.raises(ValueError, match="partition 3 must divide each stage's side"):
        architecture.config_for("RepMLPNet-T/4", 3 * 64 * 64, 10, image=(3, 64), partition=3)
    with pytest.raises(ValueError, match="partition and local_kernels apply to RepMLPNet only"):
        architecture.config_for("B-2/Wi-64", 784, 10, partition=4)
    with pytest.raises(ValueError, match="norm apply to B- and S-MLPs"):
        architecture.config_for("RepMLPNet-T/4", 3 * 64 * 64, 10, image=(3, 64), norm="layernorm")
    assert patch_config("RepMLPNet-L/8", side=64).partitions == (8, 4, 2, 1)


def test_model_info_shows_repmlpnet_in_both_forms():
    result = CliRunner().invoke(cli, ["model-info", "RepMLPNet-T/4", "--resolution", "224", "--json"])
    info = json.loads(result.output)
    merged = architecture.deployed(patch_config("RepMLPNet-T/4"))
    assert round(info["params"] / 1e6, 1) == 38.3 and info["deployed_params"] == architecture.count_params(merged)
    assert info["deployed_forward_flops"] == architecture.forward_flops(merged) < info["forward_flops"]
