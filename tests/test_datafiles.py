"""datafiles.py on real files in torchvision's formats (written by tests/synthetic.py) and
a real local HTTP server: downloads, archives in place, and every refusal one line."""

import pytest
from torchvision import datasets

import synthetic
from training import data, datafiles

assert_split = synthetic.assert_split


def test_mnist_gz_files_are_verified_and_extracted_offline(
    tmp_path, register_md5, closed_url, monkeypatch
):
    syn = synthetic.make_mnist(tmp_path, "mnist", gz=True)
    register_md5(datasets.MNIST, syn.md5)
    monkeypatch.setattr(datasets.MNIST, "mirrors", [closed_url])  # would fail if used
    splits = data.load("mnist", tmp_path)
    assert (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert_split(splits["test"], *syn.splits["test"])


def test_fashion_mnist_from_the_system_folder(tmp_path, closed_url, monkeypatch):
    system = tmp_path / "system"
    syn = synthetic.write_idx(system, 15, 6, gz=True, raw=False)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(system))
    # The synthetic files cannot carry the official MD5s of the decompressed files.
    raw_md5 = {name: syn.md5[name] for name in datafiles.FASHION_MNIST_RAW_MD5}
    monkeypatch.setattr(datafiles, "FASHION_MNIST_RAW_MD5", raw_md5)
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [closed_url])
    splits = data.load("fashion-mnist", tmp_path / "root")
    for key in ("train", "test"):
        assert_split(splits[key], *syn.splits[key])
    raw = sorted(p.name for p in (tmp_path / "root" / "FashionMNIST" / "raw").iterdir())
    assert raw == sorted(raw_md5)  # no .part left behind


def test_fashion_mnist_system_file_with_wrong_md5_is_refused(tmp_path, monkeypatch):
    system = tmp_path / "system"
    synthetic.write_idx(system, 3, 2, gz=True, raw=False)  # official MD5s kept: mismatch
    monkeypatch.setenv("FASHION_MNIST_DIR", str(system))
    with pytest.raises(data.DataError, match="not the official file"):
        data.load("fashion-mnist", tmp_path / "root")
    assert not (tmp_path / "root").exists()  # no file, and no folder made for nothing


def point_downloads_at(monkeypatch, name: str, base_url: str) -> None:
    """Make torchvision download `name` from base_url instead of the official hosts."""
    if name == "cifar10":
        cls = datasets.CIFAR10
        monkeypatch.setattr(cls, "url", base_url + cls.filename)
    elif name == "svhn":
        splits = {k: [base_url + f, f, m] for k, (_, f, m) in datasets.SVHN.split_list.items()}
        monkeypatch.setattr(datasets.SVHN, "split_list", splits)
    else:
        monkeypatch.setattr(datasets.MNIST, "mirrors", [base_url])


MNIST_GZ = "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"  # fmt: skip


@pytest.mark.parametrize(
    ("name", "expected", "get"),
    [
        ("cifar10", "cifar-10-batches-py/data_batch_1", "Download cifar-10-python.tar.gz from"),
        (
            "svhn",
            "train_32x32.mat",
            "Download train_32x32.mat, test_32x32.mat, extra_32x32.mat from",
        ),
        ("mnist", "MNIST/raw/train-images-idx3-ubyte", f"Download {MNIST_GZ} from"),
    ],
)
def test_missing_data_without_network(tmp_path, closed_url, monkeypatch, name, expected, get):
    point_downloads_at(monkeypatch, name, closed_url)
    root = tmp_path / "new" / "data"
    with pytest.raises(data.DataError) as error:
        data.load(name, root)
    message = str(error.value)
    assert "\n" not in message
    assert f"not found in {root}" in message and expected in message
    assert "download failed" in message and data.DATASETS[name].url in message
    assert get in message
    assert not (tmp_path / "new").exists()  # the folders it made for nothing are gone


