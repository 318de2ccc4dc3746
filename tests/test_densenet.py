"""densenet.py against independent facts: the paper's parameter counts, gradcheck,
the plain path for the memory-efficient one, and torchvision's DenseNet."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import densenet as D
from engine import saved_activation_bytes
from reference import assert_same_computation


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Parameter counts from the paper (Table 2) as given exactly in the issue tracker; the
# ImageNet ones are torchvision's published figures.
PAPER_COUNTS = [
    (lambda: D.densenet_cifar(40, 12, bottleneck=False, compression=1), 1_019_722),
    (lambda: D.densenet_cifar(100, 12, bottleneck=False, compression=1), 6_979_642),
    (lambda: D.densenet_cifar(100, 24, bottleneck=False, compression=1), 27_249_082),
    (lambda: D.densenet_cifar(100, 12), 769_162),
    (lambda: D.densenet_cifar(100, 12, num_classes=100), 800_032),
    (lambda: D.densenet_cifar(250, 24), 15_324_406),
    (lambda: D.densenet_cifar(190, 40), 25_624_430),
    (D.densenet121, 7_978_856),
    (D.densenet169, 14_149_480),
    (D.densenet201, 20_013_928),
    (D.densenet161, 28_681_000),
]


@pytest.mark.parametrize("build,expected", PAPER_COUNTS)
def test_parameter_counts_match_the_paper(build, expected):
    assert n_params(build()) == expected


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


def _tiny(
    bottleneck: bool,
    memory_efficient: bool = False,
    drop_rate: float = 0.0,
    shared_stats: bool = False,
    dtype: torch.dtype = torch.float64,
) -> D.DenseNet:
    """A small DenseNet; plain per-layer BN unless shared_stats, the reference for the rest."""
    torch.manual_seed(0)
    return D.DenseNet(
        growth_rate=3,
        block_config=(2, 2),
        num_init_features=4,
        bottleneck=bottleneck,
        compression=0.5,
        drop_rate=drop_rate,
        num_classes=3,
        memory_efficient=memory_efficient,
        shared_stats=shared_stats,
    ).to(dtype)


@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("shared_stats", [False, True])
def test_gradcheck_float64(bottleneck, memory_efficient, shared_stats):
    model = _tiny(bottleneck, memory_efficient, shared_stats=shared_stats)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))

    # float64 central differences with eps 1e-6: truncation ~eps^2 and rounding ~2^-53/eps,
    # both under 1e-9 before BN's amplification (below 10^5): within atol 1e-5 on any host
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # same dropout masks on both paths
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out


@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
@pytest.mark.parametrize("shared_stats", [False, True])
def test_memory_efficient_equals_plain(bottleneck, drop_rate, shared_stats):
    plain = _tiny(bottleneck, drop_rate=drop_rate)
    efficient = _tiny(bottleneck, True, drop_rate, shared_stats)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    # float64, the same computation: outputs within 1e-12 (2^-53 times little amplification),
    # gradients 1e-10 (BN's backward at initialisation amplifies up to 10^5: reference.py)
    for step in range(2):
        a = _train_step(plain, x, y, step)
        b = _train_step(efficient, x, y, step)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), efficient.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, s), t in zip(plain.named_buffers(), efficient.buffers(), strict=True):
        # running_mean, running_var and num_batches_tracked counted once per step
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12, msg=name)
    assert plain.features.norm5.num_batches_tracked.item() == 2


def test_memory_efficient_layers_read_one_buffer_per_block():
    """Plain BN: each layer's input is a prefix view of the block's output, not a copy."""
    model = _tiny(True, memory_efficient=True)
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


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_memory_efficient_shared_block_keeps_its_output_and_bottleneck_maps(drop_rate):
    """Shared statistics: of the block's feature-map-sized tensors, backward keeps the
    output and each layer's 4k bottleneck maps (and dropout's masks of them), nothing
    whose size grows with depth."""
    model = _tiny(True, memory_efficient=True, drop_rate=drop_rate, shared_stats=True)
    block = model.features.denseblock1
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = block(x)
    maps = [t for t in kept if t.dim() == 4 and t.shape[0] == 2 and t.shape[2:] == (8, 8)]
    storage = out.untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() == storage for t in maps)
    others = [t for t in maps if t.untyped_storage().data_ptr() != storage and t is not x]
    k = block.denselayer1.conv2.out_channels
    dropout = drop_rate > 0
    # per layer: the bottleneck maps (4k), and with dropout both masks (4k and k)
    assert sorted(t.shape[1] for t in others) == sorted(
        [4 * k] * len(block) * (1 + dropout) + [k] * len(block) * dropout
    )
    out.sum().backward()


def test_memory_efficient_keeps_under_a_quarter_of_plain():
    """DenseNet-BC-100-12: memory_efficient with shared statistics keeps at most 25 % of
    the bytes the plain model keeps for backward (issue 16's target)."""
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    plain = saved_activation_bytes(D.densenet_cifar(100, 12, shared_stats=False), x)
    torch.manual_seed(0)
    lean = saved_activation_bytes(D.densenet_cifar(100, 12, memory_efficient=True), x)
    assert lean <= 0.25 * plain


def test_memory_efficient_under_compile_equals_plain():
    """torch.compile traces the shared-buffer writes and the checkpoint correctly."""
    plain = _tiny(True, drop_rate=0.0)
    efficient = torch.compile(_tiny(True, memory_efficient=True, shared_stats=True))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2])
    a = _train_step(plain, x, y, 0)
    b = _train_step(efficient, x, y, 0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), efficient.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, s), t in zip(plain.named_buffers(), efficient.buffers(), strict=True):
        # the compiled recomputation must not count the batch twice either
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12, msg=name)
    assert efficient.features.denseblock1.denselayer2.norm1.num_batches_tracked.item() == 1


