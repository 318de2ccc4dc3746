"""The small datasets' files on disk: fetched by torchvision, every failure one line.

torchvision.datasets downloads, verifies (MD5) and parses the files; this module gives it
a timeout, unpacks archives already in place, removes the empty folders a failed fetch
made, and turns every failure into a DataError that says which file to get and where.
"""

import gzip
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.client import HTTPException
from pathlib import Path
from tarfile import TarError

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.utils import check_integrity


class DataError(Exception):
    """A user-facing problem with the data: one line, printed without traceback."""


# Debian's dataset-fashion-mnist (the env var FASHION_MNIST_DIR overrides it). Debian
# recompressed the .gz files (new gzip headers), so torchvision's .gz MD5s cannot match:
# we check the decompressed files against the MD5s of the official uncompressed ones.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
DOWNLOAD_TIMEOUT_S = 60  # a stalled connection then fails instead of hanging forever

# OSError covers URLError and timeouts; torchvision raises RuntimeError for MD5 errors,
# missing files and failed mirrors; the others come from truncated or unreadable files.
_FETCH_ERRORS = (OSError, RuntimeError, ValueError, EOFError, HTTPException, TarError)


def check_folder(root: Path) -> None:
    """Refuse a data folder that is, or would have to be made inside, a file."""
    for path in (root, *root.parents):
        if path.exists():
            if path.is_dir():
                return
            inside = "" if path == root else f" cannot be made: {path}"
            raise DataError(f"the data folder {root}{inside} is a file, not a folder")


@contextmanager
def tidy(cls: type, root: Path) -> Iterator[None]:
    """If the body fails, remove the folders it made for `cls` in root that are still
    empty (root, its parents, the class's subfolders): rmdir only, never a file."""
    made = [root, *root.parents]
    if not issubclass(cls, datasets.SVHN):
        made += [root / _subfolder(cls), (root / _subfolder(cls)).parent]
    new = [path for path in made if not path.exists()]
    try:
        yield
    except BaseException:
        for path in sorted(new, key=lambda p: len(p.parts), reverse=True):
            with suppress(OSError):  # not empty, or already gone: keep it as it is
                path.rmdir()
        raise


