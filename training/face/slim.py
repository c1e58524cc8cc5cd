"""A compact face student cut out of dlib's network (dlib_resnet.py), then distilled back towards it.

Students trained from scratch on LFW's 7.7k training photos stop near 95% (models/face); dlib's own network scores
98.5% but is 5.6 M parameters at 150 px. This student starts as a *slice* of that network, so it keeps much of what
dlib learnt from ~3 M faces instead of relearning it from 7.7k:
- every convolution keeps the output channels that fire most on our training chips (`channel_scores`); a level's
  residual stream keeps the previous level's channels first, in the same order, so dlib's zero-extending shortcut
  still adds each channel to itself (`cut`);
- the input shrinks to a 112 px chip (same alignment, fewer pixels): the levels' maps shrink from dlib's
  35/17/8/3 to 26/13/6/3 pixels a side, and the last down block still ends at 1x1;
- distillation then recovers what the cut lost, on aligned chips ("function matching"): every augmented version of
  every training image is labelled by the ported teacher on its own 150 px chip of the very same pixels, and the
  student learns the centred teacher direction (1 - cosine, as train.distill_loss).
Model selection is train.py's: balanced accuracy over every pair of the validation people's images; the untrained
cut competes as epoch 0. Evaluation folds are never touched here (the converter measures them).

Reads top to bottom: channel scores → the cut → teacher targets (cached) → training.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm import tqdm

from device.face import FACE_SPEC, LANDMARKS_FILE, Aligner, aligned_spec
from device.landmarks import read_dlib_shape_predictor
from device.preprocess import normalize
from training.common import StepLog, count_macs, run_info, save_run, seed_everything, toolchain_versions
from training.datasets.lfw import load_faces
from training.face.data import augment, student_inputs, validation_set
from training.face.dlib_resnet import (CHIP, LANDMARKS_DAT, LEVELS, Conv, DlibResnet, find_model_file, find_weights,
                                       grey_embedder, read_dlib_resnet)
from training.face.recipes import SLIM_CACHE, SLIM_SIZE, SLIM_WIDTHS
from training.face.train import CHECKPOINT, SELECT_BY, SELECTION, centred, distill_loss, load_lfw, validate
from training.teacher import EMBEDDING_SIZE

SCORE_IMAGES = 512  # training chips whose mean activations rank the channels
WARMUP_STEPS = 300
# Where intermediate feature distillation (--feature-weight) compares student and teacher: the residual stream at the
# end of every level (the last block's output), from 26x26 down to 1x1 at a 112 px chip.
FEATURE_LAYERS = tuple(f"l{level}b{blocks - 1}_relu" for level, (blocks, _) in enumerate(LEVELS))
FIT_CHIPS = 2048  # training chips on which the 1x1 projections to the teacher's channels are fitted (least squares)


def channel_scores(teacher: keras.Model, chips: np.ndarray) -> dict[str, np.ndarray]:
    """Mean activation of every channel after each ReLU of the teacher (dlib_resnet's layer names), over `chips`.

    A ReLU channel that stays near zero on faces like ours contributes little downstream: those are cut first.
    """
    names = [layer.name for layer in teacher.layers if layer.name.endswith(("_relu", "_relu1")) or
             layer.name == "stem_pool"]
    probe = keras.Model(teacher.input, [teacher.get_layer(n).output for n in names])
    sums = {n: 0.0 for n in names}
    for start in range(0, len(chips), 64):
        outputs = probe.predict(chips[start:start + 64], verbose=0)
        for name, out in zip(names, outputs):
            sums[name] = sums[name] + np.asarray(out, np.float64).sum(axis=(0, 1, 2))
    return {n: s / len(chips) for n, s in sums.items()}


def _after_down(side: int) -> tuple[int, int]:
    """A down block's map side (what dlib's add_prev grows to: the larger of the unpadded 3x3 stride-2 convolution
    and the 2x2 average-pool shortcut), and the convolution's own output side (< 1: nothing to slide over)."""
    conv = (side - 3) // 2 + 1
    return max(conv, side // 2), conv


def cut(net: DlibResnet, scores: dict[str, np.ndarray], widths: tuple[int, ...] = SLIM_WIDTHS,
        size: int = SLIM_SIZE) -> DlibResnet:
    """dlib's network with only the `widths` strongest channels per level, for a `size` px chip.

    Stream channels of level n (the stem's output for level 0, every block's output after it) are ranked by their
    mean activation over the level's block outputs; level n keeps level n-1's channels first and in order (they are
    the channels the down block's zero-extended shortcut lands on), then its own strongest others. Inner channels of
    a block (after its first ReLU) are ranked on their own. A down block whose input is too small for an unpadded
    3x3 stride-2 convolution (a chip under ~100 px) pads ("same") instead; at 112 px none does.
    """
    if len(widths) != len(LEVELS) or any(b < a for a, b in zip(widths, widths[1:])):
        raise ValueError(f"widths {widths} must be {len(LEVELS)} non-decreasing numbers, one per level")
    for width, (_, teacher_width) in zip(widths, LEVELS):
        if not 0 < width <= teacher_width:
            raise ValueError(f"width {width} must be between 1 and dlib's {teacher_width}")
    convs = iter(net.convs)
    stem = next(convs)
    side = ((size - 7) // 2 + 1 - 3) // 2 + 1  # stem 7x7/2, then max pool 3x3/2
    kept: list[Conv] = []
    previous = np.zeros(0, dtype=int)
    for level, ((blocks, _), width) in enumerate(zip(LEVELS, widths)):
        stream = np.mean([scores[f"l{level}b{b}_relu"] for b in range(blocks)], axis=0)
        if level == 0:
            stream = stream + scores["stem_pool"]
        taken = set(previous.tolist())
        others = [c for c in np.argsort(-stream, kind="stable") if c not in taken]
        channels = np.concatenate([previous, np.array(others[: width - len(previous)], dtype=int)])
        if level == 0:
            kept.append(Conv(stem.kernel[..., channels], stem.bias[channels], stem.stride, stem.padding))
        for block in range(blocks):
            first, second = next(convs), next(convs)
            inner = np.sort(np.argsort(-scores[f"l{level}b{block}_relu1"], kind="stable")[:width])
            inputs = previous if block == 0 and level > 0 else channels
            padding = first.padding
            if first.stride == 2:
                side, conv = _after_down(side)
                if conv < 1:  # a 1 or 2 px input: padded, the convolution gives 1x1 (the pool at most that)
                    padding, side = "same", 1
            kept.append(Conv(first.kernel[:, :, inputs][..., inner], first.bias[inner], first.stride, padding))
            kept.append(Conv(second.kernel[:, :, inner][..., channels], second.bias[channels], second.stride,
                             second.padding))
        previous = channels
    return DlibResnet(kept, net.dense[previous], net.channel_means, net.sha256)


def aligner_for(size: int, landmarks: bytes) -> Aligner:
    return Aligner.from_spec(aligned_spec(size), {LANDMARKS_FILE: landmarks}.__getitem__)


def chips_of(crops: np.ndarray, aligners: tuple[Aligner, ...]) -> list[np.ndarray]:
    """Aligned grey chips (uint8) of 128x128 crops, one stack per aligner (same landmark model and box, other chip
    sizes); each crop's landmarks are found once, by the first."""
    cut_crops = []
    for crop in crops:
        points = aligners[0].landmarks(crop)
        cut_crops.append([aligner.chip(crop, points) for aligner in aligners])
    return [np.stack(chips) for chips in zip(*cut_crops)]


def blend(big: np.ndarray, small: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A `share` of the chips blended with another image's chips (mixup, own weight uniform in 0.5..1), the same blend
    at both sizes so teacher and student still see the same picture.

    LFW gives 7.7k training photos; a blend of two faces is a face-like input the teacher has an answer for, so the
    student learns the teacher's function on more of face space than the photos cover ("function matching", Beyer et
    al. 2022). Chips are blended rather than crops because each crop has its own alignment.
    """
    rng = np.random.default_rng(seed)
    chosen = np.flatnonzero(rng.random(len(big)) < share)
    partner = rng.permutation(len(big))[chosen]
    weight = rng.uniform(0.5, 1.0, len(chosen)).astype(np.float32)[:, None, None]
    out = []
    for chips in (big, small):
        chips = chips.copy()
        mixed = weight * chips[chosen] + (1.0 - weight) * chips[partner]
        chips[chosen] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
        out.append(chips)
    return out[0], out[1]


def chip_input(chips: np.ndarray) -> np.ndarray:
    """uint8 chips → model input, by the device's own arithmetic (device.preprocess.normalize)."""
    return normalize(chips, FACE_SPEC)


def chip_teacher_targets(teacher: keras.Model, chips: np.ndarray, cache_dir: Path, weights_sha: str) -> np.ndarray:
    """The teacher's embeddings of these 150 px chips, cached under a checksum of the weights and the chip bytes.

    The key covers every pixel the teacher saw (and their shape), so changed alignment, augmentation or data miss the
    cache. A hit is also checked against the teacher itself on the first chip, which catches a changed port or
    normalisation that the weights' checksum cannot see; a damaged or mismatching file is recomputed.
    """
    digest = hashlib.sha256(f"{weights_sha}/{chips.shape}/{chips.dtype}/".encode() + chips.tobytes()).hexdigest()
    path = cache_dir / f"{digest[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                targets = stored["targets"]
                if str(stored["digest"]) == digest and targets.shape == (len(chips), EMBEDDING_SIZE):
                    probe = teacher.predict(chip_input(chips[:1]), verbose=0)[0]
                    if float(probe @ targets[0]) > 0.9999:
                        return targets
        except Exception:  # noqa: BLE001 - any unreadable cache file (bad zip, truncated, wrong keys) is recomputed
            pass
    targets = teacher.predict(chip_input(chips), batch_size=64, verbose=0).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # runs sharing the cache never share a temp file
    np.savez(partial, digest=digest, targets=targets)
    partial.replace(path)
    return targets


@keras.saving.register_keras_serializable(package="edge_face")
def slim_distill_loss(target: Any, student: Any) -> Any:
    """Keras' (y_true, y_pred) order for train.distill_loss (1 - cosine to the centred teacher embedding)."""
    return distill_loss(student, target)


class FeatureGap(keras.layers.Layer):
    """Per sample: mean squared gap between the student's map, projected to the teacher's channels, and the
    teacher's map, as a share of the teacher map's mean channel variance (1 = explains nothing, 0 = all of it)."""

    def __init__(self, variance: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.variance = float(variance)

    def call(self, inputs: list[Any]) -> Any:
        projected, target = inputs
        return keras.ops.mean(keras.ops.square(projected - target), axis=(1, 2, 3)) / self.variance


def feature_gap_loss(_: Any, gap: Any) -> Any:
    """A FeatureGap output is its own loss (its target is a dummy zero)."""
    return gap


def feature_trainer(student: keras.Model, teacher: keras.Model, fit_x: np.ndarray) -> tuple[keras.Model, list[float]]:
    """The student with one more output per FEATURE_LAYERS level: its FeatureGap to the frozen `teacher` (the full
    network at the student's chip size, so every map has the same side; the cut's channels are a subset of the
    teacher's) on the same input. Returns the training model and each level's starting gap.

    128 numbers per image are all a student learns from the embedding alone, and the gap between the student and
    the teacher is between *people* (session 9: 1 - cos 0.06 on unseen versions of training people, 0.15 on new
    people); the teacher's maps say how it got there, thousands of numbers per image (FitNets, Romero et al. 2015).
    Each 1x1 projection (student channels → teacher's) starts at its least-squares fit on `fit_x`, so the gaps
    start at what the student's maps already explain rather than at a random projection's error; projections are
    trained with the student and dropped afterwards (the saved model is `student` alone). `teacher` is frozen in
    place.
    """
    teacher_maps = keras.Model(teacher.input, [teacher.get_layer(n).output for n in FEATURE_LAYERS],
                               name="teacher_maps")
    teacher_maps.trainable = False
    student_maps = keras.Model(student.input, [student.get_layer(n).output for n in FEATURE_LAYERS])
    fitted_s = student_maps.predict(fit_x, batch_size=64, verbose=0)
    fitted_t = teacher_maps.predict(fit_x, batch_size=64, verbose=0)
    targets = teacher_maps(student.input)
    outputs, start = [student.output], []
    for name, s_fit, t_fit, target in zip(FEATURE_LAYERS, fitted_s, fitted_t, targets):
        a = np.asarray(s_fit, np.float64).reshape(-1, s_fit.shape[-1])
        b = np.asarray(t_fit, np.float64).reshape(-1, t_fit.shape[-1])
        design = np.c_[a, np.ones(len(a))]  # the last row of the solution is the bias
        solution = np.linalg.lstsq(design, b, rcond=None)[0]
        variance = float(b.var(axis=0).mean())
        start.append(float(np.mean((design @ solution - b) ** 2) / variance))
        projection = keras.layers.Conv2D(b.shape[1], 1, name=f"{name}_to_teacher")
        projected = projection(student.get_layer(name).output)
        projection.set_weights([solution[:-1].astype(np.float32)[None, None], solution[-1].astype(np.float32)])
        outputs.append(FeatureGap(variance, name=f"{name}_gap")([projected, target]))
    return keras.Model(student.input, outputs, name="student_with_teacher_maps"), start


class ChipBatches(keras.utils.PyDataset):
    """Shuffled batches of uint8 chips, normalised as device.face.FACE_SPEC, with their centred teacher targets (and
    a dummy zero per sample for each of `gaps` FeatureGap outputs)."""

    def __init__(self, chips: np.ndarray, targets: np.ndarray, batch: int, seed: int, gaps: int = 0):
        super().__init__()
        self.chips, self.targets, self.batch, self.gaps = chips, targets, batch, gaps
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(chips))

    def __len__(self) -> int:
        return len(self.chips) // self.batch

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray | tuple[np.ndarray, ...]]:
        idx = np.sort(self.order[index * self.batch:(index + 1) * self.batch])
        if not self.gaps:
            return chip_input(self.chips[idx]), self.targets[idx]
        zero = np.zeros(len(idx), np.float32)
        return chip_input(self.chips[idx]), (self.targets[idx],) + (zero,) * self.gaps

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.chips))


