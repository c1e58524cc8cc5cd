"""Running a .tflite model with whichever LiteRT interpreter this machine has.

Order of preference: `ai_edge_litert` (LiteRT, the maintained runtime), then `tflite_runtime`
(older Pi images). Never TensorFlow's interpreter, not even as a fallback on a host: the converter
measures the models it gates with this module, so a host without LiteRT must fail here rather
than measure with a different interpreter than the device runs (the `host` extra installs LiteRT).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import platform
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

_INTERPRETER_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")
_EDGETPU_LIBRARY = {
    "Linux": "libedgetpu.so.1",
    "Darwin": "libedgetpu.1.dylib",
    "Windows": "edgetpu.dll",
}.get(platform.system(), "libedgetpu.so.1")


_log = logging.getLogger(__name__)


class ModelError(Exception):
    """A model file cannot be loaded or does not fit the way it is being used."""


def interpreter_module() -> ModuleType:
    """The first importable interpreter module, in order of preference."""
    errors = []
    for name in _INTERPRETER_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ModelError("no TFLite interpreter installed; run `pip install ai-edge-litert`.\n" + "\n".join(errors))


def edgetpu_delegate() -> Any | None:
    """The Edge TPU delegate if libedgetpu is installed on this machine, else None.

    The library is looked up with ctypes first: LiteRT's `load_delegate` on a missing library leaves a half-built
    Delegate whose destructor prints an "Exception ignored … AttributeError" traceback to stderr.
    """
    try:
        ctypes.CDLL(_EDGETPU_LIBRARY)
    except OSError:
        return None
    module = interpreter_module()
    try:
        return module.load_delegate(_EDGETPU_LIBRARY)
    except (ValueError, OSError, AttributeError):
        return None


def is_edgetpu_compiled(model: Path | bytes) -> bool:
    """True for a model produced by edgetpu_compiler (it embeds the `edgetpu-custom-op`)."""
    return b"edgetpu-custom-op" in (model if isinstance(model, bytes) else Path(model).read_bytes())


_stderr_lock = threading.Lock()


@contextmanager
def native_messages_to_log() -> Iterator[None]:
    """Route what the C++ runtime writes to stderr meanwhile (e.g. "INFO: Created TensorFlow Lite XNNPACK
    delegate for CPU.") to this module's logger, so a service's JSON-line log stays one JSON object per line.

    Works on file descriptor 2, since the runtime writes below Python's `sys.stderr`. "ERROR"/"WARNING"
    lines are logged as warnings (the exception that usually follows says what failed), the rest as debug.
    Serialised by a lock (fd 2 is process-wide); anything another thread writes to stderr meanwhile is
    routed too. Where no stderr exists or no temporary file can be made, nothing is redirected.
    """
    with _stderr_lock:
        try:
            if sys.stderr is None or sys.stderr.fileno() != 2:
                raise OSError("stderr is not file descriptor 2")
            sink = tempfile.TemporaryFile()
        except (OSError, ValueError):  # closed/replaced stderr, read-only or full temp dir
            yield
            return
        with sink:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                for line in sink.read().decode(errors="replace").splitlines():
                    if line.strip():
                        level = logging.WARNING if line.startswith(("ERROR", "WARNING")) else logging.DEBUG
                        _log.log(level, "runtime: %s", line.strip())


def default_threads() -> int:
    """The cores this process may use (CPU affinity and container limits included)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_interpreter(path: str | Path, threads: int | None = None, edgetpu: bool | None = None,
                     content: bytes | None = None) -> Any:
    """Create and allocate an interpreter for a model file (or for `content`, its bytes, already checked).

    `edgetpu=None` uses the Edge TPU only when the model was compiled for it and the library
    is present; `True` insists (and fails clearly without it); `False` never uses it.
    """
    path = Path(path)
    if content is None and not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    module = interpreter_module()
    compiled = is_edgetpu_compiled(path if content is None else content)
    delegates = []
    if edgetpu or (edgetpu is None and compiled):
        delegate = edgetpu_delegate()
        if delegate is None and (edgetpu or compiled):
            raise ModelError(f"{path.name} needs the Edge TPU but {_EDGETPU_LIBRARY} could not be loaded "
                             "(or found no Edge TPU attached)")
        delegates.append(delegate)
    source = {"model_path": str(path)} if content is None else {"model_content": content}
    try:
        # Not with a delegate: libedgetpu's fatal messages must reach the console, not a temporary file.
        with native_messages_to_log() if not delegates else nullcontext():
            interpreter = module.Interpreter(**source, experimental_delegates=delegates or None,
                                             num_threads=threads or default_threads())
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path} is not a usable TFLite model: {exc}") from exc
    return interpreter