@contextmanager
def _download_timeout() -> Iterator[None]:
    """torchvision's urllib calls have no timeout: new sockets get one meanwhile."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch(cls: type, title: str, url: str, root: Path, download: bool, **split) -> Dataset:
    """The torchvision dataset `cls` (downloaded if allowed); failures become a DataError.

    Verified archives already in place are unpacked even with download=False: torchvision
    downloads nothing when a file with the right MD5 is there.
    """
    try:
        with _download_timeout():
            return cls(root, download=download or _verified(archives(cls, root)), **split)
    except _FETCH_ERRORS as e:
        raise _fetch_error(cls, title, url, root, download, e) from e


def _verified(files: list[tuple[Path, str]]) -> bool:
    return all(path.is_file() and check_integrity(path, md5) for path, md5 in files)


def _fetch_error(
    cls: type, title: str, url: str, root: Path, download: bool, e: Exception
) -> DataError:
    """One line for a failed fetch: the corrupted file, or what is missing and what to get."""
    files = expected_files(cls, root)
    bad = [str(p) for p, m in files if p.is_file() and not check_integrity(p, m)]
    if bad:
        return DataError(
            f"{title} in {root} is corrupted ({', '.join(bad)} fails its MD5 "
            f"check): delete it and download {title} again from {url}"
        )
    missing = [p.relative_to(root).as_posix() for p, _ in files if not p.is_file()] or ["files"]
    more = f" and {len(missing) - 1} more files" if len(missing) > 1 else ""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = lines[-1][:200] if lines else type(e).__name__  # the most specific
    if reason.startswith("File not found or corrupted"):
        reason = "the downloaded file failed its MD5 check"
    why = f"the download failed ({reason})" if download else "downloading is off"
    return DataError(
        f"{title} not found in {root} (missing {missing[0]}{more}) and {why}. "
        + _what_to_get(cls, root, url)
    )


def _what_to_get(cls: type, root: Path, url: str) -> str:
    """Which files to download (or delete) and where they go, as a sentence."""
    files = archives(cls, root)
    corrupt = [p for p, m in files if p.is_file() and not check_integrity(p, m)]
    wanted = corrupt or [p for p, _ in files if not p.is_file()] or [p for p, _ in files]
    names, it = ", ".join(p.name for p in wanted), "it" if len(wanted) == 1 else "them"
    if corrupt:
        again = f"delete {it} and download {it} again from {url}"
        return f"{names} in {wanted[0].parent} fails its MD5 check: {again}"
    unpack = f" (no need to extract {it})" if wanted[0].suffix == ".gz" else ""
    return f"Download {names} from {url} and put {it} in {wanted[0].parent}{unpack}"


def _subfolder(cls: type) -> str:
    """Where in root a torchvision class keeps its extracted files (CIFAR, MNIST-like)."""
    return cls.base_folder if issubclass(cls, datasets.CIFAR10) else f"{cls.__name__}/raw"


def expected_files(cls: type, root: Path) -> list[tuple[Path, str | None]]:
    """The files a torchvision dataset class reads, with their MD5 where it has one."""
    if issubclass(cls, datasets.CIFAR10):
        meta = [cls.meta["filename"], cls.meta["md5"]]
        files = [*cls.train_list, *cls.test_list, meta]
        return [(root / cls.base_folder / file, md5) for file, md5 in files]
    if issubclass(cls, datasets.SVHN):
        return [(root / file, md5) for _, file, md5 in cls.split_list.values()]
    raw = root / _subfolder(cls)  # MNIST-like: decompressed files, no MD5 check
    return [(raw / file.removesuffix(".gz"), None) for file, _ in cls.resources]


def archives(cls: type, root: Path) -> list[tuple[Path, str]]:
    """The files a torchvision class downloads, where it looks for them, with their MD5."""
    if issubclass(cls, datasets.CIFAR10):
        return [(root / cls.filename, cls.tgz_md5)]
    if issubclass(cls, datasets.SVHN):
        return [(root / file, md5) for _, file, md5 in cls.split_list.values()]
    return [(root / _subfolder(cls) / file, md5) for file, md5 in cls.resources]


def arrays(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision dataset's arrays as uint8 N×C×H×W images and int64 labels."""
    if isinstance(ds, datasets.CIFAR10):  # N×H×W×C numpy, list of labels
        images, labels = torch.from_numpy(ds.data).permute(0, 3, 1, 2), ds.targets
    elif isinstance(ds, datasets.SVHN):  # N×C×H×W numpy, labels 0-9 ('10' became 0)
        images, labels = torch.from_numpy(ds.data), torch.from_numpy(ds.labels)
    else:  # MNIST-like: N×H×W tensor
        images, labels = ds.data.unsqueeze(1), ds.targets
    return images.contiguous(), torch.as_tensor(labels, dtype=torch.int64)


def install_system_fashion_mnist(root: Path) -> None:
    """Decompress a system copy of Fashion-MNIST into torchvision's raw folder."""
    raw = root / "FashionMNIST" / "raw"
    source = Path(os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    wanted = [name for name in FASHION_MNIST_RAW_MD5 if not (raw / name).is_file()]
    if not wanted or not all((source / f"{n}.gz").is_file() for n in wanted):
        return
    raw.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        gz, part = source / f"{name}.gz", raw / f"{name}.part"  # .part until verified
        try:
            with gzip.open(gz) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as e:
            part.unlink(missing_ok=True)
            raise DataError(f"cannot decompress {gz} ({e})") from e
        if not check_integrity(part, FASHION_MNIST_RAW_MD5[name]):
            part.unlink()
            raise DataError(f"{gz} is not the official file (MD5 mismatch)")
        part.replace(raw / name)
