"""torch.hub entry points: torch.hub.load("<repo or local path>", "densenet_bc_100_12")."""

from densenet import (
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_cifar,
)

dependencies = ["torch"]
__all__ = [
    "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
    "densenet_40_12", "densenet_bc_100_12", "densenet_bc_190_40", "densenet_bc_250_24",
]  # fmt: skip


def densenet_40_12(**kwargs):
    """DenseNet-40-12 for CIFAR (1.0M parameters; paper C10+ error 5.24%)."""
    return densenet_cifar(40, 12, bottleneck=False, compression=1, **kwargs)


def densenet_bc_100_12(**kwargs):
    """DenseNet-BC-100-12 for CIFAR (0.8M parameters; paper C10+ error 4.51%)."""
    return densenet_cifar(100, 12, **kwargs)


def densenet_bc_250_24(**kwargs):
    """DenseNet-BC-250-24 for CIFAR (15.3M parameters; paper C10+ error 3.62%)."""
    return densenet_cifar(250, 24, **kwargs)


def densenet_bc_190_40(**kwargs):
    """DenseNet-BC-190-40 for CIFAR (25.6M parameters; paper C10+ error 3.46%)."""
    return densenet_cifar(190, 40, **kwargs)
