"""The C++ runtime's own stderr lines go to Python logging, so a service's JSON-line log stays parseable.

Run in a fresh interpreter process (file descriptor 2 is what the runtime writes to) with the real
LiteRT interpreter and a shipped model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, sys
import numpy as np
from device.runtime import Model, ModelError
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="LOG %(levelname)s %(message)s")
Model(sys.argv[1]).run(np.zeros((1, 28, 28, 1), np.float32))
try:
    Model(sys.argv[2])
except ModelError as exc:
    print("MODEL ERROR", exc)
import os
os.write(2, b"stderr works again\\n")
"""


def test_runtime_messages_are_logged_not_printed(models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.tflite"
    data = bytearray((models_dir / "digits" / "model_int8.tflite").read_bytes())
    broken.write_bytes(bytes(data[: len(data) // 3]))  # truncated: loading fails inside the redirect
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(models_dir / "digits" / "model_int8.tflite"),
                             str(broken)], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "INFO: Created TensorFlow Lite" not in result.stderr
    assert "LOG DEBUG runtime: INFO: Created TensorFlow Lite XNNPACK delegate" in result.stdout
    assert "MODEL ERROR" in result.stdout and "is not a usable TFLite model" in result.stdout
    assert "stderr works again" in result.stderr  # file descriptor 2 is restored after a failed load
