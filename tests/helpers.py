"""What the model tests build with (torch alone, so that they run on the copyable files'
floor torch): a model's parameter count, a small float64 DenseNet, a count of module calls."""

import collections

import torch
from torch import nn

import densenet


def n_params(model: nn.Module) -> int:
    """The model's parameter count, as the papers count them."""
    return sum(p.numel() for p in model.parameters())


def tiny_densenet(
    bottleneck: bool,
    memory_efficient: bool = False,
    drop_rate: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> densenet.DenseNet:
    """A small DenseNet (two blocks of two layers), in float64 by default; the same weights
    at every call."""
    torch.manual_seed(0)
    return densenet.DenseNet(
        growth_rate=3,
        block_config=(2, 2),
        num_init_features=4,
        bottleneck=bottleneck,
        compression=0.5,
        drop_rate=drop_rate,
        num_classes=3,
        memory_efficient=memory_efficient,
    ).to(dtype)


def count_calls(model: nn.Module, kind: type) -> collections.Counter:
    """How often each module of this kind runs (a forward hook on each), by name."""
    counts = collections.Counter()
    for name, m in model.named_modules():
        if isinstance(m, kind):
            m.register_forward_hook(lambda *_, n=name: counts.update([n]))
    return counts
