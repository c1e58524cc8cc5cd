"""Keras → TFLite: float32, full-integer int8, and int8 with chosen layers kept in float.

Every export uses a batch-1 input signature (static shapes, as the Edge TPU and the Pi runtime
want) and names its supported ops explicitly, so a float op can never slip into an "int8" model
unnoticed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

IO_TYPES = {"int8": tf.int8, "uint8": tf.uint8}


def _converter(model: keras.Model) -> tf.lite.TFLiteConverter:
    """A converter for `model` behind a batch-1 input, so every exported shape is static."""
    inputs = keras.Input(batch_shape=(1, *model.input_shape[1:]), name="input")
    return tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, model(inputs, training=False)))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep Keras' export chatter (a listing of every captured variable) and the debugger's
    deprecation warning for its internal tf.lite.Interpreter off the user's screen."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _convert(converter: tf.lite.TFLiteConverter) -> bytes:
    with _quiet():
        return converter.convert()


def _samples(representative: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    def generator() -> Iterator[list[np.ndarray]]:
        for sample in representative:
            yield [sample[np.newaxis].astype(np.float32)]

    return generator


def to_float(model: keras.Model) -> bytes:
    """Float32 TFLite with builtin ops only."""
    converter = _converter(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return _convert(converter)


def int8_converter(model: keras.Model, representative: np.ndarray, io_type: str = "int8",
                   allow_float: bool = False) -> tf.lite.TFLiteConverter:
    """A converter set up for post-training full-integer quantisation calibrated on `representative`.

    `allow_float` admits float builtins beside int8 ones (only for layers deliberately kept in float).
    """
    converter = _converter(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _samples(representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] + (
        [tf.lite.OpsSet.TFLITE_BUILTINS] if allow_float else []
    )
    converter.inference_input_type = IO_TYPES[io_type]
    converter.inference_output_type = IO_TYPES[io_type]
    return converter


def to_int8(model: keras.Model, representative: np.ndarray, io_type: str = "int8") -> bytes:
    """Full-integer int8 TFLite: every op and tensor integer, int8 (or uint8 for Coral) input and output."""
    return _convert(int8_converter(model, representative, io_type))


@dataclass(frozen=True)
class LayerError:
    """Quantisation error of one layer's output, in units of its own quantisation step."""

    tensor: str
    op: str
    rmse_per_step: float  # sqrt(MSE) / scale: > ~0.3 means the layer loses more than rounding explains
    max_abs_error: float


def worst_layers(model: keras.Model, representative: np.ndarray, io_type: str = "int8",
                 samples: int = 64) -> list[LayerError]:
    """Run TFLite's quantisation debugger and rank layers by error relative to their quantisation step."""
    with _quiet():
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=int8_converter(model, representative, io_type, allow_float=True),
            debug_dataset=_samples(representative[:samples]),
        )
        debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    dump.seek(0)
    layers = []
    for row in csv.DictReader(dump):
        scale = float(row["scale"]) or 1.0
        layers.append(LayerError(
            tensor=row["tensor_name"],
            op=row["op_name"],
            rmse_per_step=float(np.sqrt(float(row["mean_squared_error"]))) / scale,
            max_abs_error=float(row["max_abs_error"]),
        ))
    return sorted(layers, key=lambda layer: layer.rmse_per_step, reverse=True)


def to_mixed(model: keras.Model, representative: np.ndarray, float_ops: list[str], io_type: str = "int8") -> bytes:
    """Int8 model with every op of the types in `float_ops` (e.g. "FULLY_CONNECTED") left in float.

    Keeping whole op types, not single layers, in float is deliberate: TF 2.21's debugger ignores
    `denylisted_nodes` (measured: the output stays all-int8), while `denylisted_ops` works.
    The result is no longer Edge TPU-ready: the TPU runs only up to the first float op.
    """
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops), fully_quantize=True)
    with _quiet():
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=int8_converter(model, representative, io_type, allow_float=True),
            debug_dataset=_samples(representative[:16]),
            debug_options=options,
        )
        return debugger.get_nondebug_quantized_model()
