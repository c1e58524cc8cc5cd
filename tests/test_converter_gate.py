"""The converter refuses to ship what is not the model asked for. One test per review finding (session 6).

Each of these shipped, or could have shipped, with exit status 0: an "int8" model that was float inside
(calibrated on no samples), a model that always answers "0" (drop 0 pp: it is equally useless in both
variants), a digit classifier converted as a face embedder, `--out models` deleting every bundle, and a
failing `edgetpu_compiler` reported as Edge TPU-ready.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from converter.digits import quantize_digits
from converter.edgetpu import check_edgetpu
from converter.gate import not_integer
from converter.package import load_trained, write_bundle
from device.bundle import Bundle, BundleError


@pytest.fixture(scope="module")
def constant_model(tmp_path_factory) -> Path:
    """A digit "classifier" that answers 0 whatever it sees (9.8% of MNIST's test digits are zeros)."""
    import keras

    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax", kernel_initializer="zeros",
                                                 bias_initializer=keras.initializers.Constant([3.0] + [0.0] * 9))])
    path = tmp_path_factory.mktemp("constant") / "model.keras"
    model.save(path)
    return path


def test_a_float_model_is_not_an_int8_model(models_dir: Path) -> None:
    shipped = models_dir / "digits"
    assert not_integer((shipped / "model_int8.tflite").read_bytes(), "int8") == []
    problems = not_integer((shipped / "model_float.tflite").read_bytes(), "int8")
    assert "input is float32, not int8" in problems and any("CONV_2D has float32" in p for p in problems)
    assert not_integer((shipped / "model_int8.tflite").read_bytes(), "uint8")[0] == "input is int8, not uint8"
    # and the command line no longer takes zero calibration samples (that conversion fell back to float)
    run = run_cli("-m", "converter", "digits", "--representative", "0")
    assert run.returncode == 2 and "must be 1 or more" in run.stderr


def test_a_useless_model_fails_the_floor_even_with_no_drop(constant_model: Path, data_dir: Path,
                                                           tmp_path: Path) -> None:
    assert not quantize_digits(constant_model, tmp_path / "digits", data_dir=data_dir, representative=20)
    gate = Bundle.load(tmp_path / "digits.rejected").manifest["gate"]
    assert gate["drop_pp"] == pytest.approx(0.0) and gate["min_score"] == 0.98 and not gate["passed"]
    assert not (tmp_path / "digits").exists()


