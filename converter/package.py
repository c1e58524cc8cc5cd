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
        "int8": {"file": INT8_FILE, "bytes": len(int8_bytes), "io": io_type, "edgetpu_ready": check["ready"],
                 **described[INT8_FILE]},
    }
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
    """Write a complete bundle next to `out`, then move it into place (or to `<out>.rejected`)."""
    out = Path(out)
    target = out if passed else out.with_name(out.name + ".rejected")
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
