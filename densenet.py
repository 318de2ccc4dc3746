"""DenseNet (Huang, Liu, van der Maaten, Weinberger, CVPR 2017) in one copyable file.

Imports torch and the standard library only. Module and parameter names follow
torchvision's DenseNet, so its ImageNet checkpoints load with strict=True.
The paper's modules come first, then a section each for the memory-efficient path
(memory_efficient=True) and the shared batch statistics (shared_stats=True, the default).
"""

import pickle
import re
from collections.abc import Sequence
from contextlib import nullcontext
from os import PathLike

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
    "densenet_cifar", "load_file", "load_torchvision_checkpoint",
]  # fmt: skip

BN_SIZE = 4  # bottleneck width: the 1x1 conv produces 4k feature maps (paper, Sec. 3)


# ---------------------------------------------------------------------------------------
# The paper's modules
# ---------------------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k) with bottleneck, BN-ReLU-Conv3x3(k) without.

    Dropout follows every conv, as in the authors' Lua code (models/densenet.lua).
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bottleneck: bool,
        drop_rate: float,
        memory_efficient: bool,
    ):
        super().__init__()
        mid = BN_SIZE * growth_rate if bottleneck else growth_rate
        kernel = 1 if bottleneck else 3
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, mid, kernel, padding=kernel // 2, bias=False)
        if bottleneck:
            self.norm2 = nn.BatchNorm2d(mid)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)
        self.bottleneck = bottleneck
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient

    def _first_conv(self, x: Tensor) -> Tensor:
        """BN, ReLU and the first conv: the part whose input grows with depth."""
        return self.conv1(self.relu1(self.norm1(_dense(x))))

    def forward(self, x: Tensor) -> Tensor:
        """New feature maps from x, the concatenation of all earlier ones."""
        if _recomputes(self.memory_efficient, self.training):
            out = self._checkpointed_first_conv(x)
        else:
            out = self._first_conv(x)
        if self.drop_rate > 0:
            out = F.dropout(out, self.drop_rate, self.training)
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
            if self.drop_rate > 0:
                out = F.dropout(out, self.drop_rate, self.training)
        return out

    @torch.jit.unused
    def _checkpointed_first_conv(self, x: Tensor) -> Tensor:
        """_first_conv, recomputed in backward (memory-efficient section below)."""
        return _checkpoint_first_conv(self, x)


class _DenseBlock(nn.ModuleDict):
    """num_layers dense layers; each sees the concatenation of all earlier outputs."""

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        memory_efficient: bool,
        shared_stats: bool = True,
        **layer_kw,
    ):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                in_channels + i * growth_rate,
                growth_rate,
                memory_efficient=memory_efficient,
                **layer_kw,
            )
            self.add_module(f"denselayer{i + 1}", layer)
        self.out_channels = in_channels + num_layers * growth_rate
        self.memory_efficient = memory_efficient
        self.shared_stats = shared_stats

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not torch.jit.is_scripting():
            return self._train_forward(x)
        # Growing the input by one concatenation a layer, rather than concatenating
        # all earlier outputs in every layer, lets autograd sum each layer's input
        # gradient once, as one tensor, instead of once per earlier output as thin
        # channel slices: bf16 channels_last training on CPU got ~1.4x faster (README).
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)
        return x

    @torch.jit.unused
    def _train_forward(self, x: Tensor) -> Tensor:
        """Training: shared statistics (eager, with gradients), else one buffer with
        recomputation (memory_efficient), else the plain path. Under torch.compile and
        torch.export the compiler fuses BN itself, so shared_stats takes the plain path."""
        grad = torch.is_grad_enabled()
        traced = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if self.shared_stats and grad and not traced:
            return _shared_stats_block(self, x)
        if self.memory_efficient and grad:
            return _one_buffer_forward(self, x)
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)
        return x


