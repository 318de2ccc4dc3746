"""data.py on real files in torchvision's formats (written by tests/synthetic.py), a real
local HTTP server, and batches checked against slow per-sample reference code."""

import inspect
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

import synthetic
from training import data

as_tensor, assert_split = synthetic.as_tensor, synthetic.assert_split


# Loading ---------------------------------------------------------------------------


@pytest.mark.parametrize("download", [False, True])  # present files: no network needed
@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loads_what_was_written(tmp_path, register_md5, name, classes, download):
    syn = synthetic.make_cifar(tmp_path, n_train=23, n_test=9, num_classes=classes)
    register_md5(datasets.CIFAR10 if classes == 10 else datasets.CIFAR100, syn.md5)
    splits = data.load(name, tmp_path, download=download)
    assert set(splits) == {"train", "test"}
    assert splits["train"].images.shape == (23, 3, 32, 32)
    for key in ("train", "test"):
        assert_split(splits[key], *syn.splits[key])


def test_train_subset_keeps_the_first_images(tmp_path, register_md5):
    syn = synthetic.make_cifar(tmp_path, n_train=20)
    register_md5(datasets.CIFAR10, syn.md5)
    splits = data.load("cifar10", tmp_path, download=False, train_subset=7)
    images, labels = syn.splits["train"]
    assert_split(splits["train"], images[:7], labels[:7])
    assert len(splits["test"].labels) == 20  # the test set is untouched


def test_svhn_validation_split(tmp_path, register_md5):
    assert data.SVHN_VAL_PER_CLASS == (400, 200)  # 10 × (400 + 200) = the paper's 6,000
    per_class = {"train": 6, "extra": 4, "test": 2}
    syn = synthetic.make_svhn(tmp_path, per_class)
    register_md5(datasets.SVHN, syn.md5)
    splits = data.load("svhn", tmp_path, download=False, svhn_val_per_class=(3, 2))
    assert set(splits) == {"train", "val", "test"}
    # Expected, the slow way: first 3 (train) / 2 (extra) of each digit in file order.
    val_rows, train_rows = [], []
    for source, take in (("train", 3), ("extra", 2)):
        images, labels = syn.splits[source]
        seen = dict.fromkeys(range(10), 0)
        for image, label in zip(images, labels, strict=True):
            (val_rows if seen[label] < take else train_rows).append((image, label))
            seen[label] += 1
    for key, rows in (("val", val_rows), ("train", train_rows)):
        assert_split(splits[key], np.stack([r[0] for r in rows]), np.array([r[1] for r in rows]))
    assert torch.equal(splits["val"].labels.bincount(), torch.full((10,), 5))
    assert len(splits["train"].labels) == 10 * (6 + 4) - 50
    train_bytes = {bytes(image.numpy()) for image in splits["train"].images}
    assert not train_bytes & {bytes(image.numpy()) for image in splits["val"].images}
    assert_split(splits["test"], *syn.splits["test"])


def test_svhn_too_small_for_the_validation_split(tmp_path, register_md5):
    syn = synthetic.make_svhn(tmp_path, {"train": 2, "extra": 4, "test": 1})
    register_md5(datasets.SVHN, syn.md5)
    with pytest.raises(data.DataError, match="SVHN train has 2 images of class 0"):
        data.load("svhn", tmp_path, download=False, svhn_val_per_class=(3, 2))


# Validation split held out of the training images ------------------------------------

# 43 training images with these class counts; 23 held out as equally as they allow: class
# 0 gives its 1, class 1 its 2, the other 8 share 20 (2 each, the 4 left over go to the
# lowest-numbered of them).
VAL_COUNTS = [1, 2, 5, 5, 5, 5, 5, 5, 5, 5]
VAL_QUOTA = [1, 2, 3, 3, 3, 3, 2, 2, 2, 2]


def val_cifar(tmp_path, register_md5) -> synthetic.Synthetic:
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), VAL_COUNTS))
    syn = synthetic.make_cifar(tmp_path, n_test=7, train_labels=labels)
    register_md5(datasets.CIFAR10, syn.md5)
    return syn


