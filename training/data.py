"""DenseNet's datasets: CIFAR-10/100, SVHN, (Fashion-)MNIST on the device; ImageNet.

The small datasets are held on the device as uint8 tensors, then shuffled, cropped,
flipped and normalised there in batch (no per-image Python), like KellerJordan/airbench.
datafiles.py gets their files (torchvision downloads, verifies and parses them); any
failure to get them becomes one DataError line.
"""

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from training import datafiles
from training.datafiles import DataError, check_folder

# The label of the padding that fills the last evaluation batch to full size: callers skip
# it (it is cross_entropy's default ignore_index; error counts must skip it too).
IGNORE_LABEL = -100


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the augmentation need to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    crop_pad: int  # padding of the random-crop augmentation
    flip: bool  # whether random horizontal flips are allowed (not for digits)
    url: str  # official homepage, for error messages
    # True: normalise by the training images' per-channel mean and std; False: pixels/255.
    standardize: bool = True


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
MNIST_URL = "http://yann.lecun.com/exdb/mnist/"
FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist"
IMAGENET_URL = "https://image-net.org/"

# ImageNet is not here: imagenet() counts its classes and returns its own DatasetInfo.
# SVHN is not standardised: the paper (Sec. 4.2) divides its pixels by 255 and nothing more.
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, 4, True, CIFAR_URL),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, 4, True, CIFAR_URL),
    "svhn": DatasetInfo("svhn", 10, 3, 32, 4, False, SVHN_URL, standardize=False),
    "mnist": DatasetInfo("mnist", 10, 1, 28, 2, False, MNIST_URL),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, 2, True, FASHION_URL),
}
_SOURCES: dict[str, tuple[str, type]] = {
    "cifar10": ("CIFAR-10", datasets.CIFAR10),
    "cifar100": ("CIFAR-100", datasets.CIFAR100),
    "svhn": ("SVHN", datasets.SVHN),
    "mnist": ("MNIST", datasets.MNIST),
    "fashion-mnist": ("Fashion-MNIST", datasets.FashionMNIST),
}

# DenseNet splits a 6,000-image SVHN validation set off the training data as Sermanet et
# al. did: 400 images per class from "train", 200 per class from "extra". We take the
# first ones of each class in file order.
SVHN_VAL_PER_CLASS = (400, 200)
SVHN_SPLITS = ("train", "extra", "test")


