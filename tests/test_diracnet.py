"""Tests for diracnet.py: the Dirac parameterisation, the networks, folding, optimiser groups."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from diracnet import (
    DiracConv1d,
    DiracConv2d,
    DiracConv3d,
    NCReLU,
    diracnet18,
    diracnet34,
    diracnet_cifar,
    fold,
    weight_decay_groups,
)
from helpers import n_params
from reference import assert_same_computation

CONVS = {1: DiracConv1d, 2: DiracConv2d, 3: DiracConv3d}


def dirac(conv: nn.Module) -> nn.Module:
    """The Dirac parametrization module (holding alpha, beta, delta) of a DiracConv."""
    return conv.parametrizations.weight[0]


def identity_conv(dims: int, in_ch: int, out_ch: int, **kwargs) -> nn.Module:
    """A float64 DiracConv with alpha = 1, beta = 0, i.e. weight = delta."""
    conv = CONVS[dims](in_ch, out_ch, 3, bias=False, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        dirac(conv).beta.zero_()
    return conv


# -----------------------------------------------------------------------------
# DiracConvNd


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_alpha_one_beta_zero_is_exact_identity(dims):
    conv = identity_conv(dims, 4, 4, padding=1)
    x = torch.randn(2, 4, *[5] * dims, dtype=torch.float64)
    assert torch.equal(conv(x), x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": 2, "dilation": 2},
        {"padding": 1, "groups": 2},
        {"padding": 1, "padding_mode": "circular"},
        {"padding": 1, "padding_mode": "reflect"},
    ],
)
def test_identity_with_dilation_groups_and_padding_modes(kwargs):
    conv = identity_conv(2, 4, 4, **kwargs)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    assert torch.equal(conv(x), x)


def test_partial_identity_when_channel_counts_differ():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    wider = identity_conv(2, 3, 5, padding=1)(x)
    assert torch.equal(wider[:, :3], x)
    assert torch.equal(wider[:, 3:], torch.zeros_like(wider[:, 3:]))
    narrower = identity_conv(2, 3, 2, padding=1)(x)
    assert torch.equal(narrower, x[:, :2])


def test_parameters_buffers_and_init():
    conv = DiracConv2d(3, 6, 3, padding=1, bias=False)
    names = {name for name, _ in conv.named_parameters()}
    assert names == {
        "parametrizations.weight.original",
        "parametrizations.weight.0.alpha",
        "parametrizations.weight.0.beta",
    }
    assert torch.equal(dirac(conv).alpha, torch.ones(6))
    assert torch.equal(dirac(conv).beta, torch.full((6,), 0.1))
    # delta is a fixed buffer, never trained.
    assert "delta" in dict(dirac(conv).named_buffers())
    assert not dirac(conv).delta.requires_grad


def test_weight_formula_and_stride_two():
    torch.manual_seed(0)
    conv = DiracConv2d(4, 6, 3, stride=2, padding=1, bias=True, dtype=torch.float64)
    with torch.no_grad():
        dirac(conv).alpha.uniform_(0.5, 1.5)
        dirac(conv).beta.uniform_(-1.0, 1.0)
    raw = conv.parametrizations.weight.original
    norms = raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    delta = torch.zeros(6, 4, 3, 3, dtype=torch.float64)
    for c in range(4):
        delta[c, c, 1, 1] = 1.0
    alpha = dirac(conv).alpha.view(-1, 1, 1, 1)
    beta = dirac(conv).beta.view(-1, 1, 1, 1)
    expected = alpha * delta + beta * raw / norms
    # float64, one formula: a few roundings of 2^-53 on each element
    assert torch.allclose(conv.weight, expected, rtol=1e-12, atol=0)

    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    y = conv(x)
    assert y.shape == (2, 6, 5, 5)
    assert_same_computation(y, F.conv2d(x, expected, conv.bias, stride=2, padding=1))


def test_weight_is_invariant_to_raw_scale():
    conv = DiracConv2d(4, 4, 3, padding=1, dtype=torch.float64)
    before = conv.weight.detach().clone()
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(7.0)
    assert_same_computation(conv.weight, before)


def test_reset_parameters_restores_init():
    conv = DiracConv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        dirac(conv).alpha.fill_(3.0)
        dirac(conv).beta.fill_(3.0)
        conv.parametrizations.weight.original.zero_()
    conv.reset_parameters()
    assert torch.equal(dirac(conv).alpha, torch.ones(4))
    assert torch.equal(dirac(conv).beta, torch.full((4,), 0.1))
    assert conv.parametrizations.weight.original.abs().sum() > 0


def test_gradcheck_single_conv():
    torch.manual_seed(0)
    conv = DiracConv2d(3, 4, 3, stride=2, padding=1, dtype=torch.float64)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in conv.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in conv.parameters()]

    def f(x, *params):
        return functional_call(conv, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *leaves))


@pytest.mark.parametrize("version", [2, 1])
def test_gradcheck_tiny_network(version):
    torch.manual_seed(0)
    model = diracnet_cifar(depth=10, width=0.25, version=version).double()
    prefix = "features.group1.0.conv.parametrizations.weight."
    names = [prefix + "original", prefix + "0.alpha", prefix + "0.beta"]
    params = dict(model.named_parameters())
    leaves = [params[name].detach().clone().requires_grad_() for name in names]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return functional_call(model, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *leaves))


# -----------------------------------------------------------------------------
# Networks


def test_parameter_counts_imagenet():
    # 11,523,368 and 21,638,952: the official v2 model definitions.
    assert n_params(diracnet18()) == 11_523_368
    assert n_params(diracnet34()) == 21_638_952


def test_parameter_counts_cifar():
    # The paper reports about 1.85M (DiracNet-34-2) and 36.45M (DiracNet-28-10).
    assert n_params(diracnet_cifar(34, 2)) == 1_854_378
    assert n_params(diracnet_cifar(28, 10)) == 36_450_090


def test_cifar_structure():
    model = diracnet_cifar(34, 1, num_classes=100, in_channels=1)
    dirac_convs = [m for m in model.modules() if isinstance(m, DiracConv2d)]
    assert len(dirac_convs) == 30  # 3 groups of 2 * (34 - 4) / 6 blocks
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize(
    "depth, message",
    [
        (35, "nearest valid depths are 34 and 40"),
        (27, "nearest valid depths are 22 and 28"),
        (4, "smallest valid depth is 10"),
    ],
)
def test_bad_depth_names_valid_depths(depth, message):
    with pytest.raises(ValueError, match=message):
        diracnet_cifar(depth, 1)


# -----------------------------------------------------------------------------
# Folding


def train_briefly(model: nn.Module, input_shape: tuple, num_classes: int) -> None:
    """A few SGD steps on random data so alpha, beta and BN statistics move."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dtype = next(model.parameters()).dtype
    model.train()
    for _ in range(2):
        x = torch.randn(input_shape, dtype=dtype)
        y = torch.randint(num_classes, (input_shape[0],))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def check_fold(model: nn.Module, input_shape: tuple, num_classes: int) -> None:
    """Fold a float64 model after a little training: the folded network computes the same."""
    convs = [m for m in model.modules() if isinstance(m, DiracConv2d)]
    alphas = [dirac(c).alpha.detach().clone() for c in convs]
    train_briefly(model, input_shape, num_classes)
    assert any(not torch.equal(dirac(c).alpha, a) for c, a in zip(convs, alphas, strict=True))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.running_mean.abs().sum() > 0 for bn in bns)

    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training

    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    allowed = (
        nn.Conv2d,
        nn.ReLU,
        NCReLU,
        nn.MaxPool2d,
        nn.AdaptiveAvgPool2d,
        nn.Flatten,
        nn.Linear,
    )
    for name, layer in folded.named_children():
        assert "." not in name
        assert type(layer) in allowed
        assert not parametrize.is_parametrized(layer)
        if isinstance(layer, nn.Conv2d):
            assert layer.bias is not None
    assert all(key.count(".") == 1 for key in folded.state_dict())

    x = torch.randn(3, *input_shape[1:], dtype=convs[0].weight.dtype)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert_same_computation(got, expected)


