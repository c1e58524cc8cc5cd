"""Meter digit wheels: a small CNN that reads the wheel position (100 classes of tenths) from a crop.

Reads top to bottom: augmentation → targets → model → metrics → training → save. Run it through
`python -m training meter --help`. Preprocessing comes from `device.meter.model` (defined once).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
from keras import layers

from device.meter.model import CLASSES, METER_SPEC, circular_distance, crop_to_input, decode
from training.common import count_macs, save_run, seed_everything, toolchain_versions
from training.datasets import DataNotFoundError
from training.datasets.meter import (LCD_GROUPS, SUBDIR, TEST_GROUPS, VALIDATION_GROUPS, MeterCrops,
                                     load_meter_digits)

# ---------------------------------------------------------------------------------------------
# Augmentation: what differs between meters and between photos of one meter. Applied to the raw
# crop (any size) before the one shared preprocessing, so it acts in the same space as the camera.


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One randomly disturbed copy of a BGR crop: framing, lighting, focus, glare, noise, colour."""
    h, w = image.shape[:2]
    # Framing: the reader's alignment is never exact; small rotation, zoom, stretch and shift.
    angle = rng.uniform(-5, 5)
    zoom = rng.uniform(0.9, 1.1)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, zoom)
    matrix[0, :2] *= rng.uniform(0.9, 1.1)  # horizontal stretch
    matrix[:, 2] += (rng.uniform(-0.06, 0.06) * w, rng.uniform(-0.05, 0.05) * h)
    out = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    x = out.astype(np.float32)
    # Lighting: contrast, brightness, gamma; white balance per channel; sometimes a grey (IR) camera.
    x = (x - x.mean()) * rng.uniform(0.6, 1.4) + x.mean() + rng.uniform(-40, 40)
    x *= rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.15:
        x[:] = x.mean(axis=2, keepdims=True)
    # Digit colours: wheels come white on black, black or red on white, LCDs dark on grey. Swapping
    # channels and inverting keep the wheel position and teach the model that colour is not the digit.
    if rng.random() < 0.3:
        x = x[..., rng.permutation(3)]
    if rng.random() < 0.3:
        x = 255.0 - np.clip(x, 0, 255)
    # Glare: a soft bright spot (reflection on the meter's window).
    if rng.random() < 0.3:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sy, sx = rng.uniform(0.1, 0.4) * h, rng.uniform(0.1, 0.5) * w
        spot = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
        x += rng.uniform(60, 180) * spot[..., None]
    # Focus and sensor noise.
    if rng.random() < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.2) * max(1.0, h / 32))
    if rng.random() < 0.3:
        x += rng.normal(0, rng.uniform(2, 10), size=x.shape).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


BLANK_SHARE = 0.25  # share of LCD samples shown as a blank position, per epoch


