"""densenet.py against independent facts: the paper's parameter counts, gradcheck,
the plain path for the memory-efficient one, and torchvision's DenseNet."""

import copy
import functools

import pytest
import torch
import torch._dynamo
import torchvision
from torch import nn

import densenet as D
from helpers import count_calls, n_params, tiny_densenet
from reference import (
    assert_gradcheck,
    assert_same_computation,
    assert_same_float64_steps,
    saved_activation_bytes,
)
from training import paper

# Parameter counts of the paper's models (paper.py: Table 2's rounded to its printed
# millions, Table 3's torchvision's published figures), and one at 100 classes.
PAPER_COUNTS = [
    *(pytest.param(functools.partial(D.densenet_cifar, m.depth, m.growth, bottleneck=m.bc,
                                     compression=m.compression), m.params, id=m.name)
      for m in paper.TABLE2),
    *(pytest.param(getattr(D, m.arch), m.params, id=m.arch) for m in paper.TABLE3),
    pytest.param(lambda: D.densenet_cifar(100, 12, num_classes=100), 800_032, id="BC-100-12 C100"),
]  # fmt: skip


@pytest.mark.parametrize("build,expected", PAPER_COUNTS)
def test_parameter_counts_match_the_paper(build, expected):
    assert n_params(build()) == expected


@pytest.mark.parametrize("model", paper.TABLE2, ids=lambda m: m.name)
def test_exact_counts_round_to_the_papers_millions(model):
    assert round(model.params / 1e6, 1) == model.params_m