def test_fold_cifar():
    torch.manual_seed(0)
    check_fold(diracnet_cifar(34, 1).double(), (8, 3, 32, 32), 10)


def test_fold_imagenet():
    torch.manual_seed(0)
    check_fold(diracnet18().double(), (4, 3, 64, 64), 1000)


# -----------------------------------------------------------------------------
# Weight decay groups


def test_weight_decay_groups():
    model = diracnet_cifar(10, 0.25)
    decay, no_decay = weight_decay_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0

    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    # Conv and linear weights are exactly the parameters with more than one dimension.
    assert all(p.dim() > 1 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])

    no_decay_ids = {id(p) for p in no_decay["params"]}
    for m in model.modules():
        if isinstance(m, DiracConv2d):
            assert id(m.parametrizations.weight.original) not in no_decay_ids
            assert id(dirac(m).alpha) in no_decay_ids and id(dirac(m).beta) in no_decay_ids
        if isinstance(m, nn.BatchNorm2d):
            assert id(m.weight) in no_decay_ids and id(m.bias) in no_decay_ids
    assert id(model.classifier.bias) in no_decay_ids
    torch.optim.SGD(weight_decay_groups(model, 5e-4), lr=0.1)


# -----------------------------------------------------------------------------
# DiracNet v1: the v1 branch of szagoruyko/diracnets (arXiv 1706.00388v1)