def _sgd_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list:
    """Outputs and parameter gradients of each of `steps` SGD steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    for step in range(steps):
        opt.zero_grad()
        out = _train_step(model, x, y, step)
        seen.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return seen


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shared_stats_equal_plain_bn_in_fp32(memory_efficient, momentum, channels_last):
    """Outputs and gradients to fp32 rounding at every step, and every BN's running
    statistics after 3 SGD steps, against plain per-layer BN."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain = _tiny(True, drop_rate=0.2, dtype=torch.float32).to(memory_format=fmt)
    shared = _tiny(True, memory_efficient, 0.2, shared_stats=True, dtype=torch.float32)
    shared = shared.to(memory_format=fmt)
    for bn in [*plain.modules(), *shared.modules()]:
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = momentum  # None: the cumulative moving average
    torch.manual_seed(1)
    x = (3 * torch.randn(8, 3, 8, 8) + 1).to(memory_format=fmt)
    y = torch.randint(0, 3, (8,))
    for (a, grads_a), (b, grads_b) in zip(
        _sgd_steps(plain, x, y, 3), _sgd_steps(shared, x, y, 3), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for (name, _), ga, gb in zip(plain.named_parameters(), grads_a, grads_b, strict=True):
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5, msg=name)
    for (name, s), t in zip(plain.named_buffers(), shared.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert s.item() == t.item() == 3, name
        else:
            torch.testing.assert_close(t, s, rtol=1e-5, atol=1e-6, msg=name)
    plain.eval(), shared.eval()
    with torch.no_grad():
        torch.testing.assert_close(shared(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_shared_stats_under_bf16_autocast_match_plain_bn(memory_efficient):
    """bf16 autocast, channels_last (the fast CPU mode): the convs run in bf16 on both
    paths, and outputs and gradients agree to bf16 rounding."""
    cl = torch.channels_last
    plain = _tiny(True, drop_rate=0.2, dtype=torch.float32).to(memory_format=cl)
    shared = _tiny(True, memory_efficient, 0.2, shared_stats=True, dtype=torch.float32)
    shared = shared.to(memory_format=cl)
    x = torch.randn(8, 3, 8, 8).to(memory_format=cl)
    y = torch.randint(0, 3, (8,))
    with torch.autocast("cpu", torch.bfloat16):
        a, b = _train_step(plain, x, y, 0), _train_step(shared, x, y, 0)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
    for (name, p), q in zip(plain.named_parameters(), shared.parameters(), strict=True):
        assert q.grad.dtype == torch.float32, name
        err = (q.grad - p.grad).norm() / p.grad.norm()
        assert err < 0.05, (name, err.item())


def test_shared_stats_leave_norm1_unused_and_plain_bn_used_without_it():
    """The flag really switches paths: shared statistics never call norm1 in training."""
    calls = {}
    for shared_stats in (False, True):
        model = _tiny(True, shared_stats=shared_stats)
        count = _count_norm1_calls(model)
        model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
        model.eval()
        model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
        calls[shared_stats] = count[0]
    assert calls == {False: 2, True: 1}  # eval: per-layer running statistics, both paths


def _count_norm1_calls(model: D.DenseNet) -> list[int]:
    calls = [0]
    # BN, not the conv: recomputation stops early, inside the conv, once all it needs is saved
    norm = model.features.denseblock1.denselayer2.norm1
    norm.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_recomputation_only_when_training_with_grad():
    model = _tiny(True, memory_efficient=True)  # plain BN: shared_stats does not call norm1
    calls = _count_norm1_calls(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    assert calls[0] == 2  # forward + recomputation in backward
    model.eval()
    model(x).sum().backward()
    assert calls[0] == 3  # eval: no checkpoint
    model.train()
    with torch.no_grad():
        model(x)
    assert calls[0] == 4


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


def test_torchvision_densenet121_same_outputs_via_legacy_checkpoint(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.densenet121()
    with torch.no_grad():  # non-trivial BN statistics, so eval mode tests them too
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
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


def test_bad_checkpoint_files_raise_value_error(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(D.densenet_cifar(10, 4).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for path, match in [
        (truncated, "cannot read"),
        (garbage, "cannot read"),
        (good, "does not fit"),
    ]:
        with pytest.raises(ValueError, match=match):
            D.load_torchvision_checkpoint(D.densenet121(), path)
    other = copy.deepcopy(D.densenet_cifar(10, 4))
    D.load_torchvision_checkpoint(other, good)  # the right model loads


class _RunsAShellCommand:
    """Unpickling this calls os.system: a checkpoint that would run code when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused_naming_the_call(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.ones(2), "payload": _RunsAShellCommand(marker)}, path)
    with pytest.raises(ValueError) as info:
        D.load_file(path)
    message = str(info.value)
    assert "\n" not in message
    assert "refused because it asks to import or call something" in message
    assert "(os.system)" in message
    assert not marker.exists()


def test_truncated_checkpoint_is_truncated_or_corrupt_in_one_line(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(D.densenet_cifar(10, 4).state_dict(), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError) as info:
        D.load_file(path)
    message = str(info.value)
    assert "\n" not in message and "truncated or corrupt" in message


def _sync_block(memory_efficient: bool, shared_stats: bool, bottleneck: bool) -> nn.Module:
    torch.manual_seed(0)
    block = D._DenseBlock(3, 4, 3, memory_efficient, shared_stats, bottleneck=bottleneck, drop_rate=0)
    with torch.no_grad():  # non-trivial affine transforms
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return block.double()


def _block_results(block: nn.Module, x: torch.Tensor) -> dict:
    """Output, input gradient, parameter gradients and buffers of one training step."""
    x = x.clone().requires_grad_()
    out = block(x)
    (out.square() * torch.arange(out.shape[1], dtype=out.dtype)[:, None, None]).sum().backward()
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "grads": [p.grad for p in block.parameters()],
        "buffers": [b.clone() for b in block.buffers()],
    }


def _sync_worker(rank: int, world: int, init_file: str, x: torch.Tensor, out_dir: str) -> None:
    """One of `world` gloo processes: SyncBatchNorm blocks on this rank's part of the batch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case in SYNC_CASES:
            block = nn.SyncBatchNorm.convert_sync_batchnorm(_sync_block(case[0], True, case[1]))
            res = _block_results(block, x.chunk(world)[rank])
            for g in res["grads"]:  # each rank holds its part of the full batch's gradient
                dist.all_reduce(g)
            torch.save(res, f"{out_dir}/rank{rank}-{case}.pt")
    finally:
        dist.destroy_process_group()


SYNC_CASES = [(me, bottleneck) for me in (False, True) for bottleneck in (False, True)]


def test_shared_stats_under_sync_batchnorm_are_the_synchronised_ones(tmp_path):
    """2 gloo processes with half the batch each equal one process with all of it: norm1's
    shared statistics and norm2's own, with and without memory_efficient."""
    world = 2
    torch.manual_seed(3)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64) * 2 + 0.5
    torch.multiprocessing.spawn(
        _sync_worker, args=(world, str(tmp_path / "init"), x, str(tmp_path)), nprocs=world
    )
    for case in SYNC_CASES:
        want = _block_results(_sync_block(False, False, case[1]), x)  # plain BN, whole batch
        got = [torch.load(tmp_path / f"rank{r}-{case}.pt", weights_only=True) for r in range(world)]
        for key in ("out", "x_grad"):
            torch.testing.assert_close(
                torch.cat([g[key] for g in got]), want[key], rtol=1e-10, atol=1e-10
            )
        for g in got:
            for a, b in zip(g["grads"], want["grads"], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            for a, b in zip(g["buffers"], want["buffers"], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
