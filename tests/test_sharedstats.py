"""sharedstats.py against the plain per-layer BN it must equal: float64 gradcheck, fp32 and
bf16 SGD steps with running statistics, the lean memory-efficient block, SyncBatchNorm over
two processes, and the converter itself."""

import pytest
import torch
from torch import nn

import densenet as D
import reference
import sharedstats as S
from helpers import count_calls, tiny_densenet
from reference import assert_gradcheck, assert_same_float64_steps, saved_activation_bytes


def _shared(*args, **kwargs) -> D.DenseNet:
    """tiny_densenet(*args, **kwargs) with shared statistics: the same weights."""
    return S.convert_shared_stats(tiny_densenet(*args, **kwargs))


def test_converter_keeps_the_state_dict_and_replaces_every_block():
    plain = D.densenet_cifar(22, 4, memory_efficient=True)
    keys = list(plain.state_dict())
    shared = S.convert_shared_stats(plain)
    assert list(shared.state_dict()) == keys
    blocks = [m for m in shared.modules() if isinstance(m, D._DenseBlock)]
    assert len(blocks) == 3 and all(isinstance(b, S.SharedStatsBlock) for b in blocks)
    assert all(b.memory_efficient for b in blocks)
    assert S.convert_shared_stats(shared) is shared  # converting twice changes nothing
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(shared)  # after it, too
    assert list(synced.state_dict()) == keys


@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_gradcheck_float64(bottleneck, memory_efficient):
    assert_gradcheck(_shared(bottleneck, memory_efficient))


@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_equal_plain_bn_in_float64(bottleneck, memory_efficient, drop_rate):
    """The same computation in float64 (its sums in another order): outputs, gradients and
    running statistics of two steps to float64 rounding."""
    assert_same_float64_steps(
        tiny_densenet(bottleneck, drop_rate=drop_rate), _shared(bottleneck, memory_efficient, drop_rate)
    )


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_memory_efficient_block_keeps_its_output_and_bottleneck_maps(drop_rate):
    """Shared statistics: of the block's feature-map-sized tensors, backward keeps the
    output and each layer's 4k bottleneck maps (and dropout's masks of them), nothing
    whose size grows with depth."""
    model = _shared(True, memory_efficient=True, drop_rate=drop_rate)
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
    the bytes the plain model keeps for backward."""
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    plain = saved_activation_bytes(D.densenet_cifar(100, 12), x)
    torch.manual_seed(0)
    lean_model = S.convert_shared_stats(D.densenet_cifar(100, 12, memory_efficient=True))
    lean = saved_activation_bytes(lean_model, x)
    assert lean <= 0.25 * plain


def _builder(drop_rate: float, momentum: float | None):
    """reference.compare's build: tiny_densenet in fp32 (BN momentum as given; None is the
    cumulative average), with shared statistics when shared=True."""

    def build(shared: bool = False, memory_efficient: bool = False) -> nn.Module:
        model = tiny_densenet(True, memory_efficient, drop_rate, dtype=torch.float32)
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = momentum
        return S.convert_shared_stats(model) if shared else model

    return build


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_steps_as_close_to_float64_as_plain_bn(memory_efficient, momentum, channels_last):
    """Three fp32 SGD steps (losses, logits, every parameter's and running statistic's
    update) at most 2^5 times as far from the float64 run as plain BN's own fp32 steps
    (tests/reference.py says why such a ratio holds on any host). The two compute the same
    thing, but each per-channel statistic and BN gradient is a sum of n = N*H*W = 2^9
    values that they add in different orders, and one order can round up to sqrt(n) times
    worse than another (a random walk against a pairwise floor): 2^4.5. Seen: 2^2.3 at most,
    with AVX-512, AVX2 and scalar kernels; an unbiased variance off by 0.2 % is 2^7.8 out."""
    torch.manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (3 * torch.randn(8, 3, 8, 8) + 1).to(memory_format=fmt)
    y = torch.randint(0, 3, (8,))
    path = reference.Path({"shared": True, "memory_efficient": memory_efficient}, channels_last)
    c = reference.compare(
        _builder(0.2, momentum), x, y, 3, {"shared": path}, channels_last=channels_last
    )
    c.assert_within("shared", 2**5)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_bf16_steps_as_close_to_float64_as_plain_bn_in_bf16(memory_efficient):
    """bf16 autocast, channels_last (the fast CPU mode): logits and updates of two steps at
    most 8x as far from float64 as plain BN under the same autocast, which rounds the same
    conv operands to bf16 (a rounding flipped by fp32's differences moves one by 2^-8). The
    loss is left out: a scalar whose bf16 error is a random sum, as likely near zero as not."""
    torch.manual_seed(1)
    x = torch.randn(8, 3, 8, 8).to(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (8,))
    paths = {
        "plain-bf16": reference.Path({}, True, "bf16"),
        "shared-bf16": reference.Path({"shared": True, "memory_efficient": memory_efficient}, True, "bf16"),
    }  # fmt: skip
    c = reference.compare(_builder(0.2, 0.1), x, y, 2, paths, channels_last=True)
    c.assert_within("shared-bf16", 8, "plain-bf16", kinds=("logits", "update"))


def test_norm1_is_not_called_in_training_and_is_in_evaluation():
    """The converter really switches paths: the shared statistics never call a dense
    layer's norm1 in training; evaluation and no-grad forwards take the plain block."""
    model = _shared(True)
    calls = count_calls(model, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    assert calls["features.denseblock1.denselayer2.norm1"] == 0
    assert calls["features.denseblock1.denselayer2.norm2"] == 0  # norm2: BN's fused kernels
    assert calls["features.transition1.norm"] == 1  # outside the blocks: plain modules
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert calls["features.denseblock1.denselayer2.norm1"] == 2


def _sync_block(memory_efficient: bool, shared_stats: bool, bottleneck: bool) -> nn.Module:
    torch.manual_seed(0)
    block = D._DenseBlock(3, 4, 3, memory_efficient, bottleneck=bottleneck, drop_rate=0)
    if shared_stats:
        block = S.convert_shared_stats(block)
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


def test_under_sync_batchnorm_the_statistics_are_the_synchronised_ones(tmp_path):
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
