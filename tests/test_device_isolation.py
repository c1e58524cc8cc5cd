"""The device package runs without TensorFlow, Keras, training or converter — and installs alone."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import REPO

FORBIDDEN = ("tensorflow", "keras", "training", "converter", "tf_keras")

# Imports of the forbidden packages fail in the child process, as on a Pi where they are not installed.
BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {FORBIDDEN!r}:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_device_source_never_imports_host_packages() -> None:
    offenders = []
    for path in (REPO / "device").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
            # a module named in a string, for importlib (the runtime once fell back to "tensorflow.lite")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.fullmatch(rf"({'|'.join(FORBIDDEN)})(\.\w+)*", node.value):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not offenders


def test_digit_reader_runs_with_tensorflow_blocked(models_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    import cv2

    from training.datasets.mnist import load_mnist

    image = tmp_path / "digit.png"
    data = load_mnist(data_dir)
    cv2.imwrite(str(image), 255 - data.x_test[1])
    code = BLOCKER + f"""
import device, device.digits, device.cli, device.bench
from device.digits import DigitReader
result = DigitReader.from_bundle({str(models_dir / 'digits')!r}).read({str(image)!r})
assert not [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]
print(result.digit)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(data.y_test[1])


@pytest.mark.skipif(os.environ.get("EDGE_SKIP_INSTALL_TEST") == "1", reason="EDGE_SKIP_INSTALL_TEST=1")
def test_pip_install_device_extra_alone_pulls_no_tensorflow(models_dir: Path, tmp_path: Path) -> None:
    """A real `pip install .[device]` into a fresh venv, then the read-digit console script from it."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = env_dir / "bin" / "pip"
    install = subprocess.run([str(pip), "install", "--quiet", f"{REPO}[device]"], capture_output=True, text=True,
                             timeout=900, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([str(pip), "list", "--format=freeze"], capture_output=True, text=True, check=True).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert "ai-edge-litert" in installed and "opencv-python-headless" in installed
    assert not {"tensorflow", "tensorflow-cpu", "keras", "tf-keras"} & installed
    digit = tmp_path / "blank.png"
    import cv2
    import numpy as np

    canvas = np.full((60, 60), 255, np.uint8)
    cv2.line(canvas, (30, 8), (30, 52), 0, 5)  # a hand-drawn "1"
    cv2.imwrite(str(digit), canvas)
    run = subprocess.run([str(env_dir / "bin" / "read-digit"), str(digit), "--bundle", str(models_dir / "digits")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert ": 1 " in run.stdout
    # Installed into site-packages there is no models/ beside the package: without --bundle the tool looks in
    # $EDGE_MODELS (how a device names its bundle folder once), and without that it says so instead of a traceback.
    env = {k: v for k, v in os.environ.items() if k != "EDGE_MODELS"}
    run = subprocess.run([str(env_dir / "bin" / "read-digit"), str(digit)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env={**env, "EDGE_MODELS": str(models_dir)})
    assert run.returncode == 0, run.stderr
    assert ": 1 " in run.stdout
    run = subprocess.run([str(env_dir / "bin" / "read-digit"), str(digit)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=env)
    assert run.returncode == 2
    assert "EDGE_MODELS" in run.stderr and "Traceback" not in run.stderr
