"""DenseNet (Huang, Liu, van der Maaten, Weinberger, CVPR 2017) in one copyable file.

Needs torch >= 2.0 (tested on 2.0.1 and 2.14.1).
Imports torch and the standard library only. Module and parameter names follow
torchvision's DenseNet, so its ImageNet checkpoints load with strict=True.
The paper's modules come first, then torchvision weight loading, then the
memory-efficient path (memory_efficient=True): the same results in memory linear in depth.
"""

import re
from collections.abc import Sequence
from os import PathLike

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
    "densenet_cifar", "load_torchvision_checkpoint", "load_torchvision_state_dict",
]  # fmt: skip

# Older torch: torch.compiler.is_compiling arrived in 2.3 (torch._dynamo's before it), and
# is_exporting in 2.7; without it no export is refused (torch 2.4's export of a
# training-mode memory-efficient model computes what eager mode does).
if hasattr(getattr(torch, "compiler", None), "is_compiling"):
    _is_compiling = torch.compiler.is_compiling
else:
    from torch._dynamo import is_compiling as _is_compiling
_is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", lambda: False)

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

    def forward(self, x: Tensor) -> Tensor:
        if _recomputes(self.memory_efficient, self.training):
            return self._one_buffer_forward(x)
        # Growing the input by one concatenation a layer, rather than concatenating
        # all earlier outputs in every layer, lets autograd sum each layer's input
        # gradient once, as one tensor, instead of once per earlier output as thin
        # channel slices: bf16 channels_last training on CPU got ~1.4x faster (README).
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)
        return x

    @torch.jit.unused
    def _one_buffer_forward(self, x: Tensor) -> Tensor:
        """Every layer reads a prefix view of one buffer (memory-efficient section below)."""
        buffer = _block_buffer(x, self.out_channels)
        x = _Append.apply(buffer[:, :0], x, buffer)
        for layer in self.values():
            x = _Append.apply(x, layer(x), buffer)
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
            depth, not quadratically.
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


# ---------------------------------------------------------------------------------------
# torchvision's ImageNet weights
# ---------------------------------------------------------------------------------------

# Old torchvision checkpoints name dense-layer modules "norm.1" instead of "norm1".
_LEGACY_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def load_torchvision_state_dict(model: DenseNet, state: object) -> None:
    """Load a torchvision DenseNet state_dict (legacy keys included) into model, strictly;
    anything else is a one-line ValueError."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError("not a state_dict (a dict of tensors)")
    state = {_LEGACY_KEY.sub(r"\1\2.", k): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split()[1:])[:300]  # drop "Error(s)", keep one line
        raise ValueError(f"does not fit this DenseNet: {detail}") from None


def load_torchvision_checkpoint(model: DenseNet, path: str | PathLike) -> None:
    """Load a torchvision DenseNet weights file, e.g. densenet121-a639ec97.pth, into model."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        load_torchvision_state_dict(model, state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------
# Memory-efficient path (memory_efficient=True, training with gradients)
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
# backward; only the bottleneck's fixed-size tensors are stored. TorchScript cannot script
# checkpointing, so a scripted model takes the plain path: the same outputs and gradients,
# more memory.
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


class _FirstConv:
    """layer._first_conv as checkpoint calls it: once in forward, then again in every
    backward through the graph, where BN updates throwaway copies of its running statistics
    so that the batch is counted once (torchvision and efficient_densenet_pytorch count it
    twice). Telling the calls apart here, not with checkpoint's context_fn, runs on torch 2.0."""

    def __init__(self, layer: _DenseLayer):
        self.layer, self.forwarded = layer, False

    def __call__(self, x: Tensor) -> Tensor:
        if not self.forwarded:
            self.forwarded = True
            return self.layer._first_conv(x)
        norm = self.layer.norm1
        real = dict(norm.named_buffers(recurse=False))
        for name, buf in real.items():
            setattr(norm, name, buf.clone())
        try:
            return self.layer._first_conv(x)
        finally:
            for name, buf in real.items():
                setattr(norm, name, buf)


def _checkpoint_first_conv(layer: _DenseLayer, x: Tensor) -> Tensor:
    """layer._first_conv(x), keeping only its (linear-size) output for backward."""
    if _is_exporting():
        raise RuntimeError(
            "torch.export cannot trace memory_efficient=True in training mode (checkpointing): "
            "export model.eval(), or a model built with memory_efficient=False"
        )
    # Compiled, BN's running-stat update is a traced mutation that happens once: only eager
    # mode needs _FirstConv. Compiled training equals the plain model's on torch 2.1, 2.4 and
    # 2.12-2.14; 2.5 and 2.6 count each batch twice, and 2.8 and 2.11 fail inside compile.
    first_conv = layer._first_conv if _is_compiling() else _FirstConv(layer)
    # preserve_rng_state=False: nothing random inside, dropout comes after
    return checkpoint(first_conv, x, use_reentrant=False, preserve_rng_state=False)


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
