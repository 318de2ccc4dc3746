"""DiracNets: very deep plain networks without skip connections.

Zagoruyko & Komodakis, "DiracNets: Training Very Deep Neural Networks Without
Skip-Connections", 2017 (arXiv 1706.00388). Both releases of the authors' code
(github.com/szagoruyko/diracnets) are here: v2 (master, the default) and v1 (the
v1 branch, arXiv 1706.00388v1), chosen by `version`.

Every 3x3 conv weight is reparameterised as

    W_hat = alpha * delta + beta * W / ||W||

where delta is the identity ("Dirac") kernel, so a freshly initialised block
is close to an identity map, like a residual block. v2 blocks are ReLU-conv-BN
with alpha, beta per output channel; v1 blocks are NCReLU-conv-BN, where
NCReLU(x) = [relu(x), -relu(-x)] doubles the channels the conv reads and delta
adds the two halves back into x. After training, the parameterisation and every
BatchNorm fold into one plain conv with bias, which gives a VGG-like network
(see `fold`).

Needs torch >= 2.0 (tested on 2.0.1 and 2.14.1).
This file depends on torch and the standard library only; copy it freely.
"""

import copy
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

# -----------------------------------------------------------------------------
# The Dirac parameterisation


def _tiled_dirac(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """v1's delta: the identity on min(in, out) channels, tiled along the wider side.

    With in = 2 * out (a conv reading NCReLU's [relu(x), -relu(-x)]) it is [I, I], which adds
    the two halves back into x. The v1 code builds it the same way (`dirac_delta`).
    """
    out_channels, in_channels = weight.shape[:2]
    n = min(out_channels, in_channels)
    if groups != 1 or max(out_channels, in_channels) % n:
        raise ValueError(
            f"a v1 Dirac conv needs groups=1 and one channel count a multiple of the other, "
            f"not {in_channels} -> {out_channels} channels in {groups} groups"
        )
    square = nn.init.dirac_(weight.new_empty(n, n, *weight.shape[2:]))
    return square.repeat(out_channels // n, in_channels // n, *[1] * (weight.dim() - 2))


class Dirac(nn.Module):
    """Weight parametrization W -> alpha·delta + beta·normalize(W) of the authors' code.

    v2: alpha (init 1) and beta (init 0.1) per output channel, delta from dirac_.
    v1: one alpha (init 5) per conv, beta (init 1e-3) one per conv unless channel_beta, and the
    tiled delta of `_tiled_dirac`. normalize is the L2 norm of each whole output filter.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        groups: int = 1,
        version: int = 2,
        channel_beta: bool | None = None,
    ) -> None:
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"DiracNet version must be 1 or 2, not {version}")
        self.version = version
        channels = weight.shape[0]
        if channel_beta is None:
            channel_beta = version == 2
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.alpha = nn.Parameter(torch.empty(channels if version == 2 else 1, **factory))
        self.beta = nn.Parameter(torch.empty(channels if channel_beta else 1, **factory))
        # delta is a constant that dirac_ rebuilds exactly, so it stays out of the state_dict.
        # v2's dirac_ gives a partial identity when the channel counts differ, one per group.
        if version == 2:
            delta = nn.init.dirac_(torch.empty_like(weight), groups)
        else:
            delta = _tiled_dirac(weight, groups)
        self.register_buffer("delta", delta, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' init: alpha keeps the identity path, a small beta starts the learned one."""
        alpha, beta = (1.0, 0.1) if self.version == 2 else (5.0, 1e-3)
        nn.init.constant_(self.alpha, alpha)
        nn.init.constant_(self.beta, beta)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        per_channel = (-1,) + (1,) * (weight.dim() - 1)
        direction = F.normalize(weight.flatten(1), dim=1).view_as(weight)
        alpha, beta = self.alpha.view(per_channel), self.beta.view(per_channel)
        return alpha * self.delta + beta * direction


class _DiracConvNd:
    """Mixin turning an nn.ConvNd into a Dirac-parameterised drop-in replacement.

    The composed weight is still `self.weight`; the raw W lives at
    `self.parametrizations.weight.original` (torch's parametrize layout).
    With stride 1, odd kernel_size and padding = dilation * (kernel_size - 1) / 2,
    the v2 delta path is an exact identity for every padding mode and for groups.
    `version` and `channel_beta` choose the parameterisation (see `Dirac`).
    """

    def __init__(
        self,
        *args: Any,
        version: int = 2,
        channel_beta: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        dirac = Dirac(self.weight, self.groups, version, channel_beta)
        parametrize.register_parametrization(self, "weight", dirac)
        self._reset_raw()

    def reset_parameters(self) -> None:
        """The raw W as the authors' code, alpha and beta as `Dirac`, nn.ConvNd's default bias."""
        # nn.ConvNd.__init__ calls this before the parametrization exists; its
        # own weight init is overwritten by _reset_raw, only its bias init is kept.
        super().reset_parameters()
        if parametrize.is_parametrized(self, "weight"):
            self.parametrizations.weight[0].reset_parameters()
            self._reset_raw()

    def _reset_raw(self) -> None:
        """v2: Kaiming-normal raw W; v1: N(0, 0.1^2) (`conv_params(..., gain=0.1)` there)."""
        # W enters only through W / ||W||, but its scale sets the step size the
        # normalisation sees, so it follows each version's code.
        raw = self.parametrizations.weight.original
        if self.parametrizations.weight[0].version == 1:
            nn.init.normal_(raw, std=0.1)
        else:
            nn.init.kaiming_normal_(raw, nonlinearity="relu")


class DiracConv1d(_DiracConvNd, nn.Conv1d):
    """nn.Conv1d with a Dirac-parameterised weight."""


class DiracConv2d(_DiracConvNd, nn.Conv2d):
    """nn.Conv2d with a Dirac-parameterised weight."""


class DiracConv3d(_DiracConvNd, nn.Conv3d):
    """nn.Conv3d with a Dirac-parameterised weight."""


class NCReLU(nn.Module):
    """v1's non-linearity cat([relu(x), -relu(-x)], dim 1): both signs pass, channels double."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(x), -F.relu(-x)], 1)


# -----------------------------------------------------------------------------
# Networks


class DiracBlock(nn.Sequential):
    """Pre-activation block without skip connection: ReLU -> DiracConv2d 3x3 -> BN (v2), or
    NCReLU -> DiracConv2d 3x3 reading 2 * in_channels -> BN (v1)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        version: int = 2,
        channel_beta: bool | None = None,
    ) -> None:
        if version == 1:
            activation, conv_in = ("ncrelu", NCReLU()), 2 * in_channels
        else:
            activation, conv_in = ("relu", nn.ReLU()), in_channels
        conv = DiracConv2d(
            conv_in, out_channels, 3, padding=1, bias=False,
            version=version, channel_beta=channel_beta,
        )  # fmt: skip
        super().__init__(
            OrderedDict([activation, ("conv", conv), ("bn", nn.BatchNorm2d(out_channels))])
        )


class DiracNet(nn.Module):
    """Stem, groups of DiracBlocks separated by 2x2 max-pools, then [ReLU]-avgpool-linear.

    `version`, `channel_beta` go to every block; `last_relu` puts a ReLU before the avgpool.
    """

    def __init__(
        self,
        stem: nn.Sequential,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int,
        version: int = 2,
        last_relu: bool = True,
        channel_beta: bool | None = None,
    ) -> None:
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"DiracNet version must be 1 or 2, not {version}")
        self.version = version
        self.features = nn.Sequential(OrderedDict(stem=stem))
        channels = widths[0]
        for g, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            if g > 0:
                self.features.add_module(f"pool{g}", nn.MaxPool2d(2))
            # The first block of each group changes the width, the rest keep it.
            group = [
                DiracBlock(channels if i == 0 else width, width, version, channel_beta)
                for i in range(count)
            ]
            self.features.add_module(f"group{g}", nn.Sequential(*group))
            channels = width
        if last_relu:
            self.features.add_module("relu", nn.ReLU())
        self.features.add_module("avgpool", nn.AdaptiveAvgPool2d(1))
        self.features.add_module("flatten", nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Initialise as the official code (both versions): Kaiming-normal conv and linear
        weights, zero biases, BN weight U[0,1)."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) or type(m) is nn.Conv2d:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            # DiracConv2d already initialises itself (see _DiracConvNd._reset_raw).

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _scaled(widths: Sequence[int], width: float) -> list[int]:
    """Channel counts for a width multiplier; every group needs at least one channel."""
    # The official code truncates instead; the two agree on all published widths.
    scaled = [round(w * width) for w in widths]
    if min(scaled) < 1:
        raise ValueError(f"width {width} leaves a group with no channels")
    return scaled


def diracnet_cifar(
    depth: int,
    width: float,
    num_classes: int = 10,
    in_channels: int = 3,
    version: int = 2,
) -> DiracNet:
    """DiracNet-depth-width for 32x32 inputs, e.g. DiracNet-34-2 (depth=34, width=2).

    depth follows the official code of both versions: 3 groups of 2 * (depth - 4) / 6 blocks.
    """
    if depth < 10 or (depth - 4) % 6:
        below = depth - (depth - 4) % 6
        nearest = (
            f"nearest valid depths are {below} and {below + 6}"
            if below >= 10
            else "the smallest valid depth is 10"
        )
        raise ValueError(
            f"depth {depth} does not fit: (depth-4) must be divisible by 6 "
            f"and depth >= 10; {nearest}"
        )
    widths = _scaled((16, 32, 64), width)
    # Official stem of both versions: conv -> BN -> ReLU. A v2 block opens with its
    # own ReLU, so block 0 applies it twice; ReLU is idempotent, so it is harmless.
    stem = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(widths[0]),
            relu=nn.ReLU(),
        )
    )
    n = (depth - 4) // 6
    # The v1 code pools the last BN's output directly (no ReLU) and keeps one alpha
    # and one beta per conv (diracnet.py on the v1 branch).
    return DiracNet(stem, widths, [2 * n] * 3, num_classes, version, last_relu=version == 2)