def identity_conv_v1(in_ch: int, out_ch: int) -> nn.Module:
    """A float64 v1 DiracConv2d with alpha = 1, beta = 0, i.e. weight = its tiled delta."""
    conv = DiracConv2d(in_ch, out_ch, 3, padding=1, bias=False, version=1, dtype=torch.float64)
    with torch.no_grad():
        dirac(conv).alpha.fill_(1.0)
        dirac(conv).beta.zero_()
    return conv


def test_ncrelu_is_the_v1_definition():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y = NCReLU()(x)
    # The v1 README: torch.cat([x.clamp(min=0), x.clamp(max=0)], dim=1).
    assert torch.equal(y, torch.cat([x.clamp(min=0), x.clamp(max=0)], dim=1))
    assert torch.equal(y[:, :3] + y[:, 3:], x)


def test_v1_conv_parameters_and_init():
    conv = DiracConv2d(128, 64, 3, padding=1, bias=False, version=1)
    # v1 diracnet.py: one alpha (5) and one beta (1e-3) per conv, raw W ~ N(0, 0.1^2).
    assert torch.equal(dirac(conv).alpha, torch.tensor([5.0]))
    assert torch.equal(dirac(conv).beta, torch.tensor([1e-3]))
    raw = conv.parametrizations.weight.original
    # 73,728 draws of N(0, 0.1^2): mean and std within 0.0004 (one sigma); 0.005 is 13
    assert abs(raw.std().item() - 0.1) < 0.005 and abs(raw.mean().item()) < 0.005
    # The released DiracNet-18-0.75 keeps one beta per output channel.
    per_channel = DiracConv2d(8, 4, 3, padding=1, version=1, channel_beta=True)
    assert dirac(per_channel).alpha.shape == (1,)
    assert torch.equal(dirac(per_channel).beta, torch.full((4,), 1e-3))


def test_v1_delta_adds_the_ncrelu_halves_back():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    # Half as many outputs as inputs: [I, I] turns [relu(x), -relu(-x)] back into x.
    assert torch.equal(identity_conv_v1(8, 4)(NCReLU()(x)), x)
    # As many outputs as inputs (a group's first block): NCReLU passes through.
    assert torch.equal(identity_conv_v1(8, 8)(NCReLU()(x)), NCReLU()(x))


def test_v1_weight_formula():
    torch.manual_seed(0)
    conv = DiracConv2d(6, 3, 3, padding=1, version=1, dtype=torch.float64)
    with torch.no_grad():
        dirac(conv).alpha.fill_(0.7)
        dirac(conv).beta.fill_(-1.3)
    raw = conv.parametrizations.weight.original
    delta = torch.zeros(3, 6, 3, 3, dtype=torch.float64)
    for c in range(3):
        delta[c, c, 1, 1] = delta[c, c + 3, 1, 1] = 1.0
    expected = 0.7 * delta - 1.3 * raw / raw.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(conv.weight, expected, rtol=1e-12, atol=0)  # float64, one formula


@pytest.mark.parametrize("in_ch, out_ch, groups", [(6, 4, 1), (4, 6, 1), (8, 4, 2)])
def test_v1_conv_needs_one_group_and_multiple_channel_counts(in_ch, out_ch, groups):
    with pytest.raises(ValueError, match="groups=1 and one channel count a multiple"):
        DiracConv2d(in_ch, out_ch, 3, padding=1, groups=groups, version=1)


