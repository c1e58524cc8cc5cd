"""Handwritten digits on MNIST: the seed CNN, and a compact edge CNN that we ship.

Reads top to bottom: data → model → training → evaluation → save. Run it through
`python -m training digits --help`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from device.preprocess import MNIST_SPEC, normalize
from training.common import count_macs, save_run, seed_everything, toolchain_versions
from training.datasets.mnist import load_mnist

INPUT_SHAPE = (28, 28, 1)


def seed_cnn() -> keras.Model:
    """The classic Keras MNIST CNN, exactly: Conv32-Conv64-MaxPool-Dropout.25-Dense128-Dropout.5-Dense10."""
    return keras.Sequential(
        [
            keras.Input(INPUT_SHAPE),
            layers.Conv2D(32, 3, activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ],
        name="seed_cnn",
    )


def edge_cnn() -> keras.Model:
    """Compact CNN for the edge: one full conv, then depthwise-separable blocks with batch norm.

    About 3x fewer MACs than the seed and ~30x fewer parameters (39k vs 1.2 M). Batch norm folds into the
    convolutions at conversion; ReLU (not ReLU6 or swish) keeps int8 activations simple; global
    average pooling replaces the large dense layer that dominates the seed's parameters.
    """

    def separable(x: Any, filters: int) -> Any:
        x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(filters, 1, use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        return layers.ReLU()(x)

    inputs = keras.Input(INPUT_SHAPE)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    x = separable(x, 32)
    x = layers.MaxPooling2D(2)(x)  # 14x14
    x = separable(x, 64)
    x = separable(x, 64)
    x = layers.MaxPooling2D(2)(x)  # 7x7
    x = separable(x, 128)
    x = separable(x, 128)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="edge_cnn")


ARCHITECTURES = {"seed": seed_cnn, "edge": edge_cnn}


def augmenter(seed: int) -> keras.Sequential:
    """Small random affine jitter (±8° rotation, ±10% scale, ±2 px shift), like handwriting varies."""
    return keras.Sequential(
        [
            layers.RandomRotation(8 / 360, fill_mode="constant", seed=seed),
            layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 1),
            layers.RandomTranslation(2 / 28, 2 / 28, fill_mode="constant", seed=seed + 2),
        ]
    )


def make_dataset(x: np.ndarray, y: np.ndarray, batch: int, seed: int, augmented: bool) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).batch(batch)
    if augmented:
        jitter = augmenter(seed)  # built once, outside the traced map function
        ds = ds.map(lambda images, labels: (jitter(images, training=True), labels), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def train(
    out: Path,
    arch: str = "edge",
    epochs: int = 20,
    batch: int = 128,
    data_dir: str | Path | None = None,
    subset: int | None = None,
    seed: int = 1,
    augmented: bool | None = None,
    verbose: int = 2,
    validation: int = 0,
) -> Path:
    """Train one architecture and save it with its history; returns the `.keras` path.

    `subset` trains on the first N training images only (for quick smoke runs in tests). `validation` holds
    out the last N training images and reports accuracy on them after every epoch: compare settings with
    it, then train the shipped model on all 60k (`validation=0`). The test split is only reported, at the end.
    """
    seed_everything(seed)
    data = load_mnist(data_dir)
    x_train, y_train = normalize(data.x_train, MNIST_SPEC), data.y_train
    if not 0 <= validation < len(x_train):
        raise ValueError(f"--validation must be 0 … {len(x_train) - 1}, not {validation}")
    x_val, y_val = x_train[len(x_train) - validation:], y_train[len(x_train) - validation:]
    x_train, y_train = x_train[:len(x_train) - validation], y_train[:len(y_train) - validation]
    if subset:
        x_train, y_train = x_train[:subset], y_train[:subset]
    x_test, y_test = normalize(data.x_test, MNIST_SPEC), data.y_test
    augmented = (arch == "edge") if augmented is None else augmented

    model = ARCHITECTURES[arch]()
    steps = math.ceil(len(x_train) / batch) * epochs
    # Cosine decay to zero: a fixed schedule needs no validation split and no peeking at the test set.
    schedule = keras.optimizers.schedules.CosineDecay(2e-3 if arch == "edge" else 1e-3, decay_steps=steps)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    print(f"training {model.name}: {model.count_params():,} parameters, {count_macs(model):,} MACs, "
          f"{len(x_train):,} images, {epochs} epochs, augmentation {'on' if augmented else 'off'}", flush=True)
    started = time.time()
    history = model.fit(
        make_dataset(x_train, y_train, batch, seed, augmented), epochs=epochs, verbose=verbose, shuffle=False,
        validation_data=(x_val, y_val) if validation else None,
    ).history
    seconds = time.time() - started
    test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=512, verbose=0)
    print(f"{model.name}: test accuracy {test_accuracy:.4%} after {seconds:.0f} s", flush=True)

    info = {
        "task": "digits",
        "arch": arch,
        "parameters": model.count_params(),
        "macs": count_macs(model),
        "epochs": epochs,
        "batch": batch,
        "seed": seed,
        "augmentation": augmented,
        "train_images": len(x_train),
        "validation_images": validation,
        **({"validation_accuracy": float(history["val_accuracy"][-1])} if validation else {}),
        "train_seconds": round(seconds, 1),
        "keras_test_accuracy": float(test_accuracy),
        "data": {k: v for k, v in data.source.items() if k != "path"},
        "preprocessing": MNIST_SPEC,
        "toolchain": toolchain_versions(),
    }
    return save_run(out, model, {k: [float(v) for v in vals] for k, vals in history.items()}, info)