@pytest.mark.parametrize(
    ("name", "archive", "folder", "unpack"),
    [
        ("cifar10", "cifar-10-python.tar.gz", ".", "(no need to extract it)"),
        ("cifar100", "cifar-100-python.tar.gz", ".", "(no need to extract it)"),
        ("mnist", MNIST_GZ, "MNIST/raw", "(no need to extract them)"),
        ("fashion-mnist", MNIST_GZ, "FashionMNIST/raw", "(no need to extract them)"),
    ],
)
def test_offline_message_names_the_archive_and_where_it_goes(
    tmp_path, monkeypatch, name, archive, folder, unpack
):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(data.DataError, match="downloading is off") as error:
        data.load(name, root, download=False)
    it = "it" if name.startswith("cifar") else "them"
    where = root if folder == "." else root / folder
    assert (
        f"Download {archive} from {data.DATASETS[name].url} and put {it} in {where} {unpack}"
        in str(error.value)
    )
    assert sorted(root.iterdir()) == [root / "notes.txt"]  # an existing folder as it was


def test_archive_in_place_needs_no_extraction_even_with_downloads_off(tmp_path, register_md5):
    """What the offline message promises: the archive alone, where it says, is enough."""
    (tmp_path / "data").mkdir()
    syn = serve_cifar(tmp_path, tmp_path / "data")
    register_md5(datasets.CIFAR10, syn.md5)
    splits = data.load("cifar10", tmp_path / "data", download=False)
    assert_split(splits["train"], *syn.splits["train"])


def test_offline_with_a_corrupt_archive_says_delete_it(
    tmp_path, register_md5, closed_url, monkeypatch
):
    (tmp_path / "data").mkdir()
    syn = serve_cifar(tmp_path, tmp_path / "data")
    register_md5(datasets.CIFAR10, syn.md5)
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-10])  # a cut-off download
    point_downloads_at(monkeypatch, "cifar10", closed_url)
    with pytest.raises(data.DataError) as error:
        data.load("cifar10", tmp_path / "data")
    expected = f"cifar-10-python.tar.gz in {tmp_path / 'data'} fails its MD5 check: delete it"
    assert expected in str(error.value) and archive.exists()


@pytest.mark.parametrize("inside", [False, True])
def test_data_folder_that_is_a_file(tmp_path, inside):
    file = tmp_path / "data"
    file.write_text("not a folder")
    root = file / "cifar" if inside else file
    expected = f"{file} is a file, not a folder"
    with pytest.raises(data.DataError, match=expected) as error:
        data.load("cifar10", root)
    assert "\n" not in str(error.value) and file.read_text() == "not a folder"
    with pytest.raises(data.DataError, match=expected):
        data.imagenet(root, 4, workers=0, seed=0)
    with pytest.raises(data.DataError, match=expected):  # for the trainer, before any work
        data.check_folder(root)
    data.check_folder(tmp_path / "new" / "data")  # a folder that can be made is fine
    assert not (tmp_path / "new").exists()


def serve_cifar(tmp_path, served) -> synthetic.Synthetic:
    """Write synthetic CIFAR-10 and serve it as the official-style .tar.gz archive."""
    syn = synthetic.make_cifar(tmp_path / "staging", n_train=15, n_test=5)
    archive = served / datasets.CIFAR10.filename
    syn.md5[archive.name] = synthetic.tar_gz(tmp_path / "staging" / "cifar-10-batches-py", archive)
    return syn


def test_download_from_a_server_checks_md5_and_extracts(
    tmp_path, register_md5, http_server, monkeypatch
):
    base_url, served = http_server
    syn = serve_cifar(tmp_path, served)
    register_md5(datasets.CIFAR10, syn.md5)
    point_downloads_at(monkeypatch, "cifar10", base_url)
    splits = data.load("cifar10", tmp_path / "data")
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").is_file()
    for key in ("train", "test"):
        assert_split(splits[key], *syn.splits[key])


def test_downloaded_archive_with_wrong_md5_is_refused(
    tmp_path, register_md5, http_server, monkeypatch
):
    base_url, served = http_server
    syn = serve_cifar(tmp_path, served)
    register_md5(datasets.CIFAR10, {**syn.md5, datasets.CIFAR10.filename: "0" * 32})
    point_downloads_at(monkeypatch, "cifar10", base_url)
    with pytest.raises(data.DataError, match="downloaded file failed its MD5 check"):
        data.load("cifar10", tmp_path / "data")
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()  # never extracted


def test_corrupted_file_is_named(tmp_path, register_md5):
    syn = synthetic.make_cifar(tmp_path)
    register_md5(datasets.CIFAR10, syn.md5)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:-1] + b"x")
    with pytest.raises(data.DataError, match="corrupted.*data_batch_2 fails its MD5"):
        data.load("cifar10", tmp_path, download=False)