@dataclass(frozen=True)
class Quantization:
    """Affine quantisation of one tensor: real = scale * (q - zero_point). scale 0 means float."""

    scale: float
    zero_point: int

    @property
    def is_quantized(self) -> bool:
        return self.scale != 0.0


class Model:
    """One TFLite model seen as float in, float out.

    Inputs are quantised with the model's own input parameters and outputs dequantised, so
    callers (the digit reader, the converter's accuracy check, the benchmarks) never handle
    int8 arithmetic themselves and a float and an int8 model are used identically.
    """

    def __init__(self, path: str | Path, threads: int | None = None, edgetpu: bool | None = None,
                 content: bytes | None = None):
        self.path = Path(path)
        self._content = content  # the interpreter reads the model from this buffer: keep it alive
        self.interpreter = make_interpreter(self.path, threads=threads, edgetpu=edgetpu, content=content)
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1:
            raise ModelError(f"{self.path.name} has {len(inputs)} inputs; this runtime expects one")
        self._input = inputs[0]
        self._outputs = outputs
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in self._input["shape"])
        self.input_dtype = np.dtype(self._input["dtype"])
        scale, zero_point = self._input["quantization"]
        self.input_quant = Quantization(float(scale), int(zero_point))
        self.output_quants = [Quantization(float(o["quantization"][0]), int(o["quantization"][1])) for o in outputs]

    def describe(self) -> dict[str, Any]:
        """Input and output facts as recorded in a bundle manifest."""

        def tensor(detail: dict[str, Any]) -> dict[str, Any]:
            scale, zero_point = detail["quantization"]
            return {
                "shape": [int(d) for d in detail["shape"]],
                "dtype": np.dtype(detail["dtype"]).name,
                "scale": float(scale),
                "zero_point": int(zero_point),
            }

        return {"input": tensor(self._input), "outputs": [tensor(o) for o in self._outputs]}

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Float input (already preprocessed) → the tensor the model takes."""
        if not self.input_quant.is_quantized:
            return x.astype(self.input_dtype, copy=False)
        info = np.iinfo(self.input_dtype)
        q = np.round(x / self.input_quant.scale) + self.input_quant.zero_point
        return np.clip(q, info.min, info.max).astype(self.input_dtype)

    def _dequantize(self, index: int, y: np.ndarray) -> np.ndarray:
        quant = self.output_quants[index]
        if not quant.is_quantized:
            return y.astype(np.float32, copy=True)
        return (y.astype(np.float32) - quant.zero_point) * quant.scale

    def _fits(self, shape: tuple[int, ...]) -> bool:
        """One sample's shape as the model takes it, give or take a channel axis of 1 (grey images)."""
        expected = self.input_shape[1:]
        return shape == expected or (expected[-1:] == (1,) and shape == expected[:-1]) \
            or (shape[-1:] == (1,) and shape[:-1] == expected)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Run one sample (shape without the batch axis, or with batch 1); returns every output."""
        x = np.asarray(x, dtype=np.float32)
        sample = x.shape[1:] if x.ndim == len(self.input_shape) and x.shape[:1] == (1,) else x.shape
        if not self._fits(tuple(sample)):  # a transposed or CHW array has the right size but means nothing
            raise ModelError(f"{self.path.name} takes samples of shape {self.input_shape[1:]}, got {x.shape}")
        x = x.reshape(self.input_shape)
        self.interpreter.set_tensor(self._input["index"], self.quantize_input(x))
        self.interpreter.invoke()
        return [self._dequantize(i, self.interpreter.get_tensor(o["index"])[0]) for i, o in enumerate(self._outputs)]

    def predict(self, batch: np.ndarray, progress: Any = None) -> np.ndarray:
        """First output for every sample of a batch, stacked. `progress` wraps the sample loop (e.g. tqdm)."""
        batch = np.asarray(batch, dtype=np.float32)
        if not self._fits(tuple(batch.shape[1:])):
            raise ModelError(f"{self.path.name} takes samples of shape {self.input_shape[1:]}, "
                             f"got {tuple(batch.shape[1:])}")
        indices = range(len(batch))
        if progress is not None:
            indices = progress(indices)
        if not len(batch):
            return np.empty((0, *(int(d) for d in self._outputs[0]["shape"][1:])), np.float32)
        return np.stack([self.run(batch[i])[0] for i in indices])