def rows(split: data.Split) -> list[bytes]:
    """Each image with its label as bytes: random images make each one unique."""
    return [bytes(x.numpy()) + bytes([y]) for x, y in zip(split.images, split.labels, strict=True)]


def test_val_split_is_class_balanced_disjoint_and_complete(tmp_path, register_md5):
    syn = val_cifar(tmp_path, register_md5)
    splits = data.load("cifar10", tmp_path, download=False, val_split=23, seed=5)
    assert list(splits) == ["train", "val", "test"]
    assert splits["val"].labels.bincount(minlength=10).tolist() == VAL_QUOTA
    full = data.Split(*map(as_tensor, syn.splits["train"]))
    train, val = rows(splits["train"]), rows(splits["val"])
    assert len(train) == 20 and len(val) == 23 and not set(train) & set(val)
    assert sorted(train + val) == sorted(rows(full))
    # Both keep file order: each is a subsequence of the training file.
    position = {row: i for i, row in enumerate(rows(full))}
    for part in (train, val):
        assert [position[r] for r in part] == sorted(position[r] for r in part)
    assert_split(splits["test"], *syn.splits["test"])


def test_val_split_depends_on_the_seed_only(tmp_path, register_md5):
    val_cifar(tmp_path, register_md5)

    def held_out(seed: int, **kw: object) -> list[bytes]:
        return rows(
            data.load("cifar10", tmp_path, download=False, val_split=23, seed=seed, **kw)["val"]
        )

    assert held_out(5) == held_out(5)  # every rank, world size and resume: one seed
    assert held_out(5) != held_out(6)
    assert held_out(5) == held_out(5, train_subset=3)  # whatever train_subset keeps


def test_val_split_is_taken_before_train_subset(tmp_path, register_md5):
    val_cifar(tmp_path, register_md5)
    whole = data.load("cifar10", tmp_path, download=False, val_split=23, seed=1)
    subset = data.load("cifar10", tmp_path, download=False, val_split=23, seed=1, train_subset=8)
    assert rows(subset["val"]) == rows(whole["val"])
    assert rows(subset["train"]) == rows(whole["train"])[:8]


@pytest.mark.parametrize(
    ("name", "count", "message"),
    [
        ("svhn", 100, "validation split of 100 images: SVHN keeps its own 6,000-image split"),
        ("cifar10", 43, "validation split of 43 images leaves none of CIFAR-10's 43 training"),
        ("cifar10", 50, "validation split of 50 images leaves none of CIFAR-10's 43 training"),
        ("cifar10", -1, "validation split of -1 images: it is negative"),
    ],
)
def test_val_split_refusals(tmp_path, register_md5, name, count, message):
    val_cifar(tmp_path, register_md5)
    with pytest.raises(data.DataError) as error:
        data.load(name, tmp_path, download=False, val_split=count)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist"])
def test_mnist_from_decompressed_files(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    syn = synthetic.make_mnist(tmp_path, kind, n_train=12, n_test=5)
    splits = data.load(kind, tmp_path, download=False)
    assert splits["train"].images.shape == (12, 1, 28, 28)
    for key in ("train", "test"):
        assert_split(splits[key], *syn.splits[key])


def test_channel_stats():
    images = torch.randint(0, 256, (9, 3, 5, 7), dtype=torch.uint8)
    mean, std = data.channel_stats(images)
    pixels = images.numpy().transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    # both float64, summed in their own orders: 2^-53 per term; the std's square root of a
    # difference of such sums loses a little more, hence 1e-10
    np.testing.assert_allclose(mean.numpy(), pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), pixels.std(axis=1), rtol=1e-10)
    assert mean.dtype == std.dtype == torch.float64 and mean.device.type == "cpu"


def test_normalisation_per_dataset(tmp_path, register_md5):
    syn = synthetic.make_cifar(tmp_path, n_train=30)
    register_md5(datasets.CIFAR10, syn.md5)
    train = data.load("cifar10", tmp_path, download=False)["train"]
    mean, std = data.normalisation(data.DATASETS["cifar10"], train)
    pixels = syn.splits["train"][0].transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    # float64 both, as in test_channel_stats
    np.testing.assert_allclose(mean.numpy(), pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), pixels.std(axis=1), rtol=1e-10)
    # The paper divides SVHN's pixels by 255 and nothing more; the others are standardised.
    assert data.normalisation(data.DATASETS["svhn"], train) == (None, None)
    assert [k for k, info in data.DATASETS.items() if not info.standardize] == ["svhn"]