class _Transition(nn.Module):
    """BN-ReLU-Conv1x1(floor(compression * m))-AvgPool2x2 between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(self.relu(self.norm(x)))
        if self.drop_rate > 0:  # the Lua code drops out after the transition conv too
            x = F.dropout(x, self.drop_rate, self.training)
        return self.pool(x)


class DenseNet(nn.Module):
    """DenseNet for CIFAR-style (3x3 stem) or ImageNet-style (7x7/2 stem) inputs.

    Args:
        growth_rate: k, the feature maps each dense layer adds.
        block_config: layers per dense block, e.g. (16, 16, 16) or (6, 12, 24, 16).
        num_init_features: stem channels; None: 2k for DenseNet-BC, else 16 (paper).
        bottleneck: BN-ReLU-Conv1x1(4k) before each 3x3 conv (the "B" of DenseNet-BC).
        compression: theta, the fraction of feature maps a transition keeps ("C": < 1).
        drop_rate: dropout after every conv but the stem's (0 disables it).
        num_classes: outputs of the final Linear layer.
        in_channels: channels of the input images (3 for RGB, 1 for MNIST).
        stem: "cifar" (3x3 conv) or "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool).
        memory_efficient: keep one buffer per block and recompute each layer's growing
            part in backward, so the activations kept for backward grow linearly with
            depth, not quadratically (with shared_stats, BN and ReLU only: no conv).
        shared_stats: in training, compute each feature map's batch statistics once and
            let every later layer's first BN apply only its own affine transform, each
            block one autograd Function with its backward written out (the same results
            and running statistics as plain BN); False: plain per-layer BN, as torchvision.
    """

    def __init__(
        self,
        growth_rate: int,
        block_config: Sequence[int],
        num_init_features: int | None = None,
        bottleneck: bool = True,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        stem: str = "cifar",
        memory_efficient: bool = False,
        shared_stats: bool = True,
    ):
        super().__init__()
        _check_args(growth_rate, block_config, compression, drop_rate, stem)
        if num_init_features is None:
            # The paper's stem has 16 channels, or 2k for DenseNet-BC; its non-BC
            # parameter counts need 16. The authors' Lua code always uses 2k.
            bc = bottleneck and compression < 1
            num_init_features = 2 * growth_rate if bc else 16
        self.features = nn.Sequential()
        if stem == "cifar":
            self.features.add_module(
                "conv0",
                nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False),
            )
        else:
            self.features.add_module(
                "conv0",
                nn.Conv2d(in_channels, num_init_features, 7, 2, padding=3, bias=False),
            )
            self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
            self.features.add_module("relu0", nn.ReLU(inplace=True))
            self.features.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))

        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers,
                channels,
                growth_rate,
                bottleneck=bottleneck,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
                shared_stats=shared_stats,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i < len(block_config) - 1:
                out = int(compression * channels)  # floor, as the Lua code does
                self.features.add_module(
                    f"transition{i + 1}", _Transition(channels, out, drop_rate)
                )
                channels = out
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal (fan_out) convs, BN weight 1 and bias 0, Linear bias 0: the Lua code's init."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.features(x), inplace=True)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def _check_args(
    growth_rate: int,
    block_config: Sequence[int],
    compression: float,
    drop_rate: float,
    stem: str,
) -> None:
    if not isinstance(growth_rate, int) or growth_rate <= 0:
        raise ValueError(f"growth_rate must be a positive integer, got {growth_rate!r}")
    if len(block_config) == 0 or any(int(n) <= 0 for n in block_config):
        raise ValueError(
            f"block_config must be a non-empty list of positive layer counts, got {list(block_config)!r}"
        )
    if not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression!r}")
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")


def densenet_cifar(
    depth: int,
    growth_rate: int,
    bottleneck: bool = True,
    compression: float = 0.5,
    **kwargs,
) -> DenseNet:
    """The paper's CIFAR/SVHN DenseNet-{depth}-{k}: three equal blocks of 3x3 (or bottleneck) layers.

    depth counts the stem conv, two transition convs, the classifier and every conv in
    the blocks: (depth - 4) / 3 layers per block, or (depth - 4) / 6 with bottleneck.
    """
    convs_per_layer = 2 if bottleneck else 1
    step = 3 * convs_per_layer
    if depth - 4 < step or (depth - 4) % step:
        lower = 4 + (depth - 4) // step * step
        valid = [d for d in (lower, lower + step) if d >= 4 + step]
        kind = "DenseNet-BC" if bottleneck else "DenseNet"
        raise ValueError(
            f"depth {depth} does not fit {kind}: depth - 4 must be a positive multiple of "
            f"{step}; nearest valid depths: {' and '.join(map(str, valid))}"
        )
    n = (depth - 4) // step
    return DenseNet(
        growth_rate, (n, n, n), bottleneck=bottleneck, compression=compression, **kwargs
    )


def _imagenet(growth_rate: int, block_config: Sequence[int], **kwargs) -> DenseNet:
    kwargs.setdefault("num_classes", 1000)
    return DenseNet(growth_rate, block_config, stem="imagenet", **kwargs)


def densenet121(**kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16) for ImageNet."""
    return _imagenet(32, (6, 12, 24, 16), **kwargs)


