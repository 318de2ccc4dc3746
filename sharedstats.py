"""Shared batch statistics for densenet.py's DenseNet: an opt-in CPU speed path.

    model = sharedstats.convert_shared_stats(densenet.densenet_cifar(100, 12))

convert_shared_stats swaps each dense block for a SharedStatsBlock holding the same layers
(state_dict keys unchanged), as nn.SyncBatchNorm.convert_sync_batchnorm swaps BatchNorm
modules; it works with memory_efficient=True and before or after convert_sync_batchnorm.
Its eager training step gives the same outputs, gradients and BatchNorm running statistics
as the plain model, in one autograd Function per block with its backward written out;
evaluation, inference without gradients, torch.compile and torch.export take the plain
block. Module hooks on the dense layers do not run on this path, it is differentiable
once, and it cannot be scripted with TorchScript (script the unconverted model).
Measured and tested on the CPU only (README); on CUDA, torch.compile fuses BN itself.
Needs torch >= 2.0 (tested on 2.0.1 and 2.14.1).
Imports torch, the standard library and densenet.py only.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet import (
    _block_buffer,
    _dense,
    _DenseBlock,
    _DenseLayer,
    _is_compiling,
    _is_exporting,
    _layout,
)

__all__ = ["SharedStatsBlock", "convert_shared_stats"]

# ---------------------------------------------------------------------------------------
# How it works
#
# In training, layer l's first BN normalises the concatenation [x0 | f1 | ... | f(l-1)]
# with its batch statistics, and a channel's statistics are the same at every layer that
# reads it. So each block computes them once per feature map, when it is produced, and
# every layer's BN only applies its own affine transform and ReLU:
#
#     stats    ( x0 )( f1 )( f2 )          mean, var: computed once each
#     layer1   norm1: w1 * (x0 - mean) / sqrt(var + eps) + b1, ReLU
#     layer2   norm1: w2 * ([x0|f1] - mean) / ..., ReLU        shares x0's, f1's
#     layer3   norm1: w3 * ([x0|f1|f2] - mean) / ..., ReLU     shares x0's, f1's, f2's
#
# The block runs as one autograd Function with its backward written out: ReLU's mask,
# BN's reductions for each norm1's weight, bias and statistics gradients, and a scaled
# add of each layer's input gradient into one gradient buffer for the whole block, in
# place (plain autograd allocates a new sum for every layer). The gradient through a
# feature map's statistics is added once its gradient is complete. norm2 uses BN's fused
# training kernels. Outputs, gradients and every BN's running statistics equal plain
# BN's (the scale of that add is rounded to the gradient's dtype: a mixed bf16/fp32 add
# is several times slower on the CPU); dropout draws as F.dropout does on the CPU. Under
# SyncBatchNorm (torch.distributed running) every statistic, and the gradient through it,
# is all-reduced over the group of the block's first norm. Module hooks on the layers do
# not run on this path, and it is differentiable once (the plain model for either).
#
# With memory_efficient the block keeps its output (one buffer, as above) and each
# bottleneck's conv1 output; backward recomputes each layer's BN-ReLU input and output
# and the bottleneck's BN-ReLU from them, and no convolution, so the recomputation costs
# a few elementwise passes rather than a second forward.
# ---------------------------------------------------------------------------------------

_DIMS = (0, 2, 3)  # a channel's statistics are over the batch and both spatial dimensions
_TILE = 64  # channel repeats per row in _rows


def _sync_group(norm: nn.Module) -> object | None:
    """The process group a SyncBatchNorm synchronises over, if it spans several processes."""
    dist = torch.distributed
    if not (isinstance(norm, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()):
        return None
    group = norm.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _rows(x: Tensor) -> tuple[Tensor, int] | None:
    """A dense channels_last x as a matrix of rows of r * C values (the channels repeated r
    times), or None. Per-channel ops then run along long rows, not rows of C values: about
    4x faster for a bf16 map of 12 channels."""
    n, c, h, w = x.shape
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    pixels, r = n * h * w, 1
    while r < _TILE and pixels % (2 * r) == 0:
        r *= 2
    return x.permute(0, 2, 3, 1).reshape(pixels // r, r * c), r


def _batch_stats(x: Tensor, group: object | None) -> tuple[Tensor, Tensor]:
    """x's per-channel batch mean and biased variance as one (2, C) tensor (two passes, in
    float32 or better), and the number of values behind them: over all of group's processes."""
    if x.numel() // x.shape[1] <= 1:  # plain BN's own check, in its words
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}"
        )
    v = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    count = v.numel() // v.shape[1]
    rows = _rows(v)
    if rows is None:
        mean = v.mean(_DIMS)
        var = (v - mean[:, None, None]).square_().sum(_DIMS) / count
    else:
        m, r = rows
        mean = m.sum(0).view(r, -1).sum(0) / count
        var = (m - mean.repeat(r)).square_().sum(0).view(r, -1).sum(0) / count
    total = v.new_full((), count, dtype=torch.float64)  # a fill, no host-device copy
    if group is None:
        return torch.stack([mean, var]), total
    # sums, sums of squares and counts of every process, in float64
    sums = torch.cat([mean * count, (var + mean.square()) * count]).double()
    sums = torch.cat([sums, total[None]])
    torch.distributed.all_reduce(sums, group=group)
    c, total = x.shape[1], sums[-1]
    mean64 = sums[:c] / total
    var64 = sums[c:-1] / total - mean64.square()
    return torch.stack([mean64, var64]).to(mean.dtype), total


