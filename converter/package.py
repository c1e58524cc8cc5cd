"""Writing a bundle: model files, reports, manifest — swapped into place only when complete.

A gate failure never overwrites the shipped bundle: the rejected candidate and its report go to
`<out>.rejected/` so the evidence is kept and the working model stays in place.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from converter.edgetpu import check_edgetpu
from converter.gate import score_bytes
from device.bench import latency_ms
from device.bundle import write_manifest
from device.runtime import Model, interpreter_module

FLOAT_FILE = "model_float.tflite"
INT8_FILE = "model_int8.tflite"
EDGETPU_FILE = "model_int8_edgetpu.tflite"  # the int8 model compiled by edgetpu_compiler, when it is installed


def load_trained(keras_path: Path, task: str, outputs: int) -> tuple[Any, dict[str, Any]]:
    """The trained Keras model and its train_info.json, checked to be a model of `task`.

    A model of another task converted by mistake would be calibrated, measured and shipped as this one (the
    digit classifier went through the face converter as an "embedder" with negative thresholds): its
    training record must name this task, and its output must have the size this task reads.
    """
    import keras

    from training.common import run_info

    try:
        model = keras.saving.load_model(keras_path, compile=False)  # inference only: no training losses needed
    except (OSError, ValueError, KeyError, TypeError) as exc:  # zip/h5 damage surfaces as any of these
        raise ValueError(f"{keras_path} is not a readable Keras model ({exc})") from exc
    train_info = run_info(keras_path)
    if train_info.get("task", task) != task:
        raise ValueError(f"{keras_path} was trained for '{train_info['task']}' (its train_info.json), not '{task}'")
    if model.output_shape[-1] != outputs:
        raise ValueError(f"{keras_path} outputs {model.output_shape[-1]} values; a '{task}' model outputs {outputs}")
    return model, train_info


def toolchain() -> dict[str, str]:
    """Versions of everything that shaped the model files."""
    import keras
    import numpy as np
    import tensorflow as tf

    litert = interpreter_module()
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "interpreter": litert.__name__,
    }


@dataclass
class ModelPair:
    """A bundle's float and int8 model files, described as every manifest records them."""

    files: dict[str, bytes]  # file name → contents
    models: dict[str, Any]  # the manifest's "models" entry
    edgetpu: dict[str, Any]  # the int8 model's Edge TPU check, as the manifest's "edgetpu" entry
    latency: dict[str, dict[str, float]]  # file name → single-thread latency (median, p90 ms)


def device_outputs(path: Path, x: np.ndarray, desc: str) -> np.ndarray:
    """First output of a .tflite for every sample, through the device runtime, with a progress bar.

    Every task measures this way, so what the gate sees is what a device computes.
    """
    return Model(path).predict(x, progress=lambda r: tqdm(r, desc=desc, unit="img", mininterval=2))


def model_pair(float_bytes: bytes, int8_bytes: bytes, io_type: str) -> ModelPair:
    """Describe, check and time a float + int8 pair through the device runtime."""
    files = {FLOAT_FILE: float_bytes, INT8_FILE: int8_bytes}
    described = {name: score_bytes(b, lambda p: Model(p).describe()) for name, b in files.items()}
    latency = {name: score_bytes(b, lambda p: latency_ms(Model(p, threads=1))) for name, b in files.items()}
    check = score_bytes(int8_bytes, check_edgetpu)
    models = {
        "float": {"file": FLOAT_FILE, "bytes": len(float_bytes), **described[FLOAT_FILE]},
        # io from the file itself: what was asked for is not always what a converter wrote
        "int8": {"file": INT8_FILE, "bytes": len(int8_bytes), "io": described[INT8_FILE]["input"]["dtype"],
                 "edgetpu_ready": check["ready"],
                 **described[INT8_FILE]},
    }
    compiled = check["compiler"].pop("model", None) if check["compiler"] else None
    if compiled is not None:  # the same tensors as int8 (this host has no Edge TPU to describe or time it on)
        files[EDGETPU_FILE] = compiled
        models["edgetpu"] = {"file": EDGETPU_FILE, "bytes": len(compiled), "compiled_from": INT8_FILE,
                             **{k: models["int8"][k] for k in ("io", "input", "outputs")}}
    edgetpu = {k: v for k, v in check.items() if k != "compiler"} | {"compiler_run": check["compiler"]}
    return ModelPair(files=files, models=models, edgetpu=edgetpu, latency=latency)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_bundle(out: Path, files: dict[str, bytes], manifest: dict[str, Any], report_md: str,
                 report: dict[str, Any], passed: bool) -> Path:
    """Write a complete bundle next to `out`, then move it into place (or to `<out>.rejected`).

    Only an empty folder or a bundle of the same task is replaced: `--out models` by mistake would otherwise
    delete every shipped bundle.
    """
    out = Path(out)
    target = out if passed else out.with_name(out.name + ".rejected")
    _check_replaceable(target, manifest["task"])
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    (staging / "report.md").write_text(report_md)
    (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    write_manifest(staging, {**manifest, "created": created})
    old = out.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _check_replaceable(target: Path, task: str) -> None:
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    manifest = target / "manifest.json"
    try:
        existing = json.loads(manifest.read_text()).get("task") if manifest.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        existing = None
    if existing != task:
        what = f"a '{existing}' bundle" if existing else "not a bundle"
        raise ValueError(f"{target} exists and is {what}; refusing to replace it with a '{task}' bundle "
                         "(give --out a bundle folder of its own, e.g. models/<name>)")
