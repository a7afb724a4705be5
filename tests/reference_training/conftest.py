"""Shared fixtures: a tiny MNIST in the real idx format and the argument set of a tiny run."""

import gzip
import struct

import numpy as np
import pytest

from tests.conftest import import_backend


@pytest.fixture(autouse=True)
def _reference_extra():
    """reference_training needs its extra (``pip install .[reference]``): without it these tests
    skip, or fail where the backends are required (``tests/_backends.py``)."""
    for name in ("torch", "matplotlib", "tqdm", "mlxtend", "scipy"):
        import_backend(name)


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory):
    """96 train / 32 test 28×28 images: class k is a bright horizontal bar at row 2k plus noise."""
    d = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)

    def make(n):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 * c + 3: 2 * c + 6, 4:24] = 230
        return x.astype(np.uint8), y.astype(np.uint8)

    xtr, ytr = make(96)
    xte, yte = make(32)
    write_idx(d / "train-images-idx3-ubyte.gz", xtr)
    write_idx(d / "train-labels-idx1-ubyte.gz", ytr)
    write_idx(d / "t10k-images-idx3-ubyte", xte)
    write_idx(d / "t10k-labels-idx1-ubyte", yte)
    return d


def tiny_run_args(data_dir, out, *, epochs=3, extra=()):
    """CLI arguments of a tiny but complete run (ResNet-20 at width 4 on 96 images)."""
    return ["run", "--dataset", "mnist", "--data-dir", str(data_dir), "--model", "resnet20",
            "--width", "4", "--epochs", str(epochs), "--batch-size", "8", "--measure-every", "3",
            "--lr", "0.05", "--seed", "3", "--threads", "1", "--out", str(out), *extra]


@pytest.fixture
def one_thread():
    """Run in-process training on one torch thread (the CPU is shared; restores the setting)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