def _diracnet_imagenet(
    blocks: Sequence[int], width: float, num_classes: int, in_channels: int, version: int
) -> DiracNet:
    """ImageNet DiracNet: groups of 2 * blocks DiracBlocks at 64/128/256/512 * width."""
    widths = _scaled((64, 128, 256, 512), width)
    # Official stem of both versions: 7x7/2 conv -> BN -> 3x3/2 max-pool with no
    # ReLU; the first block's own (NC)ReLU supplies the non-linearity.
    stem = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
            bn=nn.BatchNorm2d(widths[0]),
            pool=nn.MaxPool2d(3, stride=2, padding=1),
        )
    )
    # v1 follows the released DiracNet-18-0.75 (diracnet-export.ipynb on the v1 branch):
    # beta per output channel and a ReLU before the avgpool. The v1 branch's diracnet.py
    # has one beta per conv and no ReLU there; the released model is what was measured.
    return DiracNet(
        stem, widths, [2 * b for b in blocks], num_classes, version,
        channel_beta=True,
    )  # fmt: skip


def diracnet18(
    width: float = 1.0, num_classes: int = 1000, in_channels: int = 3, version: int = 2
) -> DiracNet:
    """DiracNet-18 for ImageNet (v2: 11,523,368 parameters at width 1). The released v1
    model is DiracNet-18-0.75: diracnet18(0.75, version=1), 12,759,464 parameters."""
    return _diracnet_imagenet((2, 2, 2, 2), width, num_classes, in_channels, version)


