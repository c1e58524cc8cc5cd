"""Shipped digits bundle: hashes verified before loading; modified or broken bundles are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from device.bundle import Bundle, BundleError
from device.digits import DigitReader


@pytest.fixture()
def bundle_copy(models_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "digits"
    shutil.copytree(models_dir / "digits", target)
    return target


def test_shipped_bundle_verifies_and_describes_its_models(models_dir: Path) -> None:
    bundle = Bundle.load(models_dir / "digits")
    assert bundle.task == "digits-classification"
    assert bundle.labels == [str(d) for d in range(10)]
    int8 = bundle.model_info("int8")
    assert int8["input"]["dtype"] == "int8" and int8["input"]["shape"] == [1, 28, 28, 1]
    assert int8["input"]["scale"] > 0
    for name in ("model_float.tflite", "model_int8.tflite", "report.md", "report.json"):
        assert name in bundle.manifest["files"]
    assert set(bundle.manifest["data"]) >= {"train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"}
    assert {"tensorflow", "keras", "numpy"} <= set(bundle.manifest["toolchain"])


def test_a_single_flipped_byte_is_refused(bundle_copy: Path) -> None:
    model = bundle_copy / "model_int8.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model_int8.tflite does not match"):
        DigitReader.from_bundle(bundle_copy)


def test_missing_model_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "model_float.tflite").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(bundle_copy)


def test_swapped_model_is_refused_even_if_valid(bundle_copy: Path) -> None:
    """Someone copies the float model over the int8 one: both are valid TFLite, the hash catches it."""
    shutil.copy(bundle_copy / "model_float.tflite", bundle_copy / "model_int8.tflite")
    with pytest.raises(BundleError, match="does not match"):
        Bundle.load(bundle_copy)


def test_not_a_bundle_and_bad_manifest(tmp_path: Path, bundle_copy: Path) -> None:
    with pytest.raises(BundleError, match="not a model bundle"):
        Bundle.load(tmp_path)
    (bundle_copy / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(bundle_copy)


def test_wrong_task_bundle_is_refused_by_the_digit_reader(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["task"] = "face-embedding"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a digits model"):
        DigitReader.from_bundle(bundle_copy)


def test_verify_cli_reports_ok_and_corruption(models_dir: Path, bundle_copy: Path) -> None:
    ok = run_cli("-m", "device", "verify", str(models_dir / "digits"))
    assert ok.returncode == 0 and "OK" in ok.stdout
    (bundle_copy / "report.md").write_text("edited by hand")
    bad = run_cli("-m", "device", "verify", str(bundle_copy))
    assert bad.returncode == 2
    assert "report.md does not match" in bad.stderr and "Traceback" not in bad.stderr