def test_output_shapes_cifar_mnist_imagenet():
    with torch.no_grad():
        cifar = D.densenet_cifar(40, 12, bottleneck=False, compression=1).eval()
        assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        mnist = D.densenet_cifar(10, 4, in_channels=1).eval()
        assert mnist(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        imagenet = D.densenet121().eval()
        assert imagenet(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_stem_channels_follow_the_paper_and_can_be_set():
    assert (
        D.densenet_cifar(40, 12, bottleneck=False, compression=1).features.conv0.out_channels == 16
    )
    assert D.densenet_cifar(100, 12).features.conv0.out_channels == 24
    lua = D.densenet_cifar(40, 12, bottleneck=False, compression=1, num_init_features=24)
    assert lua.features.conv0.out_channels == 24
    assert D.densenet161().features.conv0.out_channels == 96


def test_layer_structure_and_init():
    m = D.densenet_cifar(10, 4)  # BC: one bottleneck layer per block
    layer = m.features.denseblock1.denselayer1
    assert layer.conv1.kernel_size == (1, 1) and layer.conv1.out_channels == 16
    assert layer.conv2.kernel_size == (3, 3) and layer.conv2.out_channels == 4
    trans = m.features.transition1
    assert trans.conv.out_channels == int(0.5 * (8 + 4))
    assert all(c.bias is None for c in m.modules() if isinstance(c, nn.Conv2d))
    assert all(
        torch.all(b.weight == 1) and torch.all(b.bias == 0)
        for b in m.modules()
        if isinstance(b, nn.BatchNorm2d)
    )
    assert torch.all(m.classifier.bias == 0)
    # He-normal, fan_out: std sqrt(2 / (k*k*out)) on a large conv
    big = D.densenet_cifar(100, 24).features.denseblock3.denselayer16.conv2
    fan_out = big.out_channels * 9
    # a sample std of n = 20,736 draws is off by 1/sqrt(2n) = 0.5 % (one sigma): 5 % is ten
    assert big.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


def test_dropout_only_in_training():
    m = D.densenet_cifar(10, 4, drop_rate=0.5)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(m(x), m(x))
        m.eval()
        assert torch.equal(m(x), m(x))


def test_dropout_follows_every_conv_but_the_first():
    m = D.densenet_cifar(10, 4, drop_rate=0.5, bottleneck=False, compression=1)
    seen = {}
    m.features.denseblock1.register_forward_hook(lambda mod, i, o: seen.__setitem__("block", o))
    m.features.transition1.pool.register_forward_pre_hook(
        lambda mod, i: seen.__setitem__("pool_in", i[0])
    )
    with torch.no_grad():
        m(torch.randn(8, 3, 16, 16))
    stem_channels = m.features.conv0.out_channels
    zeros = lambda t: (t == 0).float().mean().item()  # of thousands of draws: 0.5 +- 0.01
    assert zeros(seen["block"][:, :stem_channels]) == 0  # stem conv: no dropout
    assert 0.4 < zeros(seen["block"][:, stem_channels:]) < 0.6  # after the layer conv
    assert 0.4 < zeros(seen["pool_in"]) < 0.6  # after the transition conv, before pooling


def test_a_bottleneck_layer_drops_out_after_both_its_convs():
    """DenseNet-B's layer: dropout after the 1x1 bottleneck conv (what the 3x3 conv reads)
    and after the 3x3 conv (what the layer adds to the block)."""
    m = D.densenet_cifar(10, 4, drop_rate=0.5)  # BC: one bottleneck layer per block
    layer = m.features.denseblock1.denselayer1
    seen = {}
    layer.norm2.register_forward_pre_hook(lambda mod, i: seen.__setitem__("after_1x1", i[0]))
    layer.register_forward_hook(lambda mod, i, o: seen.__setitem__("after_3x3", o))
    with torch.no_grad():
        m(torch.randn(8, 3, 16, 16))
    zeros = lambda t: (t == 0).float().mean().item()  # of thousands of draws: 0.5 +- 0.01
    assert 0.4 < zeros(seen["after_1x1"]) < 0.6  # 8 x 16 x 16 x 16 values
    assert 0.4 < zeros(seen["after_3x3"]) < 0.6  # 8 x 4 x 16 x 16 values


@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_gradcheck_float64(bottleneck, memory_efficient):
    assert_gradcheck(tiny_densenet(bottleneck, memory_efficient))


@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_memory_efficient_equals_plain(bottleneck, drop_rate):
    plain = tiny_densenet(bottleneck, drop_rate=drop_rate)
    efficient = tiny_densenet(bottleneck, True, drop_rate)
    efficient.load_state_dict(plain.state_dict())
    assert_same_float64_steps(plain, efficient)


def test_memory_efficient_layers_read_one_buffer_per_block():
    """Each layer's input is a prefix view of the block's output, not a copy."""
    model = tiny_densenet(True, memory_efficient=True)
    block = model.features.denseblock1
    inputs, outputs = [], []
    for layer in block.values():
        layer.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    block.register_forward_hook(lambda *args: outputs.append(args[-1]))
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    (out,) = outputs
    assert len(inputs) == len(block)
    for x in inputs:
        assert x.data_ptr() == out.data_ptr()
        assert torch.equal(x, out[:, : x.shape[1]])


def _skip_unless_compile_runs() -> None:
    """Skip where this torch cannot compile on this Python (torch 2.0 on Python 3.11+)."""
    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as e:
        pytest.skip(f"torch.compile does not run here: {e}")


def test_memory_efficient_under_compile_equals_plain():
    """torch.compile traces the shared-buffer writes and the checkpoint correctly (and its
    recomputation counts each batch once in the running statistics)."""
    _skip_unless_compile_runs()
    assert_same_float64_steps(tiny_densenet(True), torch.compile(tiny_densenet(True, memory_efficient=True)))


def test_recomputation_only_when_training_with_grad():
    model = tiny_densenet(True, memory_efficient=True)
    calls = count_calls(model, nn.BatchNorm2d)
    # BN, not the conv: recomputation stops early, inside the conv, once all it needs is saved
    norm1 = "features.denseblock1.denselayer2.norm1"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    assert calls[norm1] == 2  # forward + recomputation in backward
    model.eval()
    model(x).sum().backward()
    assert calls[norm1] == 3  # eval: no checkpoint
    model.train()
    with torch.no_grad():
        model(x)
    assert calls[norm1] == 4


def test_memory_efficient_memory_grows_linearly_with_depth():
    x = torch.randn(2, 3, 8, 8)
    saved = {}
    for efficient in (False, True):
        for n in (8, 16, 24):  # layers per block
            torch.manual_seed(0)
            model = D.DenseNet(12, (n, n, n), memory_efficient=efficient)
            saved[efficient, n] = saved_activation_bytes(model, x)
    plain = [saved[False, n] for n in (8, 16, 24)]
    lean = [saved[True, n] for n in (8, 16, 24)]
    # quadratic: the second difference is clearly positive; linear: about zero
    assert plain[2] - 2 * plain[1] + plain[0] > 0.2 * (plain[1] - plain[0])
    assert abs(lean[2] - 2 * lean[1] + lean[0]) < 0.01 * (lean[1] - lean[0])
    assert lean[2] < 0.5 * plain[2]


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_batch_size_one_train_and_eval(memory_efficient):
    model = D.densenet_cifar(10, 4, memory_efficient=memory_efficient)
    x = torch.randn(1, 3, 32, 32)
    model(x).sum().backward()
    model.eval()
    assert model(x).shape == (1, 10)


def test_channels_last_matches_nchw():
    """The same computation in another layout: equal in float64. This checks the model's
    own layout handling; torch's fp32 channels_last kernels are test_bench's to check."""
    model = D.densenet_cifar(16, 4).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        fast = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert_same_computation(fast, ref)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"growth_rate": 0, "block_config": (2,)}, "growth_rate"),
        ({"growth_rate": -3, "block_config": (2,)}, "growth_rate"),
        ({"growth_rate": 12, "block_config": ()}, "block_config"),
        ({"growth_rate": 12, "block_config": (2, 0)}, "block_config"),
        ({"growth_rate": 12, "block_config": (2,), "compression": 0.0}, "compression"),
        ({"growth_rate": 12, "block_config": (2,), "compression": 1.5}, "compression"),
        ({"growth_rate": 12, "block_config": (2,), "drop_rate": 1.0}, "drop_rate"),
        ({"growth_rate": 12, "block_config": (2,), "drop_rate": -0.1}, "drop_rate"),
        ({"growth_rate": 12, "block_config": (2,), "stem": "resnet"}, "stem"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.DenseNet(**kwargs)


@pytest.mark.parametrize(
    "depth,bottleneck,nearest",
    [
        (101, True, "100 and 106"),
        (41, False, "40 and 43"),
        (6, True, "10"),
        (99, True, "94 and 100"),
    ],
)
def test_depth_that_does_not_fit_names_nearest_valid(depth, bottleneck, nearest):
    with pytest.raises(ValueError, match=f"depth {depth}.*{nearest}"):
        D.densenet_cifar(depth, 12, bottleneck=bottleneck)


TORCHVISION = [
    (torchvision.models.densenet121, D.densenet121),
    (torchvision.models.densenet169, D.densenet169),
    (torchvision.models.densenet201, D.densenet201),
    (torchvision.models.densenet161, D.densenet161),
]


@pytest.mark.parametrize("theirs,ours", TORCHVISION)
def test_torchvision_state_dict_loads_strictly(theirs, ours):
    ours().load_state_dict(theirs().state_dict(), strict=True)


def torchvision_densenet121(seed: int) -> nn.Module:
    """torchvision's own densenet121, seeded, with non-trivial BN statistics, so that eval
    mode tests them too."""
    torch.manual_seed(seed)
    tv = torchvision.models.densenet121()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return tv


def test_torchvision_densenet121_same_outputs_via_legacy_checkpoint(tmp_path):
    tv = torchvision_densenet121(0)
    # Old torchvision files spell dense-layer modules "norm.1"; write one that way.
    legacy = {
        k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
        for k, v in tv.state_dict().items()
    }
    assert any(".norm.1." in k for k in legacy)
    torch.save(legacy, tmp_path / "densenet121-legacy.pth")
    ours = D.densenet121()
    D.load_torchvision_checkpoint(ours, tmp_path / "densenet121-legacy.pth")
    x = torch.randn(2, 3, 64, 64)  # 2x2 maps before the pool: every layer is used
    tv.eval(), ours.eval()
    with torch.no_grad():  # the same ops on the same weights and input: the same bits
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)
    # training mode: the same computation, which ours may order differently; in float64
    tv.double().train(), ours.double().train()
    assert_same_computation(ours(x.double()), tv(x.double()))


def test_a_state_dict_that_does_not_fit_is_a_value_error(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(D.densenet_cifar(10, 4).state_dict(), good)
    with pytest.raises(ValueError, match="good.pth: does not fit this DenseNet"):
        D.load_torchvision_checkpoint(D.densenet121(), good)
    with pytest.raises(ValueError, match="not a state_dict"):
        D.load_torchvision_state_dict(D.densenet121(), {"weight": 1})
    other = copy.deepcopy(D.densenet_cifar(10, 4))
    D.load_torchvision_checkpoint(other, good)  # the right model loads


def test_training_forward_calls_every_batchnorm_module():
    """The paper's path: every BatchNorm runs as a module in training (its hooks fire),
    plain and memory-efficient (the checkpoint runs norm1 again in backward)."""
    for memory_efficient, calls in ((False, 1), (True, 2)):
        model = D.densenet_cifar(10, 4, memory_efficient=memory_efficient)
        counts = count_calls(model, nn.BatchNorm2d)
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        assert sorted(counts) == sorted(norms)
        for name in norms:  # norm1 of each dense layer is recomputed with memory_efficient
            assert counts[name] == (calls if name.endswith("norm1") else 1), name
