"""The MNIST loader on the real idx files, and its errors when data is missing or broken."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from training.datasets import DataNotFoundError
from training.datasets import mnist as mnist_module
from training.datasets.mnist import load_mnist

# Published label counts (data README), so a wrong parse or a swapped file shows up.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_full_mnist_loads_with_published_shapes_and_label_counts(data_dir: Path) -> None:
    data = load_mnist(data_dir)
    assert data.x_train.shape == (60000, 28, 28) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (10000, 28, 28)
    assert np.bincount(data.y_train).tolist() == TRAIN_COUNTS
    assert np.bincount(data.y_test).tolist() == TEST_COUNTS
    assert len(data.source["train-images-idx3-ubyte.gz"]) == 64  # sha256 recorded for the manifest


def test_env_variable_selects_the_data_directory(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(data_dir / "mnist", tmp_path / "mnist")
    monkeypatch.setenv("EDGE_DATA_DIR", str(tmp_path))
    assert load_mnist().source["path"] == str(tmp_path / "mnist")


def test_missing_data_names_every_place_looked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mnist_module, "KERAS_CACHE", tmp_path / "no-keras" / "mnist.npz")
    with pytest.raises(DataNotFoundError) as err:
        load_mnist(tmp_path / "empty")
    message = str(err.value)
    assert str(tmp_path / "empty" / "mnist") in message
    assert str(tmp_path / "no-keras" / "mnist.npz") in message
    assert "--data-dir" in message and "EDGE_DATA_DIR" in message


def test_keras_cache_is_used_when_no_idx_files(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    real = load_mnist(data_dir)
    cache = tmp_path / "mnist.npz"
    np.savez(cache, x_train=real.x_train, y_train=real.y_train, x_test=real.x_test, y_test=real.y_test)
    monkeypatch.setattr(mnist_module, "KERAS_CACHE", cache)
    loaded = load_mnist(tmp_path / "nothing-here")
    assert loaded.source["path"] == str(cache)
    assert np.array_equal(loaded.y_test, real.y_test)


def test_truncated_idx_file_is_refused(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    shutil.copytree(data_dir / "mnist", folder)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "rb") as handle:
        labels = handle.read()
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(labels[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_mnist(tmp_path)