@pytest.mark.parametrize(
    "build",
    [
        lambda: diracnet_cifar(10, 1, version=3),
        lambda: diracnet18(version=0),
        lambda: DiracConv2d(4, 4, 3, version=3),
    ],
)
def test_bad_version_is_a_value_error(build):
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        build()


def test_v1_cifar_structure():
    model = diracnet_cifar(34, 1, num_classes=100, in_channels=1, version=1)
    blocks = [m for m in model.modules() if isinstance(m, DiracConv2d)]
    assert len(blocks) == 30
    # Every conv reads NCReLU's doubled channels: 2 * 16 into group 0, 2 * 16 and
    # then 2 * 32 in group 1, 2 * 32 and then 2 * 64 in group 2.
    ins = [c.in_channels for c in blocks]
    assert ins == [32] * 10 + [32] + [64] * 9 + [64] + [128] * 9
    assert all(dirac(c).alpha.shape == dirac(c).beta.shape == (1,) for c in blocks)
    # The v1 code pools the last BN's output without a ReLU.
    names = [name for name, _ in model.features.named_children()]
    assert names[-3:] == ["group2", "avgpool", "flatten"]
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)


def test_parameter_counts_v1_diracnet18_075():
    # diracnet-export.ipynb on the v1 branch prints "Total parameters: 12759464" for the
    # trained DiracNet-18-0.75 and 12753640 for its folded export.
    model = diracnet18(0.75, version=1)
    assert n_params(model) == 12_759_464
    assert n_params(fold(model.eval())) == 12_753_640


def describe(layer: nn.Module) -> tuple:
    """(kind, in, out, kernel, stride, padding) of a layer; the kind alone for the others."""
    if isinstance(layer, nn.Conv2d):
        return ("conv", layer.in_channels, layer.out_channels, *layer.kernel_size[:1],
                *layer.stride[:1], *layer.padding[:1])  # fmt: skip
    if isinstance(layer, nn.MaxPool2d):
        return ("maxpool", layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, nn.Linear):
        return ("linear", layer.in_features, layer.out_features)
    # Our adaptive pool equals the export's AvgPool2d(7) on its 7x7 map (224x224 input).
    if isinstance(layer, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return ("avgpool",)
    return (type(layer).__name__,)


def block(in_ch: int, out_ch: int) -> list[tuple]:
    return [("NCReLU",), ("conv", in_ch, out_ch, 3, 1, 1)]


def test_folded_v1_diracnet18_075_is_the_released_layer_sequence():
    # The printout of the exported DiracNet-18-0.75 in the v1 branch's README.
    pool = ("maxpool", 2, 2, 0)
    expected = [
        ("conv", 3, 48, 7, 2, 3), ("maxpool", 3, 2, 1),
        *block(96, 48), *block(96, 48), *block(96, 48), *block(96, 48), pool,
        *block(96, 96), *block(192, 96), *block(192, 96), *block(192, 96), pool,
        *block(192, 192), *block(384, 192), *block(384, 192), *block(384, 192), pool,
        *block(384, 384), *block(768, 384), *block(768, 384), *block(768, 384),
        ("ReLU",), ("avgpool",), ("Flatten",), ("linear", 384, 1000),
    ]  # fmt: skip
    folded = fold(diracnet18(0.75, version=1).eval())
    assert [describe(layer) for layer in folded] == expected
    with torch.no_grad():
        assert folded(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_fold_v1_cifar_float64():
    torch.manual_seed(0)
    check_fold(diracnet_cifar(16, 1, version=1).double(), (8, 3, 32, 32), 10)


def test_fold_v1_imagenet_float64():
    torch.manual_seed(0)
    check_fold(diracnet18(0.75, version=1).double(), (4, 3, 64, 64), 1000)


def test_weight_decay_groups_v1_decay_everything():
    model = diracnet_cifar(10, 0.25, version=1)
    decay, no_decay = weight_decay_groups(model, 5e-4)
    # v1 train.py: SGD(params.values(), lr, 0.9, weight_decay=opt.weightDecay).
    assert decay["weight_decay"] == 5e-4 and no_decay["params"] == []
    assert [id(p) for p in decay["params"]] == [id(p) for p in model.parameters()]
    torch.optim.SGD(weight_decay_groups(model, 5e-4), lr=0.1)
