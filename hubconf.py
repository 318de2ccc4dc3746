"""torch.hub entry points: torch.hub.load("<repo or local path>", "densenet_bc_100_12").

Every entry takes torchvision's pretrained= and weights= too. No weights ship with this
repository: weights=<path to a state_dict file> loads one (torchvision's included).
"""

from os import PathLike
from pathlib import Path

import densenet
from densenet import DenseNet

dependencies = ["torch"]
__all__ = [
    "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
    "densenet_40_12", "densenet_bc_100_12", "densenet_bc_190_40", "densenet_bc_250_24",
]  # fmt: skip


def _build(model: DenseNet, pretrained: bool, weights: object) -> DenseNet:
    """model with weights loaded from a file path; a weights name or pretrained=True is refused."""
    if isinstance(weights, str | PathLike) and Path(weights).is_file():
        densenet.load_torchvision_checkpoint(model, weights)
    elif pretrained or weights is not None:
        asked = f"weights={weights!r} is not a file" if weights is not None else "pretrained=True"
        raise ValueError(
            f"{asked}: no named weights ship with this repository; download torchvision's file "
            "(e.g. densenet121-a639ec97.pth) and pass weights='path/to/file.pth', or call "
            "densenet.load_torchvision_checkpoint(model, path)"
        )
    return model


def densenet121(pretrained: bool = False, weights: object = None, **kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16) for ImageNet."""
    return _build(densenet.densenet121(**kwargs), pretrained, weights)


def densenet169(pretrained: bool = False, weights: object = None, **kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32) for ImageNet."""
    return _build(densenet.densenet169(**kwargs), pretrained, weights)


def densenet201(pretrained: bool = False, weights: object = None, **kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32) for ImageNet."""
    return _build(densenet.densenet201(**kwargs), pretrained, weights)


def densenet264(pretrained: bool = False, weights: object = None, **kwargs) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6-12-64-48) for ImageNet."""
    return _build(densenet.densenet264(**kwargs), pretrained, weights)


def densenet161(pretrained: bool = False, weights: object = None, **kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96-channel stem) for ImageNet."""
    return _build(densenet.densenet161(**kwargs), pretrained, weights)


def densenet_40_12(pretrained: bool = False, weights: object = None, **kwargs) -> DenseNet:
    """DenseNet-40-12 for CIFAR (1.0M parameters; paper C10+ error 5.24%)."""
    model = densenet.densenet_cifar(40, 12, bottleneck=False, compression=1, **kwargs)
    return _build(model, pretrained, weights)


def densenet_bc_100_12(pretrained: bool = False, weights: object = None, **kwargs) -> DenseNet:
    """DenseNet-BC-100-12 for CIFAR (0.8M parameters; paper C10+ error 4.51%)."""
    return _build(densenet.densenet_cifar(100, 12, **kwargs), pretrained, weights)


def densenet_bc_250_24(pretrained: bool = False, weights: object = None, **kwargs) -> DenseNet:
    """DenseNet-BC-250-24 for CIFAR (15.3M parameters; paper C10+ error 3.62%)."""
    return _build(densenet.densenet_cifar(250, 24, **kwargs), pretrained, weights)


def densenet_bc_190_40(pretrained: bool = False, weights: object = None, **kwargs) -> DenseNet:
    """DenseNet-BC-190-40 for CIFAR (25.6M parameters; paper C10+ error 3.46%)."""
    return _build(densenet.densenet_cifar(190, 40, **kwargs), pretrained, weights)
