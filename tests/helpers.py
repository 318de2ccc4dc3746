"""What several test files build with: a model's parameter count, a small float64 DenseNet,
a count of module calls, and a run folder as train.py leaves one."""

import collections
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
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


def write_run(folder: Path, log: dict | Sequence[dict], settings: dict | None = None) -> Path:
    """A run folder as train.py leaves one: log.csv from `log` (columns by name, or rows),
    and args.json holding `settings` where they are given. Returns the folder."""
    folder.mkdir(parents=True)
    pd.DataFrame(log).to_csv(folder / "log.csv", index=False)
    if settings is not None:
        (folder / "args.json").write_text(json.dumps(settings))
    return folder