def _stats_backward(g: Tensor, x: Tensor, mean: Tensor, count: Tensor, into: Tensor) -> Tensor:
    """into plus the gradient reaching x through its batch statistics, g their (2, C)
    gradient: d mean / dx = 1 / n, d var / dx = 2 (x - mean) / n. A new dense tensor in
    x's dtype (scale and shift rounded to it: mixed-dtype ops are several times slower)."""
    scale = 2 * g[1] / count
    shift = g[0] / count - scale * mean
    layout = _layout(x)
    out = torch.empty_like(x, memory_format=layout).copy_(into)
    x = x.contiguous(memory_format=layout)
    rows, x_rows = _rows(out), _rows(x)
    if rows is None:
        return out.addcmul_(x, scale.to(x.dtype)[:, None, None]).add_(
            shift.to(x.dtype)[:, None, None]
        )
    (m, r), (xm, _) = rows, x_rows
    m.addcmul_(xm, scale.to(x.dtype).repeat(r)).add_(shift.to(x.dtype).repeat(r))
    return out


def _summed(g: Tensor, group: object | None) -> Tensor:
    """A gradient of shared statistics, summed over group's processes: every process's loss
    depends on them."""
    if group is None:
        return g
    g = g.contiguous()
    torch.distributed.all_reduce(g, group=group)
    return g


def _count_batch(norm: nn.Module) -> float:
    """Count one training batch as plain BN does; the running statistics' update factor."""
    if not norm.track_running_stats or norm.num_batches_tracked is None:
        return 0.0 if norm.momentum is None else norm.momentum
    norm.num_batches_tracked.add_(1)
    if norm.momentum is None:  # a cumulative moving average, as plain BN keeps it
        return 1.0 / float(norm.num_batches_tracked)
    return norm.momentum


def _update_running_stats(norm: nn.Module, mean: Tensor, var: Tensor, count: Tensor) -> None:
    """What plain BN's training forward does to its buffers, from the shared statistics."""
    factor = _count_batch(norm)
    if norm.running_mean is None:
        return
    unbiased = var * (count / (count - 1))
    norm.running_mean.mul_(1 - factor).add_(mean.to(norm.running_mean.dtype), alpha=factor)
    norm.running_var.mul_(1 - factor).add_(unbiased.to(norm.running_var.dtype), alpha=factor)


def _norm_relu(x: Tensor, norm: nn.Module, stats: Tensor) -> Tensor:
    """relu(norm's affine transform of x normalised with the given (2, C) statistics):
    BN's eval-mode kernel on a dense x, then ReLU in place."""
    return torch.batch_norm(
        x, norm.weight, norm.bias, stats[0], stats[1], False, 0.0, norm.eps, True
    ).relu_()


def _norm_relu_backward(g: Tensor, x: Tensor, y: Tensor, norm: nn.Module, stats: Tensor):
    """Back through _norm_relu (y its output; g is overwritten): (ReLU's masked gradient,
    the per-channel scale it reaches x with, the weight and bias gradients, and the (2, C)
    gradient of the statistics)."""
    g = torch.ops.aten.threshold_backward.grad_input(g, y, 0, grad_input=g)
    mean, var = stats[0], stats[1]
    # eval-mode backward from (mean, var); the saved statistics are empty tensors, which
    # CUDA's kernel requires to be defined (it asserts so) and then ignores, as the CPU's
    none = mean.new_empty(0)
    _, g_weight, g_bias = torch.ops.aten.native_batch_norm_backward(
        g, x, norm.weight, mean, var, none, none, False, norm.eps, [False, True, True]
    )
    invstd = torch.rsqrt(var + norm.eps)
    scale = norm.weight * invstd
    g_stats = torch.stack([-g_bias * scale, -0.5 * g_weight * scale * invstd])
    return g, scale, g_weight, g_bias, g_stats


