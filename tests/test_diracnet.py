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
    diracnet18,
    diracnet34,
    diracnet_cifar,
    fold,
    weight_decay_groups,
)

CONVS = {1: DiracConv1d, 2: DiracConv2d, 3: DiracConv3d}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small workloads run far faster on one thread than on contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
    assert torch.allclose(conv.weight, expected, rtol=1e-12, atol=0)

    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    y = conv(x)
    assert y.shape == (2, 6, 5, 5)
    assert torch.allclose(y, F.conv2d(x, expected, conv.bias, stride=2, padding=1))


def test_weight_is_invariant_to_raw_scale():
    conv = DiracConv2d(4, 4, 3, padding=1)
    before = conv.weight.detach().clone()
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(7.0)
    assert torch.allclose(conv.weight, before, rtol=1e-6, atol=1e-7)


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
        return functional_call(conv, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, (x, *leaves))


def test_gradcheck_tiny_network():
    torch.manual_seed(0)
    model = diracnet_cifar(depth=10, width=0.25).double()
    prefix = "features.group1.0.conv.parametrizations.weight."
    names = [prefix + "original", prefix + "0.alpha", prefix + "0.beta"]
    params = dict(model.named_parameters())
    leaves = [params[name].detach().clone().requires_grad_() for name in names]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return functional_call(model, dict(zip(names, params)), (x,))

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
    model.train()
    for _ in range(2):
        x = torch.randn(input_shape)
        y = torch.randint(num_classes, (input_shape[0],))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def check_fold(model: nn.Module, input_shape: tuple, num_classes: int) -> None:
    train_briefly(model, input_shape, num_classes)
    convs = [m for m in model.modules() if isinstance(m, DiracConv2d)]
    assert any(
        not torch.equal(dirac(c).alpha, torch.ones_like(dirac(c).alpha)) for c in convs
    )
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

    x = torch.randn(3, *input_shape[1:])
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_fold_cifar():
    torch.manual_seed(0)
    check_fold(diracnet_cifar(34, 1), (8, 3, 32, 32), 10)


def test_fold_imagenet():
    torch.manual_seed(0)
    check_fold(diracnet18(), (4, 3, 64, 64), 1000)


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
            assert (
                id(dirac(m).alpha) in no_decay_ids and id(dirac(m).beta) in no_decay_ids
            )
        if isinstance(m, nn.BatchNorm2d):
            assert id(m.weight) in no_decay_ids and id(m.bias) in no_decay_ids
    assert id(model.classifier.bias) in no_decay_ids
    torch.optim.SGD(weight_decay_groups(model, 5e-4), lr=0.1)