@dataclass
class Split:
    """One split of a dataset: uint8 N×C×H×W images and int64 labels, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def __getitem__(self, index: torch.Tensor | slice) -> "Split":
        return Split(self.images[index], self.labels[index])


def load(
    name: str,
    root: str | os.PathLike,
    device: torch.device | str = "cpu",
    train_subset: int | None = None,
    download: bool = True,
    *,
    val_split: int = 0,
    seed: int = 0,
    svhn_val_per_class: tuple[int, int] = SVHN_VAL_PER_CLASS,
) -> dict[str, Split]:
    """Splits "train", "val" (SVHN's own, or val_split > 0) and "test" of a DATASETS entry.

    val_split holds out that many training images, class-balanced and seeded by `seed`;
    train_subset then keeps the first N of the rest; svhn_val_per_class: validation images
    per class from SVHN's (train, extra). Nothing is left behind when it fails.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if val_split < 0 or (val_split and name == "svhn"):
        why = "SVHN keeps its own 6,000-image split" if val_split > 0 else "it is negative"
        raise DataError(f"cannot hold out a validation split of {val_split} images: {why}")
    root = Path(root)
    check_folder(root)
    with datafiles.tidy(_SOURCES[name][1], root):
        splits = _read(name, root, download, svhn_val_per_class)
    if val_split:
        splits = _with_validation(splits, val_split, seed, name)
    if train_subset is not None:
        if train_subset < 1:
            raise DataError(f"train_subset must be at least 1, not {train_subset}")
        splits["train"] = splits["train"][:train_subset]
    return {key: split.to(device) for key, split in splits.items()}


def _read(
    name: str, root: Path, download: bool, svhn_val_per_class: tuple[int, int]
) -> dict[str, Split]:
    """The dataset's splits as read from disk (downloaded if allowed), on the CPU."""
    title, cls = _SOURCES[name]

    def fetch(**split: object) -> Split:
        dataset = datafiles.fetch(cls, title, DATASETS[name].url, root, download, **split)
        return Split(*datafiles.arrays(dataset))

    if name == "fashion-mnist":
        datafiles.install_system_fashion_mnist(root)
    if name == "svhn":
        parts = [fetch(split=s) for s in SVHN_SPLITS]
        return _svhn_splits(*parts, per_class=svhn_val_per_class)
    return {"train": fetch(train=True), "test": fetch(train=False)}


def _with_validation(
    splits: dict[str, Split], count: int, seed: int, name: str
) -> dict[str, Split]:
    """The splits with `count` training images moved into a new "val" split (_hold_out)."""
    train = splits["train"]
    if count >= len(train.labels):
        raise DataError(
            f"a validation split of {count} images leaves none of {_SOURCES[name][0]}'s "
            f"{len(train.labels)} training images to train on"
        )
    held = _hold_out(train.labels, count, seed, DATASETS[name].num_classes)
    return {"train": train[~held], "val": train[held], "test": splits["test"]}


def _hold_out(labels: torch.Tensor, count: int, seed: int, num_classes: int) -> torch.Tensor:
    """Mask of `count` images to hold out: class-balanced, drawn by a CPU generator seeded
    with `seed` alone, so every rank, world size and resume holds out the same images."""
    labels = labels.cpu()
    quota = _class_quotas(labels.bincount(minlength=num_classes), count)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in quota.nonzero().squeeze(1).tolist():
        held[order[labels[order] == c][: quota[c]]] = True
    return held


def _class_quotas(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Images per class summing to total (at most counts.sum()), as equal as counts allow.

    A class too small for an equal share gives all it has and the others share the rest
    (water-filling); a remainder goes one each to the lowest-numbered classes with images.
    """
    quota = torch.zeros_like(counts)
    while (left := total - int(quota.sum())) > 0:
        open_classes = (quota < counts).nonzero().squeeze(1)
        share, extra = divmod(left, len(open_classes))
        if share == 0:
            quota[open_classes[:extra]] += 1
        else:
            quota[open_classes] = torch.minimum(quota[open_classes] + share, counts[open_classes])
    return quota


def _svhn_splits(
    train: Split, extra: Split, test: Split, per_class: tuple[int, int]
) -> dict[str, Split]:
    """Validation: the first per_class images of each class; training: the rest."""
    val_train = _first_per_class(train.labels, per_class[0], "train")
    val_extra = _first_per_class(extra.labels, per_class[1], "extra")

    def pick(in_train: torch.Tensor, in_extra: torch.Tensor) -> Split:
        return Split(
            torch.cat([train.images[in_train], extra.images[in_extra]]),
            torch.cat([train.labels[in_train], extra.labels[in_extra]]),
        )

    val = pick(val_train, val_extra)
    return {"train": pick(~val_train, ~val_extra), "val": val, "test": test}


def _first_per_class(labels: torch.Tensor, count: int, source: str) -> torch.Tensor:
    """Boolean mask of the first `count` images of each SVHN class, in file order."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in range(10):
        index = (labels == c).nonzero().squeeze(1)
        if len(index) < count:
            raise DataError(
                f"SVHN {source} has {len(index)} images of class {c}, fewer than the "
                f"{count} per class that the validation split takes"
            )
        mask[index[:count]] = True
    return mask


def normalisation(
    info: DatasetInfo, train: Split
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mean, std) for Batches: the training images' per-channel statistics, or (None, None)
    where the dataset is not standardised (SVHN: pixels / 255, as the paper)."""
    if not info.standardize:
        return None, None
    return channel_stats(train.images)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of uint8 N×C×H×W images, in [0,1] units.

    Accumulated in float64 on the CPU over chunks (MPS has no float64); returned there.
    """
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.cpu().double()
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return mean / 255, std / 255


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer reads batches from (Batches, Loader): len(self) batches an epoch,
    whose random draws come from `generator` (save its state to resume an epoch)."""

    generator: torch.Generator

    def __len__(self) -> int: ...

    def epoch(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class Batches(BatchSource):
    """Batches of one split held on its device as uint8, augmented there in batch.

    batch_size is global: rank r of world_size gets slice r of every global batch.
    Training draws, per epoch and from `generator` on the CPU, one permutation and every
    sample's crop offsets and flip, so the stream is identical on any device and world
    size. Evaluation is sequential with constant batch shape: the last batch is padded
    with zero images labelled IGNORE_LABEL, which callers must ignore (cross_entropy with
    ignore_index=IGNORE_LABEL, reduction="sum"; and in error counts).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        train: bool,
        augment: bool = False,
        crop_pad: int = 0,
        flip: bool = False,
        pad_mode: str = "constant",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        _check_ranks(batch_size, rank, world_size)
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode {pad_mode!r} is not one of {', '.join(PAD_MODES)}")
        if augment and not train:
            raise ValueError("augmentation is for training batches only")
        self.images, self.labels = split.images, split.labels
        self.batch_size, self.rank = batch_size, rank
        self.local = batch_size // world_size
        self.train, self.augment, self.crop_pad = train, augment, crop_pad
        self.flip, self.pad_mode, self.channels_last = flip, pad_mode, channels_last
        self.generator = torch.Generator().manual_seed(seed)
        if train and len(self) == 0:
            raise DataError(f"{len(self.labels)} images make no batch of {batch_size}")
        # (x/255 - mean)/std as one fused multiply-add x*scale + shift.
        device, channels = self.images.device, self.images.shape[1]
        mean_t = torch.as_tensor([0.0] * channels if mean is None else mean).double()
        std_t = torch.as_tensor([1.0] * channels if std is None else std).double()
        self.scale = (1 / (255 * std_t)).float().view(1, -1, 1, 1).to(device)
        self.shift = (-mean_t / std_t).float().view(1, -1, 1, 1).to(device)
        # Sample and channel axes of the crop gather, broadcast against rows, columns.
        self.n_axis = torch.arange(self.local, device=device).view(-1, 1, 1, 1)
        self.c_axis = torch.arange(channels, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return batches_per_epoch(len(self.labels), self.batch_size, self.train)

    def epoch(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float32 images, int64 labels) of this rank for batches start..len-1.

        The epoch's random draws happen in this call: save generator's state before it.
        """
        if not self.train:
            return self._eval_batches(start)
        n, device, g = len(self.labels), self.images.device, self.generator
        perm = torch.randperm(n, generator=g).to(device)
        rows = cols = torch.empty(0)
        if self.augment:
            # Every sample's crop as row and column indices into its padded image; a
            # flip reads the same columns right to left.
            window = torch.arange(self.images.shape[-1])
            offsets = torch.randint(0, 2 * self.crop_pad + 1, (2, n, 1), generator=g)
            rows, cols = offsets[0] + window, offsets[1] + window
            if self.flip:
                flips = torch.randint(0, 2, (n, 1), generator=g).bool()
                cols = torch.where(flips, cols.flip(1), cols)
            rows = rows[:, None, :, None].to(device)  # N×1×H×1
            cols = cols[:, None, None, :].to(device)  # N×1×1×W
        return self._train_batches(start, perm, rows, cols)

    def _train_batches(
        self, start: int, perm: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(start, len(self)):
            lo = k * self.batch_size + self.rank * self.local
            index = perm[lo : lo + self.local]
            x = self._normalise(self.images[index])
            if self.augment:
                # Normalise first, so zero padding is the mean colour, as fb.resnet.torch
                # (which the authors' Lua code uses) pads; then pad the batch once and
                # gather all the crops in one indexing op.
                x = pad(x, self.crop_pad, self.pad_mode)
                hi = lo + self.local
                x = x[self.n_axis, self.c_axis, rows[lo:hi], cols[lo:hi]]
            yield self._layout(x), self.labels[index]

    def _eval_batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Sequential batches; the last ones padded to full size with IGNORE_LABEL."""
        n = len(self.labels)
        for k in range(start, len(self)):
            lo = min(n, k * self.batch_size + self.rank * self.local)
            hi = min(n, lo + self.local)
            x, y = self.images[lo:hi], self.labels[lo:hi]
            if hi - lo < self.local:
                missing = self.local - (hi - lo)
                x = torch.cat([x, x.new_zeros((missing, *x.shape[1:]))])
                y = torch.cat([y, y.new_full((missing,), IGNORE_LABEL)])
            yield self._layout(self._normalise(x)), y

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=layout)


PAD_MODES = ("constant", "reflect", "symmetric")


def pad(x: torch.Tensor, width: int, mode: str) -> torch.Tensor:
    """Pad the last two dimensions by width: "constant" (zeros), "reflect" (the edge pixel
    once) or "symmetric" (the edge pixel repeated: cv2.BORDER_REFLECT, which DiracNet v1
    pads with; F.pad has no such mode)."""
    if mode != "symmetric":
        return F.pad(x, [width] * 4, mode=mode)
    x = torch.cat([x[..., :width].flip(-1), x, x[..., -width:].flip(-1)], -1)
    return torch.cat([x[..., :width, :].flip(-2), x, x[..., -width:, :].flip(-2)], -2)


def batches_per_epoch(n: int, batch_size: int, train: bool) -> int:
    """Training drops the last partial batch (every step has one shape); evaluation pads it."""
    return n // batch_size if train else math.ceil(n / batch_size)


def _check_ranks(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size % world_size or not 0 <= rank < world_size:
        raise ValueError(f"batch {batch_size} does not split over {world_size} ranks")


# ImageNet as in fb.resnet.torch (the authors' Lua code): normalisation, PCA lighting.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting:
    """AlexNet's PCA colour noise on a C×H×W tensor: add eigvec @ (alpha * eigval)."""

    def __init__(self, alphastd: float = 0.1) -> None:
        self.alphastd = alphastd
        self.eigval = torch.tensor(IMAGENET_EIGVAL)
        self.eigvec = torch.tensor(IMAGENET_EIGVEC)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.alphastd
        return image + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)


class _StackCrops:
    """TenCrop's PIL crops as one normalised 10×C×H×W tensor (a class: it pickles)."""

    def __call__(self, crops: Sequence) -> torch.Tensor:
        normalise = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        return torch.stack([normalise(T.functional.to_tensor(c)) for c in crops])


class _Seeded(Dataset):
    """ImageFolder samples addressed by (index, seed); index -1 is a padding sample.

    The seed fixes the sample's augmentation whatever the worker, world size or resume.
    """

    def __init__(self, folder: ImageFolder, transform: T.Compose, shape: tuple) -> None:
        self.folder, self.transform, self.shape = folder, transform, shape

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        if index < 0:
            return torch.zeros(self.shape), IGNORE_LABEL
        path, label = self.folder.samples[index]
        image = self.folder.loader(path)
        with torch.random.fork_rng(devices=[]):  # keep the caller's RNG (workers=0)
            torch.manual_seed(seed)
            return self.transform(image), label


class Loader(BatchSource):
    """DataLoader workers behind the interface of Batches (generator, len, epoch).

    Per epoch, `generator` draws a permutation and a seed per sample, sharded by rank
    like Batches; evaluation is sequential, padded with IGNORE_LABEL like Batches.
    """

    def __init__(
        self,
        items: _Seeded,
        batch_size: int,
        *,
        train: bool,
        workers: int,
        seed: int,
        rank: int,
        world_size: int,
        device: torch.device | str,
        channels_last: bool,
    ) -> None:
        _check_ranks(batch_size, rank, world_size)
        self.n, self.batch_size, self.train = len(items), batch_size, train
        self.rank, self.world_size = rank, world_size
        self.device, self.channels_last = torch.device(device), channels_last
        self.generator = torch.Generator().manual_seed(seed)
        self.plan: list[list[tuple[int, int]]] = []  # the batch_sampler, set per epoch
        self.loader = DataLoader(
            items,
            batch_sampler=self.plan,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.batch_size, self.train)

    def epoch(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images, int64 labels) on the device for batches start..len-1.

        As in Batches, the epoch's random draws happen in this call.
        """
        total, g = len(self) * self.batch_size, self.generator
        if self.train:
            order = torch.randperm(self.n, generator=g)[:total]
            seeds = torch.randint(0, 2**62, (self.n,), generator=g)[:total]
        else:
            order = torch.cat([torch.arange(self.n), torch.full((total - self.n,), -1)])
            seeds = torch.zeros(total, dtype=torch.int64)
        shape = (len(self), self.world_size, self.batch_size // self.world_size)
        mine = [t.view(shape)[start:, self.rank].tolist() for t in (order, seeds)]
        self.plan[:] = [list(zip(i, s, strict=True)) for i, s in zip(*mine, strict=True)]
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def imagenet_transforms(
    ten_crop: bool = False, colour: bool = True
) -> tuple[T.Compose, T.Compose]:
    """(training, validation) transforms of fb.resnet.torch's datasets/imagenet.lua;
    colour=False leaves out its colour jitter and PCA lighting (DiracNet's recipe).

    Resizing is bicubic, as there: datasets/transforms.lua's Scale defaults to 'bicubic' and
    RandomSizedCrop resizes its crop with image.scale(out, size, size, 'bicubic').
    """
    bicubic = T.InterpolationMode.BICUBIC
    normalise = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    jitter = [T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)] * colour
    crop = T.RandomResizedCrop(224, interpolation=bicubic)
    augment = [crop, T.RandomHorizontalFlip(), *jitter, T.ToTensor(), *[Lighting()] * colour, normalise]
    resize = T.Resize(256, interpolation=bicubic)
    if ten_crop:
        return T.Compose(augment), T.Compose([resize, T.TenCrop(224), _StackCrops()])
    return T.Compose(augment), T.Compose([resize, T.CenterCrop(224), T.ToTensor(), normalise])


def imagenet(
    root: str | os.PathLike,
    batch_size: int,
    *,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    ten_crop: bool = False,
    colour: bool = True,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> tuple[DatasetInfo, Loader, Loader]:
    """ImageNet from root/{train,val}/<class>/*.JPEG: (info, train loader, val loader).

    Training augmentation follows fb.resnet.torch. ten_crop makes val batches
    B×10×3×224×224 (channels_last is not applied); fb.resnet.torch's train.lua
    (computeScore) combines the crops by summing their logits, before any softmax.
    """
    root = Path(root)
    check_folder(root)
    layout = f"expected {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG"
    try:
        train_folder = ImageFolder(root / "train")
        val_folder = ImageFolder(root / "val")
    except OSError as e:
        raise DataError(f"ImageNet not found: {layout} ({e}); {IMAGENET_URL}") from e
    if train_folder.classes != val_folder.classes:
        raise DataError(f"ImageNet's train/ and val/ differ in classes; {layout}")
    train_transform, val_transform = imagenet_transforms(ten_crop, colour)
    val_shape = (10, 3, 224, 224) if ten_crop else (3, 224, 224)
    kw = {"workers": workers, "seed": seed, "rank": rank, "world_size": world_size}
    kw |= {"device": device, "channels_last": channels_last}
    train_items = _Seeded(train_folder, train_transform, (3, 224, 224))
    train = Loader(train_items, batch_size, train=True, **kw)
    val_items = _Seeded(val_folder, val_transform, val_shape)
    val = Loader(val_items, batch_size, train=False, **kw)
    classes = len(train_folder.classes)
    return DatasetInfo("imagenet", classes, 3, 224, 0, True, IMAGENET_URL), train, val
