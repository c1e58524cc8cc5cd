"""Face embedders: the seed (plain conv stack → dense) and the compact edge net we ship.

Both end in a 128-D embedding normalised by a single `tf.math.l2_normalize`, which TFLite turns into one
int8 L2_NORMALIZATION op (Keras' UnitNormalization would leave float ops behind in the int8 model). The
models also build under Keras' JAX and PyTorch backends, for training on a GPU machine without TensorFlow.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from training.teacher import EMBEDDING_SIZE  # the student reproduces the teacher's 128-D embedding


@keras.saving.register_keras_serializable(package="edge_face")
class L2Normalize(layers.Layer):
    """`tf.math.l2_normalize` over the last axis as a layer: one op, loadable without unsafe Lambda code.

    Under another Keras backend (training elsewhere) the same unit vector comes from `keras.ops.normalize`;
    the TFLite export loads the saved model under TensorFlow and so gets the single op.
    """

    def call(self, inputs: Any) -> Any:
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            return tf.math.l2_normalize(inputs, axis=-1)
        return keras.ops.normalize(inputs, axis=-1)


@keras.saving.register_keras_serializable(package="edge_face")
class PadChannels(layers.Layer):
    """Zero channels appended at the end (dlib adds tensors of different depths as if the smaller were so padded)."""

    def __init__(self, extra: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.extra = int(extra)

    def call(self, inputs: Any) -> Any:
        return keras.ops.pad(inputs, [[0, 0], [0, 0], [0, 0], [0, self.extra]])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "extra": self.extra}


@keras.saving.register_keras_serializable(package="edge_face")
class Centre(layers.Layer):
    """Subtracts a fixed vector (not trained): one int8 SUB op in TFLite."""

    def build(self, input_shape: Any) -> None:
        self.mean = self.add_weight(shape=(int(input_shape[-1]),), initializer="zeros", trainable=False, name="mean")

    def call(self, inputs: Any) -> Any:
        return inputs - self.mean


def _conv_bn(x: Any, filters: int, kernel: int = 3, strides: int = 1, relu: bool = True) -> Any:
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.ReLU()(x) if relu else x


def _depthwise_bn(x: Any, strides: int = 1, relu: bool = True) -> Any:
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.ReLU()(x) if relu else x


def _bottleneck(x: Any, filters: int, strides: int, expansion: int) -> Any:
    """MobileNetV2/MobileFaceNet inverted residual: expand 1x1 → depthwise 3x3 → linear project 1x1."""
    shortcut = x
    y = _conv_bn(x, x.shape[-1] * expansion, kernel=1)
    y = _depthwise_bn(y, strides=strides)
    y = _conv_bn(y, filters, kernel=1, relu=False)
    if strides == 1 and shortcut.shape[-1] == filters:
        y = layers.Add()([shortcut, y])
    return y


def edge_embedder(input_shape: tuple[int, int, int] = (96, 96, 1), width: int = 64) -> keras.Model:
    """MobileFaceNet-like for small grey crops: inverted residuals, a global depthwise conv instead of average pooling.

    The global depthwise conv (GDConv) keeps *where* a feature fired, which average pooling throws away and
    which matters for faces (eyes above nose). ReLU rather than PReLU keeps int8 activations simple.
    Shipped: width 64 at 96x96, ~0.52M parameters, ~97M MACs (width 48 at 64x64: ~0.3M, ~25M MACs).
    """
    inputs = keras.Input(input_shape)
    x = _conv_bn(inputs, width // 2, strides=2)  # 1/2 of the input side
    x = _depthwise_bn(x)
    x = _conv_bn(x, width, kernel=1)
    for filters, strides, repeats, expansion in ((width, 2, 3, 2), (2 * width, 2, 4, 2), (2 * width, 2, 2, 2)):
        for i in range(repeats):  # 1/4, 1/8, 1/16
            x = _bottleneck(x, filters, strides if i == 0 else 1, expansion)
    x = _conv_bn(x, 4 * width, kernel=1)
    x = layers.DepthwiseConv2D(int(x.shape[1]), padding="valid", use_bias=False, name="gdconv")(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(EMBEDDING_SIZE, use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    outputs = L2Normalize(name="embedding")(x)
    return keras.Model(inputs, outputs, name="edge_face")


def seed_embedder(input_shape: tuple[int, int, int] = (64, 64, 1)) -> keras.Model:
    """Reference: the seed's plain conv stack → dense → L2-normalised embedding."""
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (32, 64, 128, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.Dense(EMBEDDING_SIZE)(x)
    outputs = L2Normalize(name="embedding")(x)
    return keras.Model(inputs, outputs, name="seed_face")


ARCHITECTURES = {"edge": edge_embedder, "seed": seed_embedder}
