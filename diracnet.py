"""DiracNets: very deep plain networks without skip connections.

Zagoruyko & Komodakis, "DiracNets: Training Very Deep Neural Networks Without
Skip-Connections", 2017 (arXiv 1706.00388); architecture details follow the v2
release of the authors' code (github.com/szagoruyko/diracnets).

Every 3x3 conv weight is reparameterised as

    W_hat = diag(alpha) * delta + diag(beta) * W / ||W||

where delta is the identity ("Dirac") kernel, so a freshly initialised block
is close to an identity map, like a residual block. After training, the
parameterisation and every BatchNorm fold into one plain conv with bias, which
gives a VGG-like network (see `fold`).

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


class Dirac(nn.Module):
    """Weight parametrization W -> diag(alpha)·delta + diag(beta)·normalize(W).

    alpha (init 1) and beta (init 0.1) are learnable per output channel, as in
    the v2 code; normalize is the L2 norm of each whole output filter.
    """

    def __init__(self, weight: torch.Tensor, groups: int = 1) -> None:
        super().__init__()
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.alpha = nn.Parameter(torch.empty(weight.shape[0], **factory))
        self.beta = nn.Parameter(torch.empty(weight.shape[0], **factory))
        # dirac_ gives the identity kernel (a partial identity when the channel
        # counts differ, one per group for grouped convs). It is a constant that
        # dirac_ rebuilds exactly, so it stays out of the state_dict.
        delta = nn.init.dirac_(torch.empty_like(weight), groups)
        self.register_buffer("delta", delta, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """alpha = 1 keeps the identity path; beta = 0.1 starts the learned path small."""
        nn.init.ones_(self.alpha)
        nn.init.constant_(self.beta, 0.1)

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
    the delta path is an exact identity for every padding mode and for groups.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dirac = Dirac(self.weight, self.groups)
        parametrize.register_parametrization(self, "weight", dirac)

    def reset_parameters(self) -> None:
        """Kaiming-normal raw W, alpha = 1, beta = 0.1, nn.ConvNd's default bias."""
        # nn.ConvNd.__init__ calls this before the parametrization exists; its
        # own weight init is overwritten below, only its bias init is kept.
        super().reset_parameters()
        if parametrize.is_parametrized(self, "weight"):
            self.parametrizations.weight[0].reset_parameters()
            raw = self.parametrizations.weight.original
        else:
            raw = self.weight
        nn.init.kaiming_normal_(raw, nonlinearity="relu")


class DiracConv1d(_DiracConvNd, nn.Conv1d):
    """nn.Conv1d with a Dirac-parameterised weight."""


class DiracConv2d(_DiracConvNd, nn.Conv2d):
    """nn.Conv2d with a Dirac-parameterised weight."""


class DiracConv3d(_DiracConvNd, nn.Conv3d):
    """nn.Conv3d with a Dirac-parameterised weight."""


# -----------------------------------------------------------------------------
# Networks


class DiracBlock(nn.Sequential):
    """ReLU -> DiracConv2d 3x3 -> BN: pre-activation, no skip connection (v2 block)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            OrderedDict(
                relu=nn.ReLU(),
                conv=DiracConv2d(in_channels, out_channels, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(out_channels),
            )
        )


class DiracNet(nn.Module):
    """Stem, groups of DiracBlocks separated by 2x2 max-pools, then ReLU-avgpool-linear."""

    def __init__(
        self,
        stem: nn.Sequential,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict(stem=stem))
        channels = widths[0]
        for g, (width, count) in enumerate(zip(widths, blocks)):
            if g > 0:
                self.features.add_module(f"pool{g}", nn.MaxPool2d(2))
            # The first block of each group changes the width, the rest keep it.
            group = [
                DiracBlock(channels if i == 0 else width, width) for i in range(count)
            ]
            self.features.add_module(f"group{g}", nn.Sequential(*group))
            channels = width
        self.features.add_module("relu", nn.ReLU())
        self.features.add_module("avgpool", nn.AdaptiveAvgPool2d(1))
        self.features.add_module("flatten", nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Initialise as the official code: Kaiming-normal conv and linear weights,
        zero biases, BN weight U[0,1)."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) or type(m) is nn.Conv2d:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            # DiracConv2d already initialises itself (Kaiming-normal raw W).

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
    depth: int, width: float, num_classes: int = 10, in_channels: int = 3
) -> DiracNet:
    """DiracNet-depth-width for 32x32 inputs, e.g. DiracNet-34-2 (depth=34, width=2).

    depth follows the official code: 3 groups of 2 * (depth - 4) / 6 blocks.
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
    # Official v2 stem: conv -> BN -> ReLU. Block 0 opens with its own ReLU, so
    # the activation is applied twice there; ReLU is idempotent, so it is harmless.
    stem = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(widths[0]),
            relu=nn.ReLU(),
        )
    )
    n = (depth - 4) // 6
    return DiracNet(stem, widths, [2 * n] * 3, num_classes)


def _diracnet_imagenet(
    blocks: Sequence[int], width: float, num_classes: int, in_channels: int
) -> DiracNet:
    """ImageNet DiracNet: groups of 2 * blocks DiracBlocks at 64/128/256/512 * width."""
    widths = _scaled((64, 128, 256, 512), width)
    # Official v2 stem: 7x7/2 conv -> BN -> 3x3/2 max-pool with no ReLU; the
    # first block's own ReLU supplies the non-linearity.
    stem = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
            bn=nn.BatchNorm2d(widths[0]),
            pool=nn.MaxPool2d(3, stride=2, padding=1),
        )
    )
    return DiracNet(stem, widths, [2 * b for b in blocks], num_classes)


def diracnet18(
    width: float = 1.0, num_classes: int = 1000, in_channels: int = 3
) -> DiracNet:
    """DiracNet-18 for ImageNet (11,523,368 parameters at width 1)."""
    return _diracnet_imagenet((2, 2, 2, 2), width, num_classes, in_channels)


def diracnet34(
    width: float = 1.0, num_classes: int = 1000, in_channels: int = 3
) -> DiracNet:
    """DiracNet-34 for ImageNet (21,638,952 parameters at width 1)."""
    return _diracnet_imagenet((3, 4, 6, 3), width, num_classes, in_channels)


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
    plain.bias.copy_(
        conv.bias if conv.bias is not None else torch.zeros_like(plain.bias)
    )
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
    nn.ReLU: "relu",
    nn.MaxPool2d: "pool",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.Flatten: "flatten",
}


@torch.no_grad()
def fold(model: DiracNet) -> nn.Sequential:
    """A plain Conv2d(bias)/ReLU/MaxPool/avgpool/Linear copy of `model` with the same
    eval-mode outputs; the Dirac parameterisation and BN are folded into the convs.

    `model` itself is left untouched. Layers are named conv0, relu0, ..., fc.
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
    """Optimizer param groups decaying conv and linear weights only.

    alpha, beta, BN parameters and biases get no decay, as in the official CIFAR
    recipe; for a DiracConv the decayed tensor is its raw W.
    """
    decayed = set()
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if parametrize.is_parametrized(m, "weight"):
                decayed.add(id(m.parametrizations.weight.original))
            else:
                decayed.add(id(m.weight))
    params = list(model.parameters())
    return [
        {
            "params": [p for p in params if id(p) in decayed],
            "weight_decay": weight_decay,
        },
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