def train_slim(out: Path, data_dir: str | Path | None = None, widths: tuple[int, ...] = SLIM_WIDTHS,
               size: int = SLIM_SIZE,
               versions: int = 24, epochs: int = 4, batch: int = 64, learning_rate: float = 1e-3,
               cache_dir: Path = SLIM_CACHE, subset_people: int | None = None, seed: int = 1,
               weights: Path | None = None, init: Path | None = None, first_version: int = 0,
               mixup: float = 0.0, feature_weight: float = 0.0) -> Path:
    """Cut the student from dlib's network, distil it on `versions` augmented versions of every training image, keep
    the epoch with the best validation balanced accuracy (the untrained cut is epoch 0), and save the run.

    `init` continues a finished run's model (its widths, chip size and centre) instead of cutting a new one, and
    `first_version` starts the augmented versions there: a student that has fit versions 0..23 keeps learning from
    versions it has never seen (function matching wants fresh views; on repeated ones the training loss kept falling
    while validation stopped, session 8). The starting model competes as epoch 0, so a run never ships worse.
    `feature_weight` > 0 adds intermediate feature distillation (`feature_trainer`), that weight per level.
    """
    if first_version < 0:
        raise ValueError(f"first_version must be 0 or more, not {first_version}")
    if not 0.0 <= mixup <= 1.0:
        raise ValueError(f"mixup is a share of the samples, 0..1, not {mixup}")
    if not (feature_weight >= 0 and math.isfinite(feature_weight)):
        raise ValueError(f"feature_weight must be a finite number, 0 or more, not {feature_weight}")
    start_model = keras.models.load_model(init, compile=False) if init else None
    if start_model is not None:
        size = int(start_model.input_shape[1])
    net = read_dlib_resnet(Path(weights) if weights else find_weights())
    map_teacher = None
    if feature_weight:  # built before the labelling, so a chip too small for the uncut network fails at once
        try:
            map_teacher = grey_embedder(net, None, chip=size)
        except ValueError as exc:
            raise ValueError(f"--feature-weight needs dlib's whole network at the student's {size} px chip, which "
                             f"is too small for its last down block (112 px works): {exc}") from exc
    seed_everything(seed)
    landmarks = read_dlib_shape_predictor(find_model_file(LANDMARKS_DAT)).to_bytes()
    big, small = aligner_for(CHIP, landmarks), aligner_for(size, landmarks)
    spec = aligned_spec(size)
    people, split = load_lfw(data_dir)
    if subset_people:
        split.train_people = split.train_people[:subset_people]
    images = split.training_images(people)
    items = [(key, path) for name in split.train_people for key, path in images[name].items()]
    originals = load_faces([path for _, path in items])
    keys = [key for key, _ in items]
    teacher = grey_embedder(net, None)

    print(f"teacher targets: {versions} versions of {len(keys):,} training images of {len(split.train_people):,} "
          f"people, aligned at {CHIP} px (teacher) and {size} px (student)", flush=True)
    student_chips, targets = [], []
    for version in tqdm(range(first_version, first_version + versions), desc="versions", unit="version"):
        crops = np.stack([augment(crop, key, version) for crop, key in zip(originals, keys)])
        chips, small_chips = chips_of(crops, (big, small))
        if mixup:
            chips, small_chips = blend(chips, small_chips, mixup, seed=version)
        targets.append(chip_teacher_targets(teacher, chips, cache_dir, net.sha256))
        student_chips.append(small_chips)
        if version == first_version and start_model is None:
            chosen = np.random.default_rng(seed).choice(len(chips), min(SCORE_IMAGES, len(chips)), replace=False)
            scores = channel_scores(teacher, chip_input(chips[np.sort(chosen)]))
    x, raw = np.concatenate(student_chips), np.concatenate(targets)
    if start_model is None:
        centre = raw.mean(axis=0)
        model = grey_embedder(cut(net, scores, widths, size), None, chip=size, centre=centre)
    else:  # the targets keep the direction the model already learnt: centred on its own centre
        model = start_model
        centre = model.get_layer("centre").get_weights()[0]
    y = centred(raw, centre)
    validation = validation_set(split, people)
    val_x = student_inputs(validation.crops, spec, small)
    trainer, gap_start = model, []
    if feature_weight:
        fit = np.sort(np.random.default_rng(seed).choice(len(x), min(FIT_CHIPS, len(x)), replace=False))
        trainer, gap_start = feature_trainer(model, map_teacher, chip_input(x[fit]))
        print("feature gaps at the start (share of the teacher's map variance the student's does not explain): "
              + ", ".join(f"{n} {g:.3f}" for n, g in zip(FEATURE_LAYERS, gap_start)), flush=True)
    batches = ChipBatches(x, y, batch, seed, gaps=len(gap_start))
    warmup = min(WARMUP_STEPS, len(batches))  # the cut starts far from its targets: no full-rate steps at once
    schedule = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, len(batches) * epochs - warmup),
                                                      warmup_target=learning_rate, warmup_steps=warmup)
    trainer.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
                    loss=[slim_distill_loss] + [feature_gap_loss] * len(gap_start),
                    loss_weights=[1.0] + [feature_weight] * len(gap_start))
    what = f"continued from {init}" if init else f"widths {list(widths)}"
    print(f"student: {what} at {size}x{size}, {model.count_params():,} parameters, {count_macs(model):,} MACs; "
          f"{len(x):,} samples, {len(batches)} steps of {batch} per epoch, up to {epochs} epochs", flush=True)

    start = validate(model, validation, val_x, spec)
    best: dict[str, Any] = {"score": start[SELECT_BY], "epoch": 0, "weights": model.get_weights(), "validation": start}
    # Index i of every list is epoch i; epoch 0 (the cut) has no training loss.
    history: dict[str, list[float | None]] = {"epoch": [0], "loss": [None], **{n: [float(v)] for n, v in start.items()}}
    print(f"epoch 0 ({'the starting model' if init else 'the cut, untrained'}): "
          + ", ".join(f"{n} {v:.4f}" for n, v in start.items()), flush=True)
    started = time.time()
    for epoch in range(1, epochs + 1):
        tty = sys.stdout.isatty()
        logs = trainer.fit(batches, initial_epoch=epoch - 1, epochs=epoch, verbose=1 if tty else 0,
                         callbacks=[] if tty else [StepLog(len(batches))])
        val = validate(model, validation, val_x, spec)
        record = {"epoch": epoch, **{n: v[-1] for n, v in logs.history.items()}, **val}
        for name, value in record.items():
            history.setdefault(name, [None] * epoch).append(float(value))  # a loss first logged now: none before
        print(f"epoch {epoch}/{epochs}: " + ", ".join(f"{n} {v:.4f}" for n, v in record.items() if n != "epoch")
              + f" ({time.time() - started:.0f} s)", flush=True)
        if val[SELECT_BY] > best["score"]:
            best = {"score": val[SELECT_BY], "epoch": epoch, "weights": model.get_weights(), "validation": val}
            out.mkdir(parents=True, exist_ok=True)
            model.save(out / CHECKPOINT)
    model.set_weights(best["weights"])
    earlier = run_info(init) if init else {}
    info = {
        "task": "face", "arch": "dlib-resnet-slim", "input": "aligned-chip",
        "widths": earlier.get("widths") if init else list(widths),  # unknown for a model file copied on its own
        "recipe": "cut from dlib's network by mean activation, then distill (1 - cos to the centred teacher "
                  "embedding of the same pixels, aligned at 150 px for the teacher)"
                  + (f"; continued on versions {first_version}..{first_version + versions - 1}" if init else "")
                  + (f", {mixup:.0%} of the samples blended with another face" if mixup else "")
                  + (f"; plus the gap to the teacher's maps (at the student's chip size) at the end of every level, "
                     f"weight {feature_weight} each" if feature_weight else ""),
        "loss_weights": {"distill": 1.0, **({"features": feature_weight} if feature_weight else {})},
        **({"feature_gap_start": dict(zip(FEATURE_LAYERS, gap_start))} if feature_weight else {}),
        "parameters": int(model.count_params()), "macs": count_macs(model),
        "epochs_run": epochs, "best_epoch": best["epoch"],
        "validation_accuracy": best["validation"].get("val_pairs_accuracy"),
        "selected_by": f"{SELECT_BY}: {SELECTION}",
        "validation": {**best["validation"], "images": len(validation.keys),
                       "people": len(set(validation.labels.tolist()))},
        "versions": versions, "first_version": first_version, "mixup": mixup,
        "batch": batch, "learning_rate": learning_rate, "seed": seed,
        "train_samples": int(len(x)), "train_seconds": round(time.time() - started, 1),
        "source": {"file": find_weights().name if weights is None else Path(weights).name, "sha256": net.sha256,
                   "package": "face_recognition_models", "license": "public domain (dlib's model files)"},
        "teacher_targets": "the ported dlib network's embedding of the 150 px chip of the same augmented pixels, "
                           "centred on the training mean (kept in the model's `centre` layer) and re-normalised",
        "split": split.describe(), "preprocessing": spec, "toolchain": toolchain_versions(),
        **({"continued_from": {"model": str(init), "versions": earlier.get("versions"),
                               "first_version": earlier.get("first_version", 0), "epochs_run": earlier.get("epochs_run"),
                               "best_epoch": earlier.get("best_epoch"), "learning_rate": earlier.get("learning_rate")}}
           if init else {}),
    }
    path = save_run(out, model, history, info)
    (out / CHECKPOINT).unlink(missing_ok=True)
    return path