def densenet169(**kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32) for ImageNet."""
    return _imagenet(32, (6, 12, 32, 32), **kwargs)


def densenet201(**kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32) for ImageNet."""
    return _imagenet(32, (6, 12, 48, 32), **kwargs)


def densenet264(**kwargs) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6-12-64-48) for ImageNet."""
    return _imagenet(32, (6, 12, 64, 48), **kwargs)


def densenet161(**kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96-channel stem) for ImageNet."""
    kwargs.setdefault("num_init_features", 96)
    return _imagenet(48, (6, 12, 36, 24), **kwargs)


# Old torchvision checkpoints name dense-layer modules "norm.1" instead of "norm1".
_LEGACY_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


# What torch.load(weights_only=True) names when a file asks to import or call a global.
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_OS_MODULES = {"posix": "os", "nt": "os"}  # os.system pickles as posix.system or nt.system


def _refused_global(e: Exception) -> str | None:
    """The global a weights-only load refused (e.g. "os.system"), else None (a file that is
    not a pickle at all fails the same way, with "Unsupported operand", and is corrupt)."""
    if not isinstance(e, pickle.UnpicklingError) or "Weights only load failed" not in str(e):
        return None
    match = _GLOBAL.search(str(e))
    if not match:
        return None
    module, _, name = match.group(1).rpartition(".")
    return f"{_OS_MODULES.get(module, module or 'builtins')}.{name}"


def load_file(path: str | PathLike) -> object:
    """torch.load(weights_only=True) on the CPU; an unreadable file is a one-line ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for bad files
        refused = _refused_global(e)
        if refused is not None:
            raise ValueError(
                f"cannot read {path}: refused because it asks to import or call something "
                f"that is not plain data ({refused})"
            ) from None
        # torch's weights-only message puts the unpickler's own words after its advice
        text = str(e).split("WeightsUnpickler error:")[-1]
        reason = (text.strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"cannot read {path}: truncated or corrupt ({reason})") from None


def load_torchvision_checkpoint(model: DenseNet, path: str | PathLike) -> None:
    """Load a torchvision DenseNet state_dict file (legacy keys included) into model, strictly."""
    state = load_file(path)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state_dict (a dict of tensors)")
    state = {_LEGACY_KEY.sub(r"\1\2.", k): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split()[1:])[:300]  # drop "Error(s)", keep one line
        raise ValueError(f"{path} does not fit this DenseNet: {detail}") from None


# ---------------------------------------------------------------------------------------
# Memory-efficient path (memory_efficient=True, training with gradients)
#
# With shared_stats (the default) eager training takes the next section's block Function,
# which keeps the same one buffer and recomputes without checkpointing. This section is
# the path for shared_stats=False and under torch.compile.
#
# Each block allocates one buffer for its output. The block input and every layer's new
# feature maps are copied into it once; each layer's input is a prefix view, so the
# inputs the checkpoints keep for backward cost no memory of their own:
#
#     buffer   [ x0 | f1 | f2 | f3 ]   = the block's output
#     layer1    <x0>                    reads buffer[:, :c0]      writes f1
#     layer2    <-x0-f1->               reads buffer[:, :c0+k]    writes f2
#     layer3    <--x0-f1-f2-->          reads buffer[:, :c0+2k]   writes f3
#
# Each layer's BN, ReLU and first conv (outputs that grow with depth) are recomputed in
# backward; only the bottleneck's fixed-size tensors are stored.
# TorchScript cannot script checkpointing (nor the shared-statistics Function), so a
# scripted model takes the plain path: the same outputs and gradients, more memory.
# ---------------------------------------------------------------------------------------


def _recomputes(memory_efficient: bool, training: bool) -> bool:
    """Whether a memory-efficient module recomputes its growing part in backward."""
    return (
        memory_efficient and training and torch.is_grad_enabled() and not torch.jit.is_scripting()
    )


def _layout(x: Tensor) -> torch.memory_format:
    """channels_last for a tensor laid out so (a prefix view of the buffer too), else NCHW."""
    return torch.channels_last if x.stride(1) == 1 else torch.contiguous_format


def _dense(x: Tensor) -> Tensor:
    """x in one dense block of memory, in its own layout: a prefix view of the shared buffer
    is strided, and BN's fast kernels need a dense tensor (a no-op on the plain path)."""
    if x.stride(1) == 1:  # _layout's test, written out: TorchScript compiles this one
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


