"""Small pieces every training script needs: seeding, MAC counting, saving a run.

Backend-neutral (Keras 3 on TensorFlow, JAX or PyTorch): the face embedder also trains on a GPU machine that has
JAX but no TensorFlow; conversion to TFLite always runs under TensorFlow on the host.
"""

from __future__ import annotations

import importlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np


def seed_everything(seed: int) -> None:
    """Same seed, same weights and same batches: runs are repeatable on one machine."""
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one forward pass (batch 1) over conv, depthwise, separable and dense layers."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
            continue
        out = getattr(layer, "output", None)
        if out is None:
            continue
        out_shape = out.shape
        spatial = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
        if isinstance(layer, keras.layers.SeparableConv2D):
            k = int(np.prod(layer.kernel_size))
            cin = layer.input.shape[-1]
            total += spatial * cin * (k * layer.depth_multiplier + layer.depth_multiplier * layer.filters)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            total += spatial * out_shape[-1] * int(np.prod(layer.kernel_size))
        elif isinstance(layer, keras.layers.Conv2D):
            total += spatial * out_shape[-1] * layer.input.shape[-1] * int(np.prod(layer.kernel_size)) // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(out_shape[1:])) * layer.input.shape[-1]
    return int(total)


def toolchain_versions() -> dict[str, str]:
    """Versions that made a model; `keras_backend` names the framework that ran the training steps."""
    backend = keras.backend.backend()
    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_backend": backend,
        backend: importlib.import_module(backend).__version__,
        "numpy": np.__version__,
    }


def run_info(model_path: str | Path) -> dict[str, Any]:
    """The train_info.json that `save_run` wrote beside a model, or {} for a model file kept on its own."""
    path = Path(model_path).with_name("train_info.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def save_run(out: Path, model: keras.Model, history: dict[str, list[float]], info: dict[str, Any]) -> Path:
    """Write model.keras, history.json and train_info.json into `out`; returns the model path."""
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.keras"
    model.save(model_path)
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return model_path


class StepLog(keras.callbacks.Callback):
    """One progress line every `every_s` seconds during an epoch, for runs whose output goes to a log file.

    Keras' progress bar needs a terminal and `verbose=2` prints only at the end of an epoch, which on 2 CPU
    cores can be 20+ minutes of silence: a run that looks hung gets killed.
    """

    def __init__(self, steps: int, every_s: float = 60.0):
        super().__init__()
        self.steps, self.every_s = steps, every_s

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = self.last = time.time()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.time()
        if now - self.last >= self.every_s:
            self.last = now
            loss = f", loss {float(logs['loss']):.4f}" if logs and "loss" in logs else ""
            print(f"  step {batch + 1}/{self.steps}{loss} ({now - self.started:.0f} s)", flush=True)
