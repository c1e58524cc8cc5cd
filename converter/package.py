"""Writing a bundle: model files, reports, manifest — swapped into place only when complete.

A gate failure never overwrites the shipped bundle: the rejected candidate and its report go to
`<out>.rejected/` so the evidence is kept and the working model stays in place.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

from device.bundle import write_manifest
from device.runtime import interpreter_module


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