class _ScratchRunningStats:
    """Let a recomputation update throwaway copies of BN's running statistics, so the
    batch is counted once (torchvision and efficient_densenet_pytorch count it twice).
    A class, not @contextmanager: each backward through the graph enters it again."""

    def __init__(self, norm: nn.BatchNorm2d):
        self.norm = norm

    def __enter__(self):
        self.real = dict(self.norm.named_buffers(recurse=False))
        for name, buf in self.real.items():
            setattr(self.norm, name, buf.clone())

    def __exit__(self, *exc):
        for name, buf in self.real.items():
            setattr(self.norm, name, buf)


def _checkpoint_first_conv(layer: _DenseLayer, x: Tensor) -> Tensor:
    """layer._first_conv(x), keeping only its (linear-size) output for backward."""
    if torch.compiler.is_exporting():
        raise RuntimeError(
            "torch.export cannot trace memory_efficient=True in training mode (checkpointing): "
            "export model.eval(), or a model built with memory_efficient=False"
        )
    # Under torch.compile the running-stat update is a traced buffer mutation that happens
    # once, so only eager mode needs the scratch-stats recomputation context.
    kwargs = {}
    if not torch.compiler.is_compiling():
        kwargs["context_fn"] = lambda: (nullcontext(), _ScratchRunningStats(layer.norm1))
    # preserve_rng_state=False: nothing random inside, dropout comes after
    return checkpoint(layer._first_conv, x, use_reentrant=False, preserve_rng_state=False, **kwargs)


class _Append(torch.autograd.Function):
    """Copy new feature maps into the block's buffer right after x (a prefix of it) and
    return the longer prefix; backward splits the gradient. Saves nothing for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, new: Tensor, buffer: Tensor) -> Tensor:
        ctx.split = x.shape[1]
        end = ctx.split + new.shape[1]
        buffer[:, ctx.split : end].copy_(new)
        # .data: a view returned by a custom Function may not see its base written in
        # place afterwards (autograd: "Output 0 of _Append is a view and its base ... has
        # been modified inplace"), and the next _Append writes into buffer. .data is the
        # same memory with no view link to buffer and a version counter of its own.
        return buffer[:, :end].data

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        return grad[:, : ctx.split], grad[:, ctx.split :], None


def _block_buffer(x: Tensor, channels: int) -> Tensor:
    """An empty (N, channels, H, W) buffer in x's layout and dtype: a block's output."""
    n, _, h, w = x.shape
    return torch.empty(
        (n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=_layout(x)
    )


def _one_buffer_forward(block: _DenseBlock, x: Tensor) -> Tensor:
    """The block's training forward with every layer reading a prefix view of one buffer."""
    buffer = _block_buffer(x, block.out_channels)
    x = _Append.apply(buffer[:, :0], x, buffer)
    for layer in block.values():
        x = _Append.apply(x, layer(x), buffer)
    return x


# ---------------------------------------------------------------------------------------
# Shared batch statistics (shared_stats=True: eager training with gradients)
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
# not run on this path, and it is differentiable once (shared_stats=False for either).
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
    _, g_weight, g_bias = torch.ops.aten.native_batch_norm_backward(
        g, x, norm.weight, mean, var, None, None, False, norm.eps, [False, True, True]
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


def _shared_stats_block(block: _DenseBlock, x: Tensor) -> Tensor:
    """The block's training forward with shared statistics, one Function for the block."""
    params = [p for layer in block.values() for p in _layer_params(layer)]
    return _SharedStatsBlock.apply(x, block, *params)