def blank_position(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same LCD window showing no digit: its dark segments closed away, a faint ghost of them left.

    Segment counters blank their leading positions (`  1234` is 001234), and the community data labels
    such a position 0.0, but no training meter shows one, so without this a blank reads as whatever
    its ghost segments resemble (measured: mostly 1). A grey-level closing wider than a stroke removes
    the dark segments and keeps the glass, the light and the window's edges; unlit LCD segments stay
    faintly visible, hence the ghost.
    """
    h, w = image.shape[:2]
    size = max(3, int(round(0.35 * w))) | 1
    background = cv2.morphologyEx(image, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (size, size)))
    background = cv2.GaussianBlur(background, (0, 0), max(1.0, w / 20))
    ghost = rng.uniform(0.0, 0.2)
    return np.clip(background * (1 - ghost) + image.astype(np.float32) * ghost, 0, 255).astype(np.uint8)


def with_blanks(crops: MeterCrops, chosen: np.ndarray, rng: np.random.Generator,
                share: float = BLANK_SHARE) -> tuple[list[np.ndarray], np.ndarray]:
    """The epoch's images and labels, a `share` of the LCD samples turned into blank positions read as 0."""
    images, values = [], crops.labels[chosen]
    for n, i in enumerate(chosen):
        if crops.groups[i] in LCD_GROUPS and rng.random() < share:
            images.append(blank_position(crops.images[i], rng))
            values[n] = 0.0
        else:
            images.append(crops.images[i])
    return images, values


def inputs(crops: list[np.ndarray]) -> np.ndarray:
    """Stack crops into a model input batch with the shared preprocessing."""
    return np.stack([crop_to_input(c) for c in crops]) if crops else np.empty((0, *METER_SPEC["size"], 3), np.float32)


def soft_targets(values: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    """Circular Gaussian over the 100 position classes around each label (sigma in classes).

    Neighbouring positions look alike and labels are themselves read by people to ±0.1, so a
    prediction one class off should cost little; one-hot targets would punish it like a wrong digit.
    """
    centre = np.round(np.asarray(values) * 10).astype(int) % CLASSES
    k = np.arange(CLASSES)
    d = np.abs(k[None, :] - centre[:, None])
    d = np.minimum(d, CLASSES - d)
    t = np.exp(-0.5 * (d / sigma) ** 2)
    return (t / t.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Model


def wheel_cnn(width: int = 24, name: str = "wheel_cnn") -> keras.Model:
    """Plain 3x3 conv blocks with batch norm and ReLU, then a dense head over the flattened map.

    Flatten, not global pooling, because the wheel position *is* a vertical offset: pooling would
    throw away where in the window the digits sit. ReLU and batch norm (folded at conversion) keep
    the model simple to quantise. About 10.4M MACs and 234k parameters at the default width 24.
    """

    def conv(x: Any, filters: int) -> Any:
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        return layers.ReLU()(x)

    height, width_px = METER_SPEC["size"]
    inputs_ = keras.Input((height, width_px, 3))
    x = conv(inputs_, width)
    x = layers.MaxPooling2D(2)(x)  # 16x10
    x = conv(x, 2 * width)
    x = conv(x, 2 * width)
    x = layers.MaxPooling2D(2)(x)  # 8x5
    x = conv(x, 4 * width)
    x = conv(x, 4 * width)
    x = layers.MaxPooling2D(2)(x)  # 4x2
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(CLASSES, activation="softmax")(x)
    return keras.Model(inputs_, outputs, name=name)


# ---------------------------------------------------------------------------------------------
# Metrics: the same function scores training's validation, the converter's gate and the tests.


def is_whole(values: np.ndarray) -> np.ndarray:
    """True for labels on a whole digit (`x.0` or a bare `x`)."""
    return circular_distance(values, np.round(values)) < 1e-6


def evaluate(predicted: np.ndarray, labels: np.ndarray, groups: list[str] | None = None) -> dict[str, Any]:
    """Wheel-reading metrics of predicted positions against labelled positions.

    - whole_digit_accuracy: on whole-digit images, the nearest digit of the prediction is the label;
    - rolling_within_0.1 / 0.2: on rolling images, circular distance to the label ≤ 0.1 / 0.2 digit;
    - neighbour_errors / other_errors: whole-digit mistakes to an adjacent digit (7 read as 6 or 8)
      and to any other digit, with the 10x10 confusion matrix (rows: true digit, columns: read);
    - per_group: the same per meter group.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    whole = is_whole(labels)
    distance = circular_distance(predicted, labels)
    true_digit = np.round(labels).astype(int) % 10
    read_digit = np.round(predicted).astype(int) % 10
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (true_digit[whole], read_digit[whole]), 1)
    step = np.abs(true_digit - read_digit) % 10
    wrong = whole & (step != 0)
    neighbour = wrong & ((step == 1) | (step == 9))

    def summary(mask: np.ndarray) -> dict[str, Any]:
        w, r = mask & whole, mask & ~whole
        return {
            "n_whole": int(w.sum()),
            "whole_digit_accuracy": float(np.mean(read_digit[w] == true_digit[w])) if w.any() else None,
            "n_rolling": int(r.sum()),
            "rolling_within_0.1": float(np.mean(distance[r] <= 0.1 + 1e-6)) if r.any() else None,
            "rolling_within_0.2": float(np.mean(distance[r] <= 0.2 + 1e-6)) if r.any() else None,
            "exact_tenth": float(np.mean(distance[mask] < 0.05)) if mask.any() else None,
            "mean_abs_error": float(np.mean(distance[mask])) if mask.any() else None,
        }

    result = summary(np.ones(len(labels), dtype=bool))
    result |= {"neighbour_errors": int(neighbour.sum()), "other_errors": int((wrong & ~neighbour).sum()),
               "confusion": confusion.tolist()}
    if groups is not None:
        names = np.asarray(groups)
        result["per_group"] = {g: summary(names == g) for g in sorted(set(groups))}
    return result


def describe(metrics: dict[str, Any]) -> str:
    """One line for progress output."""
    return (f"whole digits {metrics['whole_digit_accuracy']:.2%} (n={metrics['n_whole']}), rolling ±0.1 "
            f"{metrics['rolling_within_0.1']:.2%} ±0.2 {metrics['rolling_within_0.2']:.2%} (n={metrics['n_rolling']})")


def predict_values(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return decode(model.predict(x, batch_size=256, verbose=0))[0]


# ---------------------------------------------------------------------------------------------
# Training


def balanced_epoch(crops: MeterCrops, rng: np.random.Generator, power: float = 0.5) -> np.ndarray:
    """Indices for one epoch, drawn so a group of n images weighs like n**power images.

    One meter has 3,800 crops and another 5; without balancing the model would learn the big
    meters' fonts and little else. Same epoch length as the data.
    """
    groups = np.asarray(crops.groups)
    names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    weight = counts[inverse].astype(np.float64) ** (power - 1.0)
    return rng.choice(len(groups), size=len(groups), replace=True, p=weight / weight.sum())


def ensemble(members: list[keras.Model]) -> keras.Model:
    """One model that reads a crop with every member and outputs the mean of their softmax outputs.

    One configuration trained from different seeds reads unseen meters differently (validation meters,
    seeds 1-4: 98.28-99.43% of whole digits, 93.91-95.23% of rolling wheels within ±0.2). Averaging the
    members' probabilities before `decode` evens out that lottery: seeds 1+2 read 99.43% / 94.90%, above
    their mean (99.14% / 94.57%); more members did not gain more. One Keras model with one input and one
    softmax-like output keeps the converter, the int8 gate and the device unchanged; it costs
    `len(members)` times the MACs.
    """
    inputs_ = keras.Input(members[0].inputs[0].shape[1:])
    outputs = layers.Average()([member(inputs_) for member in members])
    return keras.Model(inputs_, outputs, name=f"wheel_cnn_ensemble_{len(members)}")


def train_member(train_crops: MeterCrops, val_crops: MeterCrops, x_val: np.ndarray, val_name: str, seed: int,
                 epochs: int, batch: int, width: int, subset: int | None,
                 name: str = "wheel_cnn") -> tuple[keras.Model, MeterCrops, dict[str, list[float]]]:
    """One seeded model: the same seed gives the same weights, crops and batches whatever else ran before.

    Returns the model, the crops it was fit on (a random `subset` of `train_crops` when given) and its
    per-epoch history. `x_val` is `val_crops` preprocessed, shared by the members.
    """
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    if subset:
        train_crops = train_crops.subset(np.sort(rng.choice(len(train_crops), min(subset, len(train_crops)),
                                                           replace=False)))
    model = wheel_cnn(width, name)
    steps = math.ceil(len(train_crops) / batch) * epochs
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps)),
                  loss=keras.losses.CategoricalCrossentropy())
    print(f"training {model.name}: {model.count_params():,} parameters, {count_macs(model):,} MACs, "
          f"{len(train_crops):,} training crops in {len(set(train_crops.groups))} groups, "
          f"{len(val_crops):,} {val_name} crops in {len(set(val_crops.groups))} groups, {epochs} epochs", flush=True)
    started = time.time()
    history: dict[str, list[float]] = {"loss": [], "val_whole_digit_accuracy": [], "val_rolling_within_0.2": []}
    for epoch in range(epochs):
        chosen = balanced_epoch(train_crops, rng)
        images, values = with_blanks(train_crops, chosen, rng)
        x = inputs([augment(image, rng) for image in images])
        y = soft_targets(values)
        loss = model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=True).history["loss"][-1]
        val = evaluate(predict_values(model, x_val), val_crops.labels)
        history["loss"].append(float(loss))
        history["val_whole_digit_accuracy"].append(val["whole_digit_accuracy"])
        history["val_rolling_within_0.2"].append(val["rolling_within_0.2"])
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {loss:.4f}  {val_name}: {describe(val)}  "
              f"[{time.time() - started:.0f} s]", flush=True)
    return model, train_crops, history


def train(out: Path, epochs: int = 30, batch: int = 64, width: int = 24, data_dir: str | Path | None = None,
          subset: int | None = None, seed: int = 1, with_validation: bool = False, members: int = 1) -> Path:
    """Train on the training groups, report on the validation groups; returns the `.keras` path.

    `with_validation` also trains on the validation groups: for the shipped model, once settings were
    chosen on them, because every further meter seen teaches more than it measures (the per-epoch
    numbers are then on seen meters and only show progress). `subset` trains on N randomly chosen
    crops only (smoke runs in tests). `members` > 1 trains that many models with seeds `seed`,
    `seed + 1`, … (member k is exactly the single run with its seed) and saves their `ensemble`. The
    test groups are not even loaded here: they are the converter's, measured once on the finished model.
    """
    if members < 1:
        raise ValueError(f"members must be at least 1, not {members}")
    print("loading meter digit crops …", flush=True)
    data = load_meter_digits(data_dir, splits=("train", "validation"))
    train_crops, val_crops = data.splits["train"], data.splits["validation"]
    for name, crops, where in (("training", train_crops, "any other folder"),
                               ("validation", val_crops, ", ".join(VALIDATION_GROUPS))):
        if not len(crops):
            raise DataNotFoundError(f"no {name} crops under {data.root} (the {name} meters are: {where}); "
                                    "the split is fixed by meter folder, see training/datasets/meter.py")
    if with_validation:
        train_crops = train_crops + val_crops
    x_val, y_val = inputs(val_crops.images), val_crops.labels
    val_name = "validation (seen in training)" if with_validation else "validation"

    seeds = [seed + k for k in range(members)]
    started = time.time()
    if members == 1:
        model, fit_crops, history = train_member(train_crops, val_crops, x_val, val_name, seed, epochs, batch, width,
                                                 subset)
        train_groups = set(fit_crops.groups)
    else:
        trained, history, train_groups = [], {}, set()
        for k, member_seed in enumerate(seeds):
            print(f"member {k + 1}/{members} (seed {member_seed})", flush=True)
            member, fit_crops, member_history = train_member(train_crops, val_crops, x_val, val_name, member_seed,
                                                             epochs, batch, width, subset, f"wheel_cnn_{k + 1}")
            print(f"member {k + 1}/{members} after {time.time() - started:.0f} s, {val_name} groups: "
                  f"{describe(evaluate(predict_values(member, x_val), y_val))}", flush=True)
            trained.append(member)
            history |= {f"seed_{member_seed}/{key}": values for key, values in member_history.items()}
            train_groups |= set(fit_crops.groups)
        model = ensemble(trained)
    seconds = time.time() - started
    val = evaluate(predict_values(model, x_val), y_val, val_crops.groups)
    print(f"{model.name} after {seconds:.0f} s, {val_name} groups: {describe(val)}", flush=True)

    info = {
        "task": "meter-digits",
        "arch": f"wheel_cnn(width={width})" if members == 1 else f"mean of {members} x wheel_cnn(width={width})",
        "parameters": model.count_params(),
        "macs": count_macs(model),
        "epochs": epochs,
        "batch": batch,
        "seed": seed,
        **({"members": members, "seeds": seeds} if members > 1 else {}),
        "train_images": len(fit_crops),
        "validation_in_training": with_validation,
        "train_seconds": round(seconds, 1),
        "validation": val,
        "split": {"rule": "by meter group, fixed lists in training/datasets/meter.py",
                  "train_groups": sorted(train_groups), "validation_groups": list(VALIDATION_GROUPS),
                  "test_groups": list(TEST_GROUPS)},
        "blank_lcd_positions": {"groups": sorted(set(LCD_GROUPS) & train_groups), "share": BLANK_SHARE,
                                "label": 0.0},
        "data": {"folder": SUBDIR.as_posix(), "duplicates_dropped": data.duplicates,
                 "not_a_digit_dropped": data.not_a_digit, "merged_groups": data.merged},
        "preprocessing": METER_SPEC,
        "toolchain": toolchain_versions(),
    }
    return save_run(out, model, history, info)