def test_a_model_of_another_task_is_refused(constant_model: Path) -> None:
    with pytest.raises(ValueError, match="outputs 10 values; a 'face' model outputs 128"):
        load_trained(constant_model, "face", 128)
    (constant_model.parent / "train_info.json").write_text(json.dumps({"task": "meter-digits"}))
    try:
        with pytest.raises(ValueError, match="trained for 'meter-digits'"):
            load_trained(constant_model, "digits", 10)
    finally:
        (constant_model.parent / "train_info.json").unlink()
    broken = constant_model.with_name("broken.keras")
    broken.write_bytes(constant_model.read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable Keras model"):
        load_trained(broken, "digits", 10)


def test_out_pointing_at_a_folder_of_bundles_is_not_wiped(models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir / "digits", models / "digits")
    (models / "benchmarks.md").write_text("results\n")
    with pytest.raises(ValueError, match="not a bundle; refusing"):
        write_bundle(models, {"m.tflite": b"x"}, {"task": "digits-classification", "models": {}}, "", {}, True)
    assert (models / "benchmarks.md").is_file() and Bundle.load(models / "digits")
    with pytest.raises(ValueError, match="a 'digits-classification' bundle; refusing"):
        write_bundle(models / "digits", {"m.tflite": b"x"}, {"task": "face-embedding", "models": {}}, "", {}, True)


def test_fix_with_uint8_io_is_refused() -> None:
    run = run_cli("-m", "converter", "digits", "--fix", "--io", "uint8")
    assert run.returncode == 2 and "--fix cannot keep uint8" in run.stderr


def test_a_failing_edgetpu_compiler_means_not_ready(models_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """No Edge TPU compiler here (Coral's apt repository only): a stand-in that fails as it does on an
    unsupported model shows the verdict now follows its exit status; the op check alone said "ready"."""
    model = models_dir / "digits" / "model_int8.tflite"
    assert check_edgetpu(model)["ready"]
    fake = tmp_path / "edgetpu_compiler"
    fake.write_text("#!/bin/sh\necho 'Model not quantized' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    check = check_edgetpu(model)
    assert not check["ready"] and check["compiler"]["returncode"] == 1 and "Model not quantized" in check["compiler"]["log"]


def test_damaged_labels_or_preprocessing_are_bundle_errors(models_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "digits"
    shutil.copytree(models_dir / "digits", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for key, value in (("labels", "0123456789"), ("preprocessing", None)):
        (bundle / "manifest.json").write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(BundleError, match=f"'{key}' must be a JSON"):
            Bundle.load(bundle)


def test_a_rejected_bundle_warns_and_is_not_benchmarked(models_dir: Path, tmp_path: Path, caplog) -> None:
    models = tmp_path / "models"
    shutil.copytree(models_dir / "digits", models / "digits.rejected")
    manifest = json.loads((models / "digits.rejected" / "manifest.json").read_text())
    manifest["gate"]["passed"] = False
    (models / "digits.rejected" / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="device.bundle"):
        Bundle.load(models / "digits.rejected")
    assert "FAILED its accuracy gate" in caplog.text
    run = run_cli("-m", "device", "bench", "--models", str(models), "--out", str(tmp_path / "b"), "--runs", "1")
    assert run.returncode == 2 and "no bundles" in run.stderr


def test_a_compiled_model_travels_in_the_bundle_as_the_edgetpu_variant(models_dir: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """The compiler's output was thrown away with its temporary folder, so no bundle could reach a Coral's TPU.

    No compiler or Edge TPU here: a stand-in compiler (writes `<stem>_edgetpu.tflite` with the marker a compiled
    model carries) checks the packaging, the hashing and the clear error on a machine without the TPU."""
    from converter.package import EDGETPU_FILE, model_pair

    fake = tmp_path / "bin" / "edgetpu_compiler"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nout="$3"; name=$(basename "$4" .tflite)\n'
                    'cat "$4" > "$out/${name}_edgetpu.tflite"\nprintf edgetpu-custom-op >> "$out/${name}_edgetpu.tflite"\n'
                    'echo "Model compiled successfully."\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    shipped = models_dir / "digits"
    pair = model_pair((shipped / "model_float.tflite").read_bytes(), (shipped / "model_int8.tflite").read_bytes(), "int8")
    assert pair.edgetpu["ready"] and "model" not in pair.edgetpu["compiler_run"]  # no bytes in the manifest
    assert pair.models["edgetpu"]["file"] == EDGETPU_FILE and pair.models["edgetpu"]["input"] == pair.models["int8"]["input"]
    out = write_bundle(tmp_path / "digits", pair.files, {"task": "digits-classification", "models": pair.models,
                                                         "labels": [str(d) for d in range(10)]}, "", {}, True)
    bundle = Bundle.load(out)
    assert bundle.manifest["files"][EDGETPU_FILE] and bundle.variants(runnable=True) == ["float", "int8"]
    with pytest.raises(Exception, match="needs the Edge TPU"):
        bundle.model("edgetpu")
    run = run_cli("-m", "device", "read-digit", str(models_dir.parent / "README.md"), "--bundle", str(out),
                  "--variant", "edgetpu")
    assert run.returncode == 2 and "needs the Edge TPU" in run.stderr and "Traceback" not in run.stderr


def test_a_fixed_model_says_its_score_was_chosen_on_the_evaluation_set() -> None:
    """--fix stops at the first op types that pass on the test set, so that model's int8 score is optimistic."""
    from converter.gate import Gate, Quantized

    gate = Gate("top1", 0.3, 0.98)
    fixed = Quantized(int8=b"", float_score=0.99, int8_score=0.99, passed=True, float_ops=["SOFTMAX"]).record(gate, 0.0)
    plain = Quantized(int8=b"", float_score=0.99, int8_score=0.99, passed=True).record(gate, 0.0)
    assert "optimistic" in fixed["note"] and "note" not in plain