# Batches ---------------------------------------------------------------------------

N, SIZE = 37, 8


def toy_split() -> data.Split:
    """Random images whose label is their index, so outputs can be traced back."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    return data.Split(images, torch.arange(N))


def epoch_list(batches: data.Batches, start: int = 0) -> list:
    return list(batches.epoch(start))


def same(batches: list, others: list) -> bool:
    """Whether two lists of (images, labels) batches are identical."""
    return len(batches) == len(others) and all(
        torch.equal(x, ox) and torch.equal(y, oy)
        for (x, y), (ox, oy) in zip(batches, others, strict=True)
    )


def test_train_epoch_is_a_permutation():
    batches = data.Batches(toy_split(), 8, train=True)
    assert len(batches) == N // 8
    out = epoch_list(batches)
    assert len(out) == 4 and all(x.shape == (8, 3, SIZE, SIZE) for x, _ in out)
    labels = torch.cat([y for _, y in out])
    assert len(labels.unique()) == 32 and labels.max() < N
    split = toy_split()
    for x, y in out:  # no augmentation: the images themselves, in [0, 1]
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        # fp32 byte / 255 (or * (1 / 255)): within an ulp, far inside fp32's default bounds
        torch.testing.assert_close(x, split.images[y].float() / 255)


def test_train_epochs_are_seeded_and_resumable():
    def make() -> data.Batches:
        return data.Batches(toy_split(), 8, train=True, augment=True, crop_pad=2, flip=True, seed=3)

    a, b = make(), make()
    first = epoch_list(a)
    assert same(first, epoch_list(b))
    state = a.generator.get_state()
    second = epoch_list(a)
    assert not torch.equal(first[0][1], second[0][1])  # a new permutation each epoch
    a.generator.set_state(state)
    assert same(second[2:], epoch_list(a, start=2))


def test_ranks_split_the_global_batch():
    kw = {"train": True, "augment": True, "crop_pad": 2, "flip": True, "seed": 5}
    whole = epoch_list(data.Batches(toy_split(), 8, **kw))
    ranks = [epoch_list(data.Batches(toy_split(), 8, rank=r, world_size=2, **kw)) for r in (0, 1)]
    assert all(x.shape[0] == 4 for x, _ in ranks[0] + ranks[1])
    joined = [
        (torch.cat([x0, x1]), torch.cat([y0, y1]))
        for (x0, y0), (x1, y1) in zip(*ranks, strict=True)
    ]
    assert same(whole, joined)
    with pytest.raises(ValueError, match="does not split"):
        data.Batches(toy_split(), 9, train=True, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_eval_covers_every_image_once_with_constant_shape(world_size):
    split = toy_split()
    seen = []
    for rank in range(world_size):
        batches = data.Batches(split, 8, train=False, rank=rank, world_size=world_size)
        assert len(batches) == 5  # ceil(37 / 8)
        for x, y in batches.epoch():
            assert x.shape == (8 // world_size, 3, SIZE, SIZE)
            real = y != data.IGNORE_LABEL
            # fp32 byte / 255, within an ulp (as in test_train_epoch_is_a_permutation)
            torch.testing.assert_close(x[real], split.images[y[real]].float() / 255)
            assert not x[~real].any()
            seen += y[real].tolist()
    assert sorted(seen) == list(range(N))


def find_crops(out: torch.Tensor, image: torch.Tensor, pad: int, mode: str) -> set:
    """Every (dy, dx, flipped) whose crop of the padded image equals `out` (slow, simple);
    numpy.pad names the same three modes and is the independent reference."""
    widths = ((0, 0), (pad, pad), (pad, pad))
    padded = torch.from_numpy(np.pad(image.float().numpy(), widths, mode=mode))
    found = set()
    for dy, dx, flipped in itertools.product(range(2 * pad + 1), range(2 * pad + 1), (0, 1)):
        crop = padded[:, dy : dy + SIZE, dx : dx + SIZE]
        if torch.equal(torch.flip(crop, [2]) if flipped else crop, out):
            found.add((dy, dx, flipped))
    return found


@pytest.mark.parametrize("mode", ["constant", "reflect", "symmetric"])
@pytest.mark.parametrize("flip", [False, True])
def test_augmentation_gives_real_crops(mode, flip):
    split = toy_split()
    batches = data.Batches(split, 8, train=True, augment=True, crop_pad=3, flip=flip, pad_mode=mode)
    matches = []
    for x, y in batches.epoch():
        for out, label in zip(x, y, strict=True):
            pixels = (out * 255).round()
            found = find_crops(pixels, split.images[label], 3, mode)
            assert len(found) == 1  # random pixels: exactly one window matches
            matches += found
    flips = {m[2] for m in matches}
    assert flips == ({0, 1} if flip else {0})
    assert len({m[:2] for m in matches}) > 10  # rows and columns shift independently


def test_diracnet_imagenet_recipe_has_no_colour_augmentation():
    train, _ = data.imagenet_transforms(colour=False)
    kinds = [type(t) for t in train.transforms]
    assert T.ColorJitter not in kinds and data.Lighting not in kinds
    assert T.RandomResizedCrop in kinds and T.RandomHorizontalFlip in kinds
    train, _ = data.imagenet_transforms()
    assert {T.ColorJitter, data.Lighting} <= {type(t) for t in train.transforms}


def test_constant_padding_is_the_mean_colour():
    # fb.resnet.torch normalises before padding, so padded pixels are the mean (0 after
    # normalisation), not black. White images: 2.0 inside, 0.0 in the padding, never -2.
    white = data.Split(torch.full((16, 3, SIZE, SIZE), 255, dtype=torch.uint8), torch.arange(16))
    batches = data.Batches(
        white, 16, train=True, augment=True, crop_pad=4, mean=[0.5] * 3, std=[0.25] * 3
    )
    x, _ = next(batches.epoch())
    # (1 - 0.5) / 0.25 in fp32 is 2 to an ulp; isclose's default 1e-5 is far from 0
    inside, padding = torch.isclose(x, torch.tensor(2.0)), x == 0
    assert (inside | padding).all() and inside.any() and padding.any()


def test_eval_padding_label_is_what_cross_entropy_ignores():
    assert (
        inspect.signature(F.cross_entropy).parameters["ignore_index"].default == data.IGNORE_LABEL
    )
    padding = [y for _, y in data.Batches(toy_split(), 8, train=False).epoch()][-1]
    assert padding.tolist() == [32, 33, 34, 35, 36] + [data.IGNORE_LABEL] * 3


def test_batches_and_loader_are_batch_sources(imagenet_root):
    _, train, val = data.imagenet(imagenet_root, 4, workers=0, seed=0)
    sources = [data.Batches(toy_split(), 8, train=t) for t in (True, False)] + [train, val]
    for source in sources:
        assert isinstance(source, data.BatchSource)
        assert isinstance(source.generator, torch.Generator)
        assert len(list(source.epoch(start=1))) == len(source) - 1
    assert not isinstance(toy_split(), data.BatchSource)


def test_normalisation_and_channels_last():
    split = toy_split()
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    batches = data.Batches(split, 8, train=False, mean=mean, std=std, channels_last=True)
    x, _ = next(iter(batches.epoch()))
    assert x.is_contiguous(memory_format=torch.channels_last)
    mean_t, std_t = (
        torch.tensor(mean).view(1, 3, 1, 1),
        torch.tensor(std).view(1, 3, 1, 1),
    )
    expected = (split.images[:8].double() / 255 - mean_t) / std_t
    # fp32 (x / 255 - mean) / std: three roundings (2^-24 each) of values below 4, and fp32
    # mean and std: under 2^-20 in all, inside 1e-5 on any host
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    plain = data.Batches(split, 8, train=True)
    assert next(iter(plain.epoch()))[0].is_contiguous()


# ImageNet --------------------------------------------------------------------------


@pytest.fixture
def imagenet_root(tmp_path):
    synthetic.make_imagenet_folder(tmp_path, classes=3, per_class=4, size=64)
    return tmp_path


def test_imagenet_train_and_val(imagenet_root):
    info, train, val = data.imagenet(imagenet_root, 4, workers=0, seed=0)
    assert (info.name, info.num_classes, info.image_size) == ("imagenet", 3, 224)
    assert len(train) == 3 and len(val) == 3
    labels = []
    for x, y in train.epoch():
        assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
        labels += y.tolist()
    assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
    val_batches = list(val.epoch())
    assert torch.cat([y for _, y in val_batches]).tolist() == sorted(labels)
    # The first val image: a bicubic Resize(256) of a 64×64 image is 256×256, then the
    # centre 224 (bilinear differs by up to 0.66 here).
    pil = Image.open(imagenet_root / "val" / "n00000000" / "0.JPEG").convert("RGB")
    pixels = np.asarray(pil.resize((256, 256), Image.BICUBIC))[16:240, 16:240] / 255.0
    expected = (pixels - data.IMAGENET_MEAN) / data.IMAGENET_STD
    # the same PIL resize on both sides; then fp32 against float64 normalisation of values
    # below 3: a few roundings of 2^-24 each, inside 1e-5
    torch.testing.assert_close(
        val_batches[0][0][0],
        torch.tensor(expected.transpose(2, 0, 1)).float(),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("ten_crop", [False, True])
def test_imagenet_resizing_is_bicubic_as_in_fb_resnet_torch(ten_crop):
    train, val = data.imagenet_transforms(ten_crop)
    resizes = [
        t
        for t in (*train.transforms, *val.transforms)
        if isinstance(t, (T.Resize, T.RandomResizedCrop))
    ]
    assert [type(t) for t in resizes] == [T.RandomResizedCrop, T.Resize]
    assert all(t.interpolation == T.InterpolationMode.BICUBIC for t in resizes)
    assert (resizes[0].size, resizes[1].size) == ((224, 224), 256)


def test_imagenet_seeding_is_worker_independent_and_resumable(imagenet_root):
    _, in_process, _ = data.imagenet(imagenet_root, 4, workers=0, seed=7)
    _, with_worker, _ = data.imagenet(imagenet_root, 4, workers=1, seed=7)
    first = epoch_list(in_process)
    state = in_process.generator.get_state()
    second = epoch_list(in_process)
    assert not torch.equal(first[0][0], second[0][0])  # a new epoch draws anew
    # The same stream from a (persistent) worker process, over two epochs.
    assert same(first, epoch_list(with_worker)) and same(second, epoch_list(with_worker))
    in_process.generator.set_state(state)
    assert same(second[1:], epoch_list(in_process, start=1))


def test_lighting_adds_the_pca_colour_offset():
    image = torch.rand(3, 4, 5)
    torch.manual_seed(0)
    out = data.Lighting(0.1)(image)
    torch.manual_seed(0)
    alpha = (torch.randn(3) * 0.1).tolist()
    # fb.resnet.torch's ImageNet PCA: eigenvalues and eigenvectors (columns).
    eigval = [0.2175, 0.0188, 0.0045]
    eigvec = [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ]
    for c in range(3):
        offset = sum(eigvec[c][j] * alpha[j] * eigval[j] for j in range(3))
        # fp32 image + offset - image, for pixels in [0, 1]: an ulp of 1 (2^-24) at most
        # from the float64 offset, far inside fp32's default atol 1e-5
        torch.testing.assert_close(out[c] - image[c], torch.full((4, 5), offset))


def test_imagenet_ten_crop_and_sharded_val(imagenet_root):
    seen = []
    for rank in (0, 1):
        _, _, val = data.imagenet(
            imagenet_root, 8, workers=0, seed=0, ten_crop=True, rank=rank, world_size=2
        )
        for x, y in val.epoch():
            assert x.shape == (4, 10, 3, 224, 224)
            assert not x[y == data.IGNORE_LABEL].any()
            seen += y[y != data.IGNORE_LABEL].tolist()
    assert sorted(seen) == [0] * 4 + [1] * 4 + [2] * 4


def test_imagenet_missing_folder(tmp_path):
    (tmp_path / "train" / "n0").mkdir(parents=True)
    with pytest.raises(data.DataError, match="expected .*/train/<class>/.*/val/<class>"):
        data.imagenet(tmp_path, 4, workers=0, seed=0)
