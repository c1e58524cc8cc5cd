"""A small real run of the whole host path: train → convert → gate → bundle, plus the gate's failure path.

Training is one epoch of the seed CNN on 3,000 MNIST images (seconds on two cores); conversion,
calibration and evaluation are the real ones, on the full 10k test set. Such a model reads ~95% of the test
digits, below the 98% floor a shipped digits model must reach, so these runs pass a lower one (FLOOR).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from converter.digits import quantize_digits
from converter.edgetpu import check_edgetpu
from converter.gate import Gate, quantize_with_gate, score_bytes
from converter.tflite import to_float, to_mixed
from device.bundle import Bundle, sha256_file
from device.digits import DigitReader
from device.preprocess import MNIST_SPEC, normalize
from training.datasets.mnist import load_mnist
from training.digits import train


FLOOR = 0.8


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("train")
    return train(out, arch="seed", epochs=1, subset=3000, data_dir=data_dir, verbose=0)


def test_train_convert_gate_bundle(trained: Path, tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "digits"
    assert quantize_digits(trained, out, data_dir=data_dir, representative=100, min_accuracy=FLOOR)
    bundle = Bundle.load(out)
    manifest = bundle.manifest
    assert manifest["gate"]["passed"] and manifest["metrics"]["int8_top1"] > 0.8
    assert manifest["training"]["arch"] == "seed" and manifest["training"]["train_images"] == 3000
    assert manifest["calibration"]["samples"] == 100
    assert manifest["models"]["int8"]["edgetpu_ready"]
    assert "McNemar" in (out / "report.md").read_text()
    assert DigitReader.from_bundle(out).read(load_mnist(data_dir).x_test[0]).confidence > 0


def test_failed_gate_keeps_the_shipped_bundle_and_writes_the_evidence(trained: Path, tmp_path: Path,
                                                                      data_dir: Path) -> None:
    out = tmp_path / "digits"
    assert quantize_digits(trained, out, data_dir=data_dir, representative=100, min_accuracy=FLOOR)
    before = sha256_file(out / "manifest.json")
    # A gate no int8 model can pass (it must beat float by 5 pp) forces the failure path.
    assert not quantize_digits(trained, out, data_dir=data_dir, representative=100, max_drop_pp=-5.0,
                               min_accuracy=FLOOR)
    assert sha256_file(out / "manifest.json") == before
    rejected = Bundle.load(tmp_path / "digits.rejected")
    assert rejected.manifest["gate"]["passed"] is False
    worst = rejected.manifest["gate"]["worst_layers"]
    assert worst and worst[0]["op"] in {"FULLY_CONNECTED", "CONV_2D", "SOFTMAX"}
    assert "Worst layers" in (tmp_path / "digits.rejected" / "report.md").read_text()


def test_fix_that_cannot_pass_never_ships_a_half_float_model(trained: Path, data_dir: Path) -> None:
    """If keeping layers in float does not rescue the gate, the result stays the plain int8 model."""
    import keras

    model = keras.saving.load_model(trained)
    mnist = load_mnist(data_dir)
    calibration = normalize(mnist.x_train[:100], MNIST_SPEC)
    x, y = normalize(mnist.x_test[:500], MNIST_SPEC), mnist.y_test[:500]

    def top1(path: Path) -> float:
        from device.runtime import Model

        return float(np.mean(Model(path).predict(x).argmax(axis=1) == y))

    float_top1 = score_bytes(to_float(model), top1)
    # Must beat float by 5 pp: no amount of float layers can pass it, so --fix has to give up.
    result = quantize_with_gate(model, calibration, float_top1, top1, Gate("top1", -5.0), fix=True)
    assert not result.passed and result.float_ops == []
    assert len(result.attempts) > 1  # --fix did try mixed models
    assert score_bytes(result.int8, check_edgetpu)["ready"]


def test_layers_kept_in_float_are_reported_as_not_edge_tpu_ready(trained: Path, data_dir: Path) -> None:
    import keras

    model = keras.saving.load_model(trained)
    calibration = normalize(load_mnist(data_dir).x_train[:100], MNIST_SPEC)
    check = score_bytes(to_mixed(model, calibration, ["FULLY_CONNECTED"]), check_edgetpu)
    assert not check["ready"]
    assert {p["op"] for p in check["problems"]} >= {"FULLY_CONNECTED"}


def test_cli_help_and_clear_errors(tmp_path: Path) -> None:
    for package in ("device", "training", "converter"):
        assert run_cli("-m", package, "--help").returncode == 0
    missing = run_cli("-m", "converter", "digits", "--model", str(tmp_path / "none.keras"))
    assert missing.returncode == 2 and "train it first" in missing.stderr
    no_data = run_cli("-m", "training", "digits", "--data-dir", str(tmp_path), "--epochs", "1",
                      env={"HOME": str(tmp_path)})
    assert no_data.returncode == 2 and "MNIST not found" in no_data.stderr and "Traceback" not in no_data.stderr


def test_validation_split_reports_every_epoch_on_held_out_training_images(tmp_path: Path, data_dir: Path) -> None:
    """Settings were compared on the test split (a review finding): --validation holds out training images."""
    import json

    run = run_cli("-m", "training", "digits", "--arch", "seed", "--epochs", "1", "--subset", "2000",
                  "--validation", "1000", "--data-dir", str(data_dir), "--out", str(tmp_path), "--quiet")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "val_accuracy" in run.stdout  # Keras' per-epoch line
    info = json.loads((tmp_path / "train_info.json").read_text())
    assert info["train_images"] == 2000 and info["validation_images"] == 1000
    assert 0.5 < info["validation_accuracy"] <= 1.0  # one epoch on 2,000 images already reads most digits
    bad = run_cli("-m", "training", "digits", "--validation", "60000", "--data-dir", str(data_dir))
    assert bad.returncode == 2 and "--validation must be" in bad.stderr
