"""Shipped digits bundle: hashes verified before loading; modified or broken bundles are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import copy_bundle, run_cli

from device.bundle import Bundle, BundleError
from device.digits import DigitReader


@pytest.fixture()
def bundle_copy(models_dir: Path, tmp_path: Path) -> Path:
    return copy_bundle(models_dir, "digits", tmp_path)


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


def _edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name,message", [
    ("../model_int8.tflite", "not a file name inside the bundle"),  # a model beside the bundle, unchecked
    ("/tmp/model_int8.tflite", "not a file name inside the bundle"),  # Path / "/abs" would drop the root
    ("other.tflite", "has no sha256 in 'files'"),  # inside, but never hashed
])
def test_a_model_the_hashes_do_not_cover_is_refused(bundle_copy: Path, name: str, message: str) -> None:
    shutil.copy(bundle_copy / "model_int8.tflite", bundle_copy.parent / "model_int8.tflite")
    shutil.copy(bundle_copy / "model_int8.tflite", bundle_copy / "other.tflite")
    _edit_manifest(bundle_copy, lambda m: m["models"]["int8"].update(file=name))
    with pytest.raises(BundleError, match=message):
        DigitReader.from_bundle(bundle_copy)


def test_a_manifest_with_no_hashes_or_broken_entries_is_refused(bundle_copy: Path) -> None:
    """An empty `files` used to verify as 'OK, 0 files match' with a corrupt model; damaged entries gave tracebacks."""
    cases = {
        "'files' must map": lambda m: m.update(files={}),
        "'files' must map each": lambda m: m.update(files=None),
        "is not 64 hex digits": lambda m: m["files"].update({"report.md": [1, 28, 28, 1]}),
        "has no 'file'": lambda m: m["models"]["int8"].pop("file"),
        "'models' must map": lambda m: m.update(models=[]),
    }
    original = (bundle_copy / "manifest.json").read_text()
    for message, change in cases.items():
        (bundle_copy / "manifest.json").write_text(original)
        _edit_manifest(bundle_copy, change)
        with pytest.raises(BundleError, match=message):
            Bundle.load(bundle_copy)
        bad = run_cli("-m", "device", "verify", str(bundle_copy))
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr


def test_the_model_run_is_the_one_whose_hash_was_checked(bundle_copy: Path, models_dir: Path) -> None:
    """A file replaced after the check (here: between Bundle.load and building the reader) is refused, not run:
    the model is built from the bytes that are hashed at that moment."""
    bundle = Bundle.load(bundle_copy)
    shutil.copy(bundle_copy / "model_float.tflite", bundle_copy / "model_int8.tflite")
    with pytest.raises(BundleError, match="model_int8.tflite does not match"):
        DigitReader(bundle)
    shutil.copy(models_dir / "digits" / "model_int8.tflite", bundle_copy / "model_int8.tflite")
    assert DigitReader(bundle).model.input_dtype.name == "int8"


def test_inputs_of_the_right_size_but_the_wrong_shape_are_refused(models_dir: Path) -> None:
    """A transposed or channel-first array has as many numbers as the model takes, but not the meaning."""
    import numpy as np

    from device.runtime import ModelError

    model = Bundle.load(models_dir / "meter-digits").model("int8", threads=1)  # takes (1, 32, 20, 3)
    assert model.predict(np.zeros((2, 32, 20, 3))).shape == (2, 100)
    assert model.predict(np.zeros((0, 32, 20, 3))).shape == (0, 100)  # an empty batch, not a crash later
    for wrong in (np.zeros((2, 20, 32, 3)), np.zeros((2, 3, 32, 20))):
        with pytest.raises(ModelError, match=r"takes samples of shape \(32, 20, 3\)"):
            model.predict(wrong)
    with pytest.raises(ModelError):
        model.run(np.zeros((3, 32, 20)))
    digits = Bundle.load(models_dir / "digits").model("int8", threads=1)  # (1, 28, 28, 1): a grey image fits
    assert digits.run(np.zeros((28, 28)))[0].shape == (10,) and digits.predict(np.zeros((1, 28, 28))).shape == (1, 10)
