"""A small real run of the meter host path through the command lines: train → convert → gate → bundle.

Training is 2 epochs on 1,500 real training crops (far too little to read meters well: this checks
the machinery, not the accuracy, which the regression tests check on the shipped bundle); conversion,
calibration and the gate are the real ones, evaluated on 300 random crops of the held-out test meters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from device.bundle import Bundle
from device.meter.model import MeterDigitModel


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("meter-train")
    result = run_cli("-m", "training", "meter", "--data-dir", str(data_dir), "--out", str(out),
                     "--epochs", "2", "--subset", "1500")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "epoch  2/2" in result.stdout and "validation" in result.stdout  # progress is shown
    return out / "model.keras"


def test_train_convert_gate_bundle(trained: Path, tmp_path: Path, data_dir: Path) -> None:
    info = json.loads(trained.with_name("train_info.json").read_text())
    assert info["train_images"] == 1500 and info["task"] == "meter-digits"
    assert set(info["split"]["test_groups"]).isdisjoint(info["split"]["train_groups"])
    out = tmp_path / "meter-digits"
    result = run_cli("-m", "converter", "meter", "--data-dir", str(data_dir), "--model", str(trained),
                     "--out", str(out), "--representative", "100", "--test-limit", "300",
                     "--min-accuracy", "0.5")  # a 1,500-crop model: the 0.95 floor is for shipped models
    assert result.returncode in (0, 1), result.stderr[-2000:]
    written = out if result.returncode == 0 else tmp_path / "meter-digits.rejected"
    bundle = Bundle.load(written)
    manifest = bundle.manifest
    assert manifest["gate"]["passed"] is (result.returncode == 0)
    assert manifest["evaluation"] == {**manifest["evaluation"], "n": 300, "limited_to": 300}
    assert manifest["calibration"]["samples"] == 100
    metrics = manifest["metrics"]
    assert metrics["int8"]["n_whole"] + metrics["int8"]["n_rolling"] == 300
    # Float TFLite is the Keras model exactly; the gate's drop is the int8 vs float whole-digit accuracy.
    assert metrics["float"]["whole_digit_accuracy"] == pytest.approx(metrics["keras_float"]["whole_digit_accuracy"])
    drop = 100 * (metrics["float"]["whole_digit_accuracy"] - metrics["int8"]["whole_digit_accuracy"])
    assert manifest["gate"]["drop_pp"] == pytest.approx(drop)
    assert manifest["gate"]["passed"] is (drop <= 0.5 + 1e-9 and metrics["int8"]["whole_digit_accuracy"] >= 0.5)
    report = (written / "report.md").read_text()
    assert "Per test meter" in report and "rolling ±0.2" in report
    reader = MeterDigitModel.from_bundle(written)
    (r,) = reader.classify([np.full((42, 23, 3), 200, np.uint8)])
    assert 0.0 <= r.value < 10.0


def test_cli_help_and_clear_errors(tmp_path: Path) -> None:
    for package in ("training", "converter"):
        help_text = run_cli("-m", package, "meter", "--help").stdout
        assert "--data-dir" in help_text and "meter" in help_text
    missing = run_cli("-m", "training", "meter", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "meter digit crops not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_model = run_cli("-m", "converter", "meter", "--model", str(tmp_path / "none.keras"))
    assert no_model.returncode == 2 and "train it first" in no_model.stderr


def test_converter_refuses_a_model_trained_with_other_preprocessing(trained: Path, tmp_path: Path,
                                                                     data_dir: Path) -> None:
    """Calibration and evaluation use this code's METER_SPEC, so a model trained otherwise is refused, not mislabelled."""
    import shutil

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(trained, other / "model.keras")
    info = json.loads(trained.with_name("train_info.json").read_text())
    info["preprocessing"] = {**info["preprocessing"], "scale": 1.0 / 127.5, "offset": -1.0}
    (other / "train_info.json").write_text(json.dumps(info))
    result = run_cli("-m", "converter", "meter", "--data-dir", str(data_dir), "--model", str(other / "model.keras"),
                     "--out", str(tmp_path / "never"))
    assert result.returncode == 2 and "trained with preprocessing" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "never").exists()


def test_members_train_one_model_that_averages_seeded_members(trained: Path, tmp_path: Path, data_dir: Path) -> None:
    """`--members 2`: one Keras model (one input, one output) whose output is the mean of its two members'
    softmax outputs; member 1 is exactly the single run with the same --seed (the fixture), member 2 another seed."""
    import keras

    out = tmp_path / "ensemble"
    result = run_cli("-m", "training", "meter", "--data-dir", str(data_dir), "--out", str(out),
                     "--epochs", "2", "--subset", "1500", "--members", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "member 1/2 (seed 1)" in result.stdout and "member 2/2 (seed 2)" in result.stdout
    info = json.loads((out / "train_info.json").read_text())
    single = json.loads(trained.with_name("train_info.json").read_text())
    assert info["members"] == 2 and info["seeds"] == [1, 2] and info["train_images"] == 1500
    assert info["macs"] == 2 * single["macs"] and info["parameters"] == 2 * single["parameters"]
    assert "members" not in single  # --members 1 (the default) writes what it always wrote

    model = keras.saving.load_model(out / "model.keras")
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert len(model.inputs) == len(model.outputs) == 1 and len(members) == 2
    x = np.random.default_rng(0).uniform(0, 1, (32, 32, 20, 3)).astype(np.float32)
    outputs = [member.predict(x, verbose=0) for member in members]
    np.testing.assert_allclose(model.predict(x, verbose=0), np.mean(outputs, axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(outputs[0], keras.saving.load_model(trained).predict(x, verbose=0), rtol=0, atol=1e-6)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3  # two seeds, two different models