def _conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(x) (stride 1, no bias: the block's convs), in autocast's dtype where it is on."""
    return F.conv2d(x, conv.weight, None, 1, conv.padding)


def _conv_backward(g: Tensor, x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """Gradients of _conv(x) for x and conv.weight, g in the dtype the conv ran in."""
    weight = conv.weight.to(g.dtype)
    pad = list(conv.padding)
    g_x, g_w, _ = torch.ops.aten.convolution_backward(
        g, x.to(g.dtype), weight, None, [1, 1], pad, [1, 1], False, [0, 0], 1, [True, True, False]
    )
    return g_x.to(x.dtype), g_w.to(conv.weight.dtype)


def _dropout(x: Tensor, p: float) -> tuple[Tensor, Tensor | None]:
    """F.dropout in training, drawing as it does on the CPU, and its scaled mask."""
    if p == 0:
        return x, None
    mask = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    return x * mask, mask


def _layer_params(layer: _DenseLayer) -> list[Tensor]:
    """The parameters _layer_forward uses, in the order _layer_backward returns gradients."""
    params = [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
    if layer.bottleneck:
        params += [layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    return params


# What a layer keeps for backward; None where it is recomputed or does not apply.
_KEPT = ("x", "y", "z", "r", "mask1", "mask2", "stats2")


def _norm2_forward(z: Tensor, norm: nn.Module, group: object | None, count: Tensor):
    """norm2 in training, with its own batch statistics, and ReLU: (output, the statistics
    backward needs). BN's fused training kernel (mean and 1/std kept), or under
    SyncBatchNorm the statistics over group (mean and variance kept)."""
    if group is not None:
        stats, _ = _batch_stats(z, group)
        _update_running_stats(norm, stats[0], stats[1], count)
        return _norm_relu(z, norm, stats), stats
    r, mean, invstd = torch.ops.aten.native_batch_norm(
        z,
        norm.weight,
        norm.bias,
        norm.running_mean,
        norm.running_var,
        True,
        _count_batch(norm),
        norm.eps,
    )
    return r.relu_(), torch.stack([mean, invstd])


def _norm2_output(z: Tensor, norm: nn.Module, stats: Tensor, group: object | None) -> Tensor:
    """_norm2_forward's output again, from what it kept."""
    if group is None:  # (mean, 1/std) as (mean, var)
        stats = torch.stack([stats[0], stats[1].pow(-2) - norm.eps])
    return _norm_relu(z, norm, stats)


def _norm2_backward(g, z, r, norm, stats, group, count) -> tuple[Tensor, Tensor, Tensor]:
    """Back through _norm2_forward (g is overwritten): gradients of z, weight and bias."""
    if group is not None:
        g, scale, g_weight, g_bias, g_stats = _norm_relu_backward(g, z, r, norm, stats)
        into = g.mul_(scale.to(g.dtype)[:, None, None])
        return _stats_backward(_summed(g_stats, group), z, stats[0], count, into), g_weight, g_bias
    g = torch.ops.aten.threshold_backward.grad_input(g, r, 0, grad_input=g)
    running = norm.running_mean, norm.running_var
    return torch.ops.aten.native_batch_norm_backward(
        g, z, norm.weight, *running, stats[0], stats[1], True, norm.eps, [True, True, True]
    )


def _layer_forward(layer, x, stats, count, group, lean: bool) -> tuple[Tensor, list]:
    """The layer's new feature maps from its dense input x with x's statistics, and what it
    keeps for backward (_KEPT); lean: not x, y and r, which backward recomputes."""
    _update_running_stats(layer.norm1, stats[0], stats[1], count)
    y = _norm_relu(x, layer.norm1, stats)
    z, mask1 = _dropout(_conv(y, layer.conv1), layer.drop_rate)
    if not layer.bottleneck:
        return z, [None if lean else x, None if lean else y, None, None, mask1, None, None]
    r, stats2 = _norm2_forward(z, layer.norm2, group, count)
    new, mask2 = _dropout(_conv(r, layer.conv2), layer.drop_rate)
    if lean:
        return new, [None, None, z, None, mask1, mask2, stats2]
    return new, [x, y, z, r, mask1, mask2, stats2]


def _layer_backward(layer, g, x, stats, count, group, kept: list) -> tuple:
    """Back through _layer_forward from g, the new maps' gradient: (the masked gradient at
    norm1's output, the scale it reaches x with, the (2, C) gradient of x's statistics,
    the parameter gradients in _layer_params' order)."""
    _, y, z, r, mask1, mask2, stats2 = kept
    grads = []
    if layer.bottleneck:
        g = g if mask2 is None else g * mask2
        r = _norm2_output(z, layer.norm2, stats2, group) if r is None else r
        g, g_conv2 = _conv_backward(g, r, layer.conv2)
        g, g_w2, g_b2 = _norm2_backward(g, z, r, layer.norm2, stats2, group, count)
        grads = [g_w2, g_b2, g_conv2]
    g = g if mask1 is None else g * mask1
    y = _norm_relu(x, layer.norm1, stats) if y is None else y
    g, g_conv1 = _conv_backward(g, y, layer.conv1)
    g, scale, g_w1, g_b1, g_stats = _norm_relu_backward(g, x, y, layer.norm1, stats)
    return g, scale, g_stats, [g_w1, g_b1, g_conv1, *grads]


class _SharedStatsBlock(torch.autograd.Function):
    """A dense block's training forward and backward with shared statistics (above)."""

    @staticmethod
    def forward(ctx, x: Tensor, block: _DenseBlock, *params: Tensor) -> Tensor:
        layers, lean = list(block.values()), block.memory_efficient
        group = _sync_group(layers[0].norm1)
        first, count = _batch_stats(x, group)
        stats = first.new_zeros((2, block.out_channels))  # the last maps' stay 0: unread
        stats[:, : x.shape[1]] = first
        x0, buffer = x, _block_buffer(x, block.out_channels) if lean else None
        if lean:
            x = buffer[:, : x.shape[1]].copy_(x)
        kept = []
        for layer in layers:
            c = x.shape[1]
            new, saved = _layer_forward(layer, _dense(x), stats[:, :c], count, group, lean)
            if layer is not layers[-1]:
                stats[:, c : c + new.shape[1]] = _batch_stats(new, group)[0]
            if lean:
                buffer[:, c : c + new.shape[1]].copy_(new)
                x = buffer[:, : c + new.shape[1]]
            else:
                x = torch.cat([x, new], 1)
            kept += saved
        ctx.layers, ctx.group = layers, group
        ctx.save_for_backward(x0, x, stats, count, *kept)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple:
        x0, out, stats, count, *kept = ctx.saved_tensors
        group, n = ctx.group, len(_KEPT)
        g_out = torch.empty_like(out).copy_(grad)  # the block's gradient buffer, added into
        g_stats = torch.zeros_like(stats)
        grads = []
        for i, layer in reversed(list(enumerate(ctx.layers))):
            c, saved = layer.norm1.num_features, kept[i * n : (i + 1) * n]
            end = out.shape[1] if i + 1 == len(ctx.layers) else ctx.layers[i + 1].norm1.num_features
            new = slice(c, end)  # the layer's new maps: their gradient is now complete
            g_new_stats = _summed(g_stats[:, new], group)
            g = _stats_backward(g_new_stats, out[:, new], stats[0, new], count, g_out[:, new])
            x = _dense(out[:, :c]) if saved[0] is None else saved[0]
            g, scale, g_stats_x, layer_grads = _layer_backward(
                layer, g, x, stats[:, :c], count, group, saved
            )
            g_out[:, :c].addcmul_(g, scale.to(g.dtype)[:, None, None])
            g_stats[:, :c] += g_stats_x
            grads = layer_grads + grads
        c0 = x0.shape[1]
        g_x = _stats_backward(
            _summed(g_stats[:, :c0], group), x0, stats[0, :c0], count, g_out[:, :c0]
        )
        return g_x, None, *grads


class SharedStatsBlock(_DenseBlock):
    """A dense block whose eager training step with gradients shares batch statistics (one
    _SharedStatsBlock Function); every other forward is the plain block's."""

    def __init__(self, block: _DenseBlock):
        nn.ModuleDict.__init__(self, block)  # the same layers under the same names
        self.out_channels = block.out_channels
        self.memory_efficient = block.memory_efficient

    def forward(self, x: Tensor) -> Tensor:
        traced = _is_compiling() or _is_exporting()
        if self.training and torch.is_grad_enabled() and not traced:
            params = [p for layer in self.values() for p in _layer_params(layer)]
            return _SharedStatsBlock.apply(x, self, *params)
        return super().forward(x)


def convert_shared_stats(module: nn.Module) -> nn.Module:
    """module with every dense block in it replaced by a SharedStatsBlock holding the same
    layers (or the converted block, if module is one); state_dict keys stay as they were."""
    if isinstance(module, _DenseBlock) and not isinstance(module, SharedStatsBlock):
        return SharedStatsBlock(module)
    for name, child in module.named_children():
        module.add_module(name, convert_shared_stats(child))
    return module