def diracnet34(
    width: float = 1.0, num_classes: int = 1000, in_channels: int = 3, version: int = 2
) -> DiracNet:
    """DiracNet-34 for ImageNet (v2: 21,638,952 parameters at width 1)."""
    return _diracnet_imagenet((3, 4, 6, 3), width, num_classes, in_channels, version)


# -----------------------------------------------------------------------------
# Folding into a plain network


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    """The layers of nested nn.Sequentials in execution order."""
    for child in module.children():
        if isinstance(child, nn.Sequential):
            yield from _leaves(child)
        else:
            yield child


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain Conv2d with bias computing what `conv` computes (Dirac weight composed)."""
    weight = conv.weight
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        dtype=weight.dtype,
        device=weight.device,
    )
    plain.weight.copy_(weight)
    plain.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(plain.bias))
    return plain


def _absorb_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode BN into the preceding conv: w * s, (b - mean) * s + shift."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    # Compose in float64 so the folded weights round only once.
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = (conv.bias.double() - bn.running_mean.double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)


_FOLDED_NAMES = {
    NCReLU: "ncrelu",
    nn.ReLU: "relu",
    nn.MaxPool2d: "pool",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.Flatten: "flatten",
}


@torch.no_grad()
def fold(model: DiracNet) -> nn.Sequential:
    """A plain Conv2d(bias)/(NC)ReLU/MaxPool/avgpool/Linear copy of `model` with the same
    eval-mode outputs; the Dirac parameterisation and BN are folded into the convs.

    `model` itself is left untouched. Layers are named conv0, relu0 (ncrelu0 in v1), ..., fc.
    """
    layers: list[tuple[str, nn.Module]] = []
    counts: dict[str, int] = {}

    def add(kind: str, layer: nn.Module) -> None:
        layers.append((f"{kind}{counts.get(kind, 0)}", layer))
        counts[kind] = counts.get(kind, 0) + 1

    for layer in _leaves(model.features):
        if isinstance(layer, nn.Conv2d):
            add("conv", _plain_conv(layer))
        elif isinstance(layer, nn.BatchNorm2d):
            if not layers or not isinstance(layers[-1][1], nn.Conv2d):
                raise ValueError("fold needs every BatchNorm2d right after a Conv2d")
            _absorb_bn(layers[-1][1], layer)
        elif type(layer) in _FOLDED_NAMES:
            add(_FOLDED_NAMES[type(layer)], copy.deepcopy(layer))
        else:
            raise TypeError(f"fold does not know how to fold {type(layer).__name__}")
    layers.append(("fc", copy.deepcopy(model.classifier)))
    return nn.Sequential(OrderedDict(layers))


# -----------------------------------------------------------------------------
# Optimisation


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer param groups [decayed, not decayed], decayed as the official trainers do.

    v2 (train.py on master): conv and linear weights only; alpha, beta, BN parameters and
    biases get none, and a DiracConv's decayed tensor is its raw W. v1 (train.py on the v1
    branch): one SGD weight decay on every parameter, so the second group is empty.
    """
    params = list(model.parameters())
    if any(isinstance(m, Dirac) and m.version == 1 for m in model.modules()):
        return [
            {"params": params, "weight_decay": weight_decay},
            {"params": [], "weight_decay": 0.0},
        ]
    decayed = set()
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if parametrize.is_parametrized(m, "weight"):
                decayed.add(id(m.parametrizations.weight.original))
            else:
                decayed.add(id(m.weight))
    return [
        {
            "params": [p for p in params if id(p) in decayed],
            "weight_decay": weight_decay,
        },
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
