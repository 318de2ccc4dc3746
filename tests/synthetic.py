"""Tiny synthetic datasets written as real files in the on-disk formats torchvision reads.

Each make_* returns the arrays it wrote (images uint8 N×C×H×W, labels int64 0-based) and
the MD5 of every file, so tests can check what load() returns against what was written.
The synthetic files cannot carry the official MD5s that torchvision checks: tests
register theirs with register_md5 (through pytest's monkeypatch).
"""

import gzip
import hashlib
import pickle
import struct
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision import datasets


@dataclass
class Synthetic:
    """What a make_* function wrote: split name -> (images, labels), file name -> MD5."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    md5: dict[str, str] = field(default_factory=dict)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _random_split(rng: np.random.Generator, n: int, shape: tuple, classes: int):
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    return images, rng.integers(0, classes, n).astype(np.int64)


def _pickle(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the official files are Python 2's


def make_cifar(
    root: Path,
    n_train: int = 50,
    n_test: int = 20,
    num_classes: int = 10,
    seed: int = 0,
    same_image: bool = False,
    train_labels: Sequence[int] | None = None,
) -> Synthetic:
    """CIFAR-10 (cifar-10-batches-py/) or CIFAR-100 (cifar-100-python/) pickles in root.

    same_image=True repeats one random image with random labels: every batch then has the
    same BatchNorm statistics, whatever its size. train_labels replaces the random training
    labels (n_train is then their number)."""
    rng = np.random.default_rng(seed)
    if train_labels is not None:
        n_train = len(train_labels)
    train = _random_split(rng, n_train, (3, 32, 32), num_classes)
    if train_labels is not None:
        train = train[0], np.asarray(train_labels, dtype=np.int64)
    test = _random_split(rng, n_test, (3, 32, 32), num_classes)
    if same_image:
        for images, _ in (train, test):
            images[:] = train[0][0]
    names = [f"class{i}" for i in range(num_classes)]
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        chunks = np.array_split(np.arange(n_train), 5)
        files = {f"data_batch_{i + 1}": (train, c) for i, c in enumerate(chunks)}
        files["test_batch"] = (test, np.arange(n_test))
        label_key, meta = "labels", ("batches.meta", {"label_names": names})
    else:
        folder = root / "cifar-100-python"
        files = {
            "train": (train, np.arange(n_train)),
            "test": (test, np.arange(n_test)),
        }
        label_key = "fine_labels"
        meta = ("meta", {"fine_label_names": names, "coarse_label_names": names[:20]})
    folder.mkdir(parents=True, exist_ok=True)
    for file, ((images, labels), rows) in files.items():
        entry = {
            "data": images[rows].reshape(len(rows), -1),
            label_key: labels[rows].tolist(),
        }
        if num_classes == 100:
            entry["coarse_labels"] = (labels[rows] % 20).tolist()
        _pickle(folder / file, {"batch_label": file, "filenames": [], **entry})
    _pickle(folder / meta[0], meta[1])
    md5 = {p.name: md5_of(p) for p in folder.iterdir()}
    return Synthetic({"train": train, "test": test}, md5)


def tar_gz(folder: Path, archive: Path) -> str:
    """Pack `folder` (as its own name) into a .tar.gz like the official archives; MD5."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return md5_of(archive)


def make_svhn(root: Path, per_class: dict[str, int] | None = None) -> Synthetic:
    """SVHN's {train,extra,test}_32x32.mat in root: X 32×32×3×N uint8, y N×1 in 1..10.

    per_class gives the images per digit in each split; labels are shuffled in the file.
    """
    per_class = per_class or {"train": 6, "extra": 4, "test": 2}
    rng = np.random.default_rng(0)
    out = Synthetic({})
    root.mkdir(parents=True, exist_ok=True)
    for split, count in per_class.items():
        labels = rng.permutation(np.repeat(np.arange(10), count))
        images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
        y = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]  # digit 0 is 10
        path = root / f"{split}_32x32.mat"
        scipy.io.savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": y})
        out.splits[split] = images, labels.astype(np.int64)
        out.md5[path.name] = md5_of(path)
    return out


def write_idx(folder: Path, n_train: int, n_test: int, *, gz: bool, raw: bool) -> Synthetic:
    """The four MNIST-format IDX files (big-endian header, uint8 data) in folder."""
    rng = np.random.default_rng(0)
    out = Synthetic({})
    folder.mkdir(parents=True, exist_ok=True)
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = _random_split(rng, n, (28, 28), 10)
        out.splits[split] = images[:, None], labels
        image_header = struct.pack(">IIII", 0x803, n, 28, 28)  # ubyte, 3 dimensions
        label_header = struct.pack(">II", 0x801, n)  # ubyte, 1 dimension
        blobs = {
            f"{prefix}-images-idx3-ubyte": image_header + images.tobytes(),
            f"{prefix}-labels-idx1-ubyte": label_header + labels.astype(np.uint8).tobytes(),
        }
        for name, blob in blobs.items():
            out.md5[name] = hashlib.md5(blob).hexdigest()
            if raw:
                (folder / name).write_bytes(blob)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
                out.md5[f"{name}.gz"] = md5_of(folder / f"{name}.gz")
    return out


def make_mnist(
    root: Path,
    kind: str = "mnist",
    n_train: int = 30,
    n_test: int = 10,
    *,
    gz: bool = False,
) -> Synthetic:
    """MNIST or Fashion-MNIST IDX files in torchvision's root/<Class>/raw/ folder.

    gz=False writes the decompressed files torchvision reads; gz=True only the .gz ones
    it downloads (and extracts itself).
    """
    folder = root / ("MNIST" if kind == "mnist" else "FashionMNIST") / "raw"
    return write_idx(folder, n_train, n_test, gz=gz, raw=not gz)


def make_imagenet_folder(
    root: Path, classes: int = 3, per_class: int = 4, size: int = 64, seed: int = 0
) -> list[str]:
    """root/{train,val}/<class>/<i>.JPEG of random colours; returns the class names."""
    rng = np.random.default_rng(seed)
    names = [f"n{i:08d}" for i in range(classes)]
    for split in ("train", "val"):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.JPEG")
    return names


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def assert_split(split, images: np.ndarray, labels: np.ndarray) -> None:
    """A data.Split holds exactly these images and labels, as uint8 and int64."""
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert torch.equal(split.images, as_tensor(images))
    assert torch.equal(split.labels, as_tensor(labels))


def register_md5(monkeypatch: pytest.MonkeyPatch, cls: type, md5: dict[str, str]) -> None:
    """Make torchvision class `cls` expect these MD5s for the files named in md5."""
    if issubclass(cls, datasets.CIFAR10):
        for attr in ("train_list", "test_list"):
            files = [[f, md5.get(f, m)] for f, m in getattr(cls, attr)]
            monkeypatch.setattr(cls, attr, files)
        meta = cls.meta["filename"]
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5.get(meta, cls.meta["md5"])})
        monkeypatch.setattr(cls, "tgz_md5", md5.get(cls.filename, cls.tgz_md5))
    elif issubclass(cls, datasets.SVHN):
        splits = {k: [url, f, md5.get(f, m)] for k, (url, f, m) in cls.split_list.items()}
        monkeypatch.setattr(cls, "split_list", splits)
    else:
        monkeypatch.setattr(cls, "resources", [(f, md5.get(f, m)) for f, m in cls.resources])
