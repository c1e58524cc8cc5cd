"""The device quantises a model's input exactly as TFLite's own QUANTIZE op would.

Models ship with int8 input, so the device does the float → int8 step that a float-input model does
inside the graph. If the two rounded differently, the int8 numbers the converter gates (measured through
the device code) would drift from what the same model computes with float input. A review suggested
rounding half away from zero; TFLite's op agrees with numpy's half-to-even on these inputs (with and
without the XNNPACK delegate), so the device keeps it and this test holds it there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device.runtime import Model


@pytest.mark.parametrize("xnnpack", [True, False])
def test_input_quantisation_matches_tflites_quantize_op(tmp_path: Path, xnnpack: bool) -> None:
    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    inp = keras.Input((256,), batch_size=1)
    model = keras.Model(inp, keras.layers.Dense(4)(inp))
    # Calibrated on [-1, 1]: the face model's input grid (scale 2/255, zero point -1), on which the face
    # preprocessing of the 256 grey levels falls about half-way between codes, where rounding rules differ.
    samples = [np.linspace(-1, 1, 256, dtype=np.float32)[None] * s for s in (1.0, 0.5, -1.0)]

    def convert(int8_io: bool) -> Path:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([s] for s in samples)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = converter.inference_output_type = tf.int8
        path = tmp_path / f"{'int8' if int8_io else 'float'}-io.tflite"
        path.write_bytes(converter.convert())
        return path

    float_io, int8_io = convert(False), convert(True)
    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    reference = Interpreter(model_path=str(float_io), experimental_preserve_all_tensors=True,
                            experimental_op_resolver_type=resolver)
    reference.allocate_tensors()
    grey = (np.arange(256, dtype=np.float32) / 255 * 2 - 1)[None]  # device.preprocess's face scaling
    reference.set_tensor(reference.get_input_details()[0]["index"], grey)
    reference.invoke()
    quantised = [t for t in reference.get_tensor_details() if t["dtype"] == np.int8 and tuple(t["shape"]) == (1, 256)]
    assert len(quantised) == 1  # the QUANTIZE op's output: the float input as the graph sees it
    device = Model(int8_io)
    assert (device.input_quant.scale, device.input_quant.zero_point) == pytest.approx(quantised[0]["quantization"])
    halves = np.abs(np.abs(grey[0] / device.input_quant.scale % 1) - 0.5) < 1e-6
    assert halves.sum() > 50  # the case in question occurs
    np.testing.assert_array_equal(device.quantize_input(grey), reference.get_tensor(quantised[0]["index"]))
