"""fastlangevin.data: the toy generators against DOT's recipe, the digits split, and the MNIST / CIFAR-10 loaders
on tiny files written here in the real formats — with every error a user can meet."""

import datetime
import gzip
import pickle
import struct

import numpy as np
import pytest
import sklearn.datasets
import torch
from torch.utils.data import DataLoader

from fastlangevin.data import DATASETS, DataFormatError, make_dataset, read_cifar_batch, read_idx, swiss_roll, \
    twenty_five_gaussians, twenty_five_gaussians_modes
from fastlangevin.metrics import mode_coverage


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


# ---------------------------------------------------------------------------------------------------- digits
def test_digits_split():
    train, test = make_dataset("digits", split="train"), make_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert train.n_levels == 17 and train.sample_shape == (1, 8, 8)
    all_x = train.tensors()[0]
    assert all_x.min() == 0 and all_x.max() == 1 and torch.equal(all_x * 16, torch.round(all_x * 16))
    # disjoint, stratified, and fixed by the seed
    train_rows = {tuple(r) for r in train.data.flatten(1).tolist()}
    test_rows = [tuple(r) for r in test.data.flatten(1).tolist()]
    assert sum(r in train_rows for r in test_rows) <= 5  # the digits set itself holds a few duplicate images
    assert torch.bincount(test.targets, minlength=10).min() >= 35
    assert torch.equal(train.data, make_dataset("digits", split="train", seed=0).data)
    assert not torch.equal(train.data, make_dataset("digits", split="train", seed=1).data)


def test_digits_classes():
    data = make_dataset("digits", classes=[3, 7])
    assert set(data.targets.tolist()) == {3, 7}
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
    images, labels = write_mnist(tmp_path, split, n=6, compress=compress)
    data = make_dataset("mnist", tmp_path, split)
    assert len(data) == 6 and data.sample_shape == (1, 28, 28) and data.n_levels == 256
    x, y = data.tensors()
    torch.testing.assert_close(x, torch.from_numpy(images).float().unsqueeze(1) / 255)
    assert torch.equal(y, torch.from_numpy(labels).long())
    batch_x, batch_y = next(iter(DataLoader(data, batch_size=4)))
    assert batch_x.shape == (4, 1, 28, 28) and batch_x.dtype == torch.float32 and batch_y.shape == (4,)


def test_idx_dataset_subfolders(tmp_path):
    """torchvision's layout is found, and a data set's own folder wins over files of the same name beside it."""
    mnist, _ = write_mnist(tmp_path / "MNIST" / "raw", seed=1)
    fashion, _ = write_mnist(tmp_path / "fashion-mnist", seed=2)
    write_mnist(tmp_path, seed=3)
    assert torch.equal(make_dataset("mnist", tmp_path).data.squeeze(1), torch.from_numpy(mnist))
    assert torch.equal(make_dataset("fashion-mnist", tmp_path).data.squeeze(1), torch.from_numpy(fashion))


def test_mnist_classes_and_n_samples(tmp_path):
    _, labels = write_mnist(tmp_path, n=40)
    data = make_dataset("mnist", tmp_path, classes=[0, 1, 2])
    assert len(data) == np.isin(labels, [0, 1, 2]).sum() and set(data.targets.tolist()) <= {0, 1, 2}
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
    train, test = make_dataset("cifar10", tmp_path, "train"), make_dataset("cifar10", tmp_path, "test")
    assert len(train) == 10 and len(test) == 3 and train.sample_shape == (3, 32, 32)
    x, y = train.tensors()
    expected = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    torch.testing.assert_close(x, torch.from_numpy(expected).float() / 255)
    assert y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
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


# ---------------------------------------------------------------------------------------------------- factory
def test_make_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        make_dataset("svhn")
    with pytest.raises(ValueError, match="split must be one of"):
        make_dataset("digits", split="valid")
    with pytest.raises(ValueError, match="classes applies to image data sets"):
        make_dataset("25gaussians", classes=[1])
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        make_dataset("swissroll", n_samples=0)
    assert set(DATASETS) == {"25gaussians", "swissroll", "digits", "mnist", "fashion-mnist", "cifar10"}
