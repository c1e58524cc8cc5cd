"""Accuracy regression: the shipped int8 digits model against the shipped float model, full MNIST test set.

Both run through the device runtime (LiteRT), exactly as on a Raspberry Pi.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converter.edgetpu import check_edgetpu
from device.bundle import Bundle
from device.preprocess import normalize
from device.runtime import Model
from training.datasets.mnist import load_mnist


@pytest.fixture(scope="module", params=["digits", "digits-seed"])
def predictions(request, models_dir: Path, data_dir: Path) -> dict:
    """Every shipped digits bundle: the edge CNN and the classic seed CNN."""
    bundle = Bundle.load(models_dir / request.param)
    mnist = load_mnist(data_dir)
    x = normalize(mnist.x_test, bundle.preprocessing)
    return {
        "bundle": bundle,
        "y": mnist.y_test,
        "float": Model(bundle.model_path("float")).predict(x).argmax(axis=1),
        "int8": Model(bundle.model_path("int8")).predict(x).argmax(axis=1),
    }


def test_int8_accuracy_on_the_full_test_set(predictions: dict) -> None:
    int8_top1 = float(np.mean(predictions["int8"] == predictions["y"]))
    assert len(predictions["y"]) == 10000
    assert int8_top1 >= 0.99


def test_int8_stays_within_the_gate_of_float(predictions: dict) -> None:
    y = predictions["y"]
    drop_pp = 100 * (np.mean(predictions["float"] == y) - np.mean(predictions["int8"] == y))
    # The documented gate, not the bundle's own record of it (a bundle converted with a looser limit must fail).
    assert predictions["bundle"].manifest["gate"]["max_drop_pp"] == 0.3 and drop_pp <= 0.3
    assert np.mean(predictions["float"] != predictions["int8"]) < 0.005


def test_manifest_metrics_are_what_the_device_measures(predictions: dict) -> None:
    """The numbers in the manifest must be reproducible from the shipped files, not copied from elsewhere."""
    metrics = predictions["bundle"].manifest["metrics"]
    y = predictions["y"]
    assert metrics["int8_top1"] == pytest.approx(np.mean(predictions["int8"] == y), abs=1e-9)
    assert metrics["float_top1"] == pytest.approx(np.mean(predictions["float"] == y), abs=1e-9)


def test_shipped_int8_model_is_edge_tpu_ready(predictions: dict) -> None:
    bundle = predictions["bundle"]
    check = check_edgetpu(bundle.model_path("int8"))
    assert check["ready"], check["problems"]
    assert bundle.model_info("int8")["edgetpu_ready"] is True
    assert not check_edgetpu(bundle.model_path("float"))["ready"]  # float ops are named, not hidden
