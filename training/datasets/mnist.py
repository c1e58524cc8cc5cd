"""MNIST from the original idx `.gz` files, or from Keras' cache (`~/.keras/datasets/mnist.npz`)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.bundle import sha256_file
from training.datasets import DataNotFoundError, data_root

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
KERAS_CACHE = Path("~/.keras/datasets/mnist.npz").expanduser()


@dataclass
class Mnist:
    """The 60k/10k split as uint8 images (N, 28, 28) and int labels, with where they came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: dict[str, str] = field(default_factory=dict)  # file name → sha256, plus "path"


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzip'ed idx file (magic, dimensions, then raw uint8 data)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: {body.size} values for shape {dims}")
    return body.reshape(dims)


def _candidates(data_dir: str | Path | None) -> list[Path]:
    root = data_root(data_dir)
    return [root / "mnist", root]


def _validate(m: Mnist) -> Mnist:
    expected = {"x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28), "y_test": (10000,)}
    for name, shape in expected.items():
        array = getattr(m, name)
        if array.shape != shape:
            raise ValueError(f"MNIST {name} has shape {array.shape}, expected {shape} ({m.source.get('path')})")
    for name in ("y_train", "y_test"):
        labels = getattr(m, name)
        if labels.min() < 0 or labels.max() > 9:
            raise ValueError(f"MNIST {name} has labels outside 0-9 ({m.source.get('path')})")
    return m


def load_mnist(data_dir: str | Path | None = None) -> Mnist:
    """Load MNIST from `<data_dir>/mnist/` (or `<data_dir>` itself), else Keras' cache.

    Raises DataNotFoundError naming every place that was looked at.
    """
    looked = []
    for folder in _candidates(data_dir):
        paths = {key: folder / name for key, name in IDX_FILES.items()}
        looked.append(str(folder / "{train,t10k}-*-idx?-ubyte.gz"))
        if all(p.is_file() for p in paths.values()):
            arrays = {key: _read_idx(p) for key, p in paths.items()}
            source = {"path": str(folder), **{p.name: sha256_file(p) for p in paths.values()}}
            labels = {k: arrays[k].astype(np.int64) for k in ("y_train", "y_test")}
            return _validate(Mnist(arrays["x_train"], labels["y_train"], arrays["x_test"], labels["y_test"], source))
    looked.append(str(KERAS_CACHE))
    if KERAS_CACHE.is_file():
        with np.load(KERAS_CACHE) as npz:
            m = Mnist(npz["x_train"], npz["y_train"].astype(np.int64), npz["x_test"], npz["y_test"].astype(np.int64))
        m.source = {"path": str(KERAS_CACHE), KERAS_CACHE.name: sha256_file(KERAS_CACHE)}
        return _validate(m)
    raise DataNotFoundError(
        "MNIST not found. Looked in:\n  " + "\n  ".join(looked) + "\nPass --data-dir, set EDGE_DATA_DIR, "
        "or put the four idx .gz files (or Keras' mnist.npz) in one of those places."
    )
