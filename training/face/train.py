"""Training the face embedder on LFW's training identities, with identity losses and/or distillation.

Reads top to bottom: losses → recipes → evaluation → the training loop → the recipe comparison.
Losses (weights per recipe):
- `triplet`: FaceNet triplet loss with online semi-hard mining inside each P×K batch;
- `cosface`: large-margin cosine softmax over the training identities (CosFace, s=30, m=0.35);
- `distill`: 1 − cos(student, teacher) to dlib's embedding of the very same pixels;
- `simmatch`: pairwise similarity matching — the batch's student cosine matrix regressed onto the teacher's.
Early stopping watches balanced verification accuracy over every pair of the validation people's images
(identities disjoint from training and evaluation; the fold's 554 pairs.txt pairs alone are too few to rank
close models); the evaluation folds are measured once, at the end, and never steer anything.
Plain Keras 3 (`fit` + `compute_loss`, losses in `keras.ops`): the same code trains on TensorFlow on the host
and on JAX or PyTorch on a GPU machine, from a training pack (pack.py) where LFW and dlib are missing.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from device.face import FACE_SPEC, face_spec
from device.face import embeddings as device_embeddings
from training.common import StepLog, count_macs, save_run, seed_everything, toolchain_versions
from training.datasets import DataNotFoundError
from training.datasets.lfw import Split, find_faces_dir, find_pairs_file, list_people, make_split, read_pairs
from training.face.data import FaceSet, PKSampler, ValidationSet, pair_images, student_inputs, training_set, validation_set
from training.face.metrics import all_pairs_report, best_threshold, pair_distances, roc_auc, verification_report
from training.face.models import ARCHITECTURES, EMBEDDING_SIZE
from training.face.pack import read_pack
from training.face.recipes import RECIPES, TEACHER_LOSSES
from training.teacher import TeacherCache, TeacherUnavailable, load_teacher, teacher_available, teacher_embeddings

TRIPLET_MARGIN = 0.2
COSFACE_SCALE, COSFACE_MARGIN = 30.0, 0.35
DEFAULT_CACHE = Path("build/face/teacher")
CHECKPOINT = "checkpoint-best.keras"  # best validation epoch so far, rewritten while training runs
# The epoch kept is the one with the best balanced accuracy over all validation pairs (see data.ValidationSet).
SELECT_BY = "val_balanced_accuracy"
SELECTION = "max over thresholds of (TAR + TNR) / 2 over every pair of the validation people's images"


def semi_hard_triplet_loss(labels: Any, embeddings: Any, margin: float = TRIPLET_MARGIN) -> Any:
    """FaceNet's online semi-hard mining over every (anchor, positive) pair of the batch.

    For each pair the negative is the closest one still farther than the positive (semi-hard); when none
    is, the farthest negative (gentlest gradient) stands in, as in FaceNet, to avoid collapsing early.
    Distances are squared Euclidean on unit vectors.
    """
    distances = ops.maximum(2.0 - 2.0 * ops.matmul(embeddings, ops.transpose(embeddings)), 0.0)
    same = ops.equal(labels[:, None], labels[None, :])
    negative = ops.logical_not(same)
    positive = ops.logical_and(same, ops.logical_not(ops.cast(ops.eye(ops.shape(labels)[0]), "bool")))
    d_ap = distances[:, :, None]  # [anchor, positive, 1]
    d_an = distances[:, None, :]  # [anchor, 1, negative]
    beyond = ops.logical_and(negative[:, None, :], ops.greater(d_an, d_ap))
    big = ops.max(distances) + 1.0
    semi_hard = ops.min(ops.where(beyond, d_an, big), axis=2)
    farthest = ops.max(ops.where(negative, distances, 0.0), axis=1)[:, None]
    chosen = ops.where(ops.any(beyond, axis=2), semi_hard, ops.broadcast_to(farthest, ops.shape(semi_hard)))
    losses = ops.maximum(distances - chosen + margin, 0.0)
    weights = ops.cast(positive, "float32")
    return ops.sum(losses * weights) / ops.maximum(ops.sum(weights), 1.0)


def cosface_loss(labels: Any, embeddings: Any, centres: Any) -> Any:
    cosine = ops.matmul(embeddings, ops.transpose(ops.normalize(centres, axis=1)))
    onehot = ops.one_hot(labels, ops.shape(centres)[0])
    logits = COSFACE_SCALE * (cosine - COSFACE_MARGIN * onehot)
    return ops.mean(keras.losses.categorical_crossentropy(onehot, logits, from_logits=True))


def distill_loss(student: Any, teacher: Any) -> Any:
    return ops.mean(1.0 - ops.sum(student * teacher, axis=1))


def similarity_matching_loss(student: Any, teacher: Any) -> Any:
    """Match the batch's pairwise cosine matrix: the student keeps the teacher's geometry, not its axes."""
    s = ops.matmul(student, ops.transpose(student))
    t = ops.matmul(teacher, ops.transpose(teacher))
    return ops.mean(ops.square(s - t)) * 10.0


class FaceTrainer(keras.Model):
    """The embedder plus what only training needs (CosFace centres, per-loss trackers), for `fit`.

    Overriding `compute_loss` (not `train_step`) keeps one training step for every Keras backend:
    TensorFlow on the 2-core host, JAX or PyTorch on a GPU machine. Targets arrive as y = (labels, teacher).
    """

    def __init__(self, embedder: keras.Model, weights: dict[str, float], classes: int):
        super().__init__(name="face_trainer")
        self.embedder = embedder
        self.weights_by_loss = dict(weights)
        self.centres = (self.add_weight(shape=(classes, EMBEDDING_SIZE), name="centres",
                                        initializer=keras.initializers.RandomNormal(stddev=0.05))
                        if "cosface" in weights else None)
        self.part_trackers = [keras.metrics.Mean(name=name) for name in weights]

    def call(self, x: Any, training: bool = False) -> Any:
        return self.embedder(x, training=training)

    def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None,
                     training: bool = True) -> Any:
        labels, teacher = y
        parts = {}
        if "triplet" in self.weights_by_loss:
            parts["triplet"] = semi_hard_triplet_loss(labels, y_pred)
        if "cosface" in self.weights_by_loss:
            parts["cosface"] = cosface_loss(labels, y_pred, self.centres)
        if "distill" in self.weights_by_loss:
            parts["distill"] = distill_loss(y_pred, teacher)
        if "simmatch" in self.weights_by_loss:
            parts["simmatch"] = similarity_matching_loss(y_pred, teacher)
        for tracker in self.part_trackers:
            tracker.update_state(parts[tracker.name])
        return sum(self.weights_by_loss[name] * value for name, value in parts.items())


class PKBatches(keras.utils.PyDataset):
    """An epoch of P×K batches drawn by `PKSampler`: x, y = (identity labels, teacher targets)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, targets: np.ndarray, sampler: PKSampler):
        super().__init__()
        self.x, self.labels, self.targets, self.sampler = x, labels.astype(np.int32), targets, sampler

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def __getitem__(self, index: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        idx = self.sampler.batch()
        return self.x[idx], (self.labels[idx], self.targets[idx])


def centred(targets: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Teacher embeddings minus their mean (or a given `mean`, e.g. a trained student's centre), re-normalised.

    dlib's embeddings sit in a narrow cone (mean pairwise cosine ~0.84 on our crops): regressed as they
    are, the student learns the cone's axis and collapses every face onto it (measured: mean pairwise
    cosine 0.99999, chance-level verification). Centring keeps what tells faces apart.
    """
    shifted = targets - (targets.mean(axis=0, keepdims=True) if mean is None else np.asarray(mean)[None])
    return (shifted / np.linalg.norm(shifted, axis=1, keepdims=True)).astype(np.float32)


def embed_keras(model: keras.Model, x: np.ndarray, spec: dict[str, Any] = FACE_SPEC) -> np.ndarray:
    """Embeddings as the device computes them (flip averaging included), so validation picks what ships."""
    return device_embeddings(lambda batch: model.predict(batch, batch_size=256, verbose=0), x, spec)


def verification(embeddings: dict[str, np.ndarray], pairs: list) -> dict[str, Any]:
    """Full LFW-style report on `pairs` (cross-fold accuracy needs >= 2 folds; one fold gets best-threshold)."""
    distances = pair_distances(embeddings, [p.keys() for p in pairs])
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    if len(np.unique(folds)) > 1:
        return verification_report(distances, same, folds)
    threshold, accuracy = best_threshold(distances, same)
    return {"pairs": len(pairs), "accuracy": accuracy, "threshold": threshold, "auc": roc_auc(distances, same)}


def validate(model: keras.Model, validation: ValidationSet, x: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
    """One epoch's validation: all-pairs measures (what selects the epoch) and the fold's pairs.txt accuracy.

    `x` is `validation.crops` as model input, prepared once for the whole run.
    """
    vectors = embed_keras(model, x, spec)
    pairs = verification(dict(zip(validation.keys, vectors)), validation.pairs)
    every = all_pairs_report(vectors, validation.labels)
    record = {"val_balanced_accuracy": every["balanced_accuracy"], "val_auc": every["auc"],
              "val_tar_far_0.1pct": every["tar_far_0.1pct"], "val_pairs_accuracy": pairs["accuracy"]}
    return {name: value for name, value in record.items() if value is not None}  # a small set resolves no 0.1%


def load_lfw(data_dir: str | Path | None) -> tuple[dict, Split]:
    faces_dir = find_faces_dir(data_dir)
    people = list_people(faces_dir)
    split = make_split(people, read_pairs(find_pairs_file(data_dir, faces_dir)))
    if not split.validation_pairs or not split.train_people:
        raise DataNotFoundError(f"{faces_dir} holds none of the people pairs.txt validates on (fold 7) or no one "
                                "left to train on: training follows LFW's protocol, so it needs LFW's people and "
                                "file names (<Name>/<Name>_NNNN.jpg)")
    return people, split


def teacher_targets(crops: np.ndarray, cache_dir: Path, cached_only: bool = False,
                    workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Teacher embeddings of exactly these pixels, and a mask of the samples that have one.

    Normally every target is required (computed where dlib is installed, else read from the cache);
    `cached_only` instead keeps what the cache holds, so a run can start while the teacher is still busy.
    """
    teacher = load_teacher() if teacher_available() else None
    cache = TeacherCache(cache_dir, teacher.model_digest) if teacher else TeacherCache.existing(cache_dir)
    if cached_only:
        found = [cache.get(c) for c in crops]
        mask = np.array([f is not None for f in found])
        if not mask.any():
            raise TeacherUnavailable(f"the teacher cache in {cache_dir} holds none of these images")
        targets = np.stack([f if f is not None else np.zeros(EMBEDDING_SIZE, np.float32) for f in found])
        print(f"teacher targets: {mask.sum():,} of {len(crops):,} samples cached; training on those", flush=True)
        return targets, mask
    targets = teacher_embeddings(crops, cache, teacher.embed if teacher else None, desc="teacher (train)",
                                 workers=workers)
    return targets, np.ones(len(crops), dtype=bool)


def train(out: Path, recipe: str = "distill+triplet", arch: str = "edge", epochs: int = 30, versions: int = 9,
          p: int = 32, k: int = 4, learning_rate: float = 2e-3, patience: int = 8, data_dir: str | Path | None = None,
          cache_dir: Path = DEFAULT_CACHE, subset_people: int | None = None, seed: int = 1,
          evaluate: bool = False, cached_teacher_only: bool = False, teacher_workers: int = 1,
          init: Path | None = None, pack: Path | None = None, width: int | None = None,
          input_size: int | None = None) -> Path:
    """Train one recipe; keep the weights of the epoch with the best balanced accuracy over all validation
    pairs (with `init`, the starting weights compete as epoch 0); save the run.

    `subset_people` trains on the first N training identities only (smoke runs in tests); `init` starts
    from the weights of an earlier run's model.keras (fine-tuning with more teacher versions). `teacher_workers`
    > 1 computes missing teacher embeddings in spawned processes (the command line uses every core), which
    needs the calling script to be import-safe (`if __name__ == "__main__":`). `pack` trains from a
    training pack (see pack.py) instead of the data folder and the teacher cache; it holds no evaluation
    images, so the run is evaluated by the converter only. `width` (edge net) and `input_size` (pixels
    per side, default FACE_SPEC's) size the model; the bundle records the input size it was trained at.
    `evaluate` also measures the evaluation folds (the recipe table asks for them); off by default, so a
    training run shows only the validation people it selects on, and the converter measures what ships.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe '{recipe}'; choose from {', '.join(RECIPES)}")
    if init and not Path(init).is_file():  # checked before the data and teacher (up to hours on a first run)
        raise ValueError(f"--init {init}: no such file")
    if width and arch != "edge":
        raise ValueError(f"--width sizes the edge architecture; '{arch}' has a fixed width")
    weights = RECIPES[recipe]
    seed_everything(seed)
    spec = face_spec(input_size) if input_size else FACE_SPEC
    if pack:
        packed = read_pack(pack, versions)
        print(f"pack {pack}: {len(packed.data.crops):,} samples; decoded pixels "
              + ("identical to the host's" if packed.pixels_match else "differ from the host's (other decoder)"),
              flush=True)
        data, targets, split_info = packed.data, packed.targets, packed.split
        validation = packed.validation
        evaluate = False
    else:
        people, split = load_lfw(data_dir)
        if subset_people:
            split.train_people = split.train_people[:subset_people]
        data = training_set(split, people, versions)
        targets = np.zeros((len(data.crops), EMBEDDING_SIZE), np.float32)
        if TEACHER_LOSSES & set(weights):
            targets, keep = teacher_targets(data.crops, cache_dir, cached_teacher_only, teacher_workers)
            data = FaceSet(data.crops[keep], data.labels[keep], [k for k, m in zip(data.keys, keep) if m],
                           data.versions[keep])
            targets = targets[keep]
        split_info = split.describe()
        validation = validation_set(split, people)
    if TEACHER_LOSSES & set(weights):
        targets = centred(targets)
    x = student_inputs(data.crops, spec)
    val_x = student_inputs(validation.crops, spec)

    size = spec["size"]
    default_width = inspect.signature(ARCHITECTURES[arch]).parameters.get("width")
    width = width or (default_width.default if default_width else None)  # recorded, never null for the edge net
    model = ARCHITECTURES[arch]((size[0], size[1], spec["channels"]), **({"width": width} if width else {}))
    if init:  # fine-tuning: start from a finished run's weights (same architecture) instead of random ones
        try:
            model.set_weights(keras.saving.load_model(init).get_weights())
        except ValueError as exc:
            raise ValueError(f"--init {init}: its weights do not fit the '{arch}' architecture ({exc})") from exc
    if p > len(np.unique(data.labels)):
        raise ValueError(f"--p {p} identities per batch, but only {len(np.unique(data.labels))} people to train on")
    sampler = PKSampler(data.labels, p, k, seed)
    batches = PKBatches(x, data.labels, targets, sampler)
    trainer = FaceTrainer(model, weights, classes=int(data.labels.max()) + 1)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=sampler.steps_per_epoch * epochs)
    # JAX must compile its steps; TensorFlow keeps the plain graph the CPU numbers were measured with.
    trainer.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
                    jit_compile=keras.backend.backend() == "jax")

    print(f"training {model.name} with {recipe} on Keras/{keras.backend.backend()}: {model.count_params():,} "
          f"parameters, {count_macs(model):,} MACs at {size[0]}x{size[1]}, {len(np.unique(data.labels)):,} people, "
          f"{len(x):,} samples ({versions} versions), {sampler.steps_per_epoch} steps of {p}x{k} per epoch, "
          f"up to {epochs} epochs", flush=True)
    history: dict[str, list[float]] = {}
    best: dict[str, Any] = {"score": -1.0, "epoch": 0, "weights": model.get_weights(), "validation": {}}
    if init:  # a fine-tune must not end worse than the model it started from
        start = validate(model, validation, val_x, spec)
        best.update(score=start[SELECT_BY], validation=start)
        print("epoch 0 (--init weights): " + ", ".join(f"{n} {v:.4f}" for n, v in start.items()), flush=True)
    started = time.time()
    for epoch in range(1, epochs + 1):
        # a progress bar on a terminal; in a log (an epoch is 20+ minutes on 2 cores) a line a minute instead
        tty = sys.stdout.isatty()
        logs = trainer.fit(batches, initial_epoch=epoch - 1, epochs=epoch, verbose=1 if tty else 0,
                           callbacks=[] if tty else [StepLog(sampler.steps_per_epoch)])
        val = validate(model, validation, val_x, spec)
        record = {**{n: values[-1] for n, values in logs.history.items()}, **val}
        for name, value in record.items():
            history.setdefault(name, []).append(float(value))
        print(f"epoch {epoch}/{epochs}: " + ", ".join(f"{n} {v:.4f}" for n, v in record.items())
              + f" ({time.time() - started:.0f} s)", flush=True)
        if val[SELECT_BY] > best["score"]:
            best = {"score": val[SELECT_BY], "epoch": epoch, "weights": model.get_weights(), "validation": val}
            out.mkdir(parents=True, exist_ok=True)
            model.save(out / CHECKPOINT)  # hours of CPU are not lost to a killed run
        elif epoch - best["epoch"] >= patience:
            print(f"early stop: {SELECT_BY} has not improved for {patience} epochs", flush=True)
            break
    if not best["validation"]:  # every epoch scored NaN: nothing worth saving, and no number to report
        raise ValueError(f"training diverged: no epoch gave a finite {SELECT_BY}; try a lower --lr")
    model.set_weights(best["weights"])
    seconds = time.time() - started
    info: dict[str, Any] = {
        "task": "face",
        "arch": arch,
        "width": width,
        "recipe": recipe,
        "loss_weights": weights,
        "parameters": model.count_params(),
        "macs": count_macs(model),
        "epochs_run": len(history["loss"]),
        "best_epoch": best["epoch"],
        "validation_accuracy": best["validation"].get("val_pairs_accuracy"),  # the fold's pairs.txt, as before
        "selected_by": f"{SELECT_BY}: {SELECTION}",
        "validation": {**best["validation"], "images": len(validation.keys),
                       "people": len(set(validation.labels.tolist()))},
        "versions": versions,
        "batch": f"{p}x{k}",
        "learning_rate": learning_rate,
        "seed": seed,
        "initialised_from": str(init) if init else None,
        "pack": str(pack) if pack else None,
        "train_samples": int(len(x)),
        "teacher_cached_only": cached_teacher_only,
        "teacher_targets": "dlib embeddings of the same pixels, centred on their training mean and re-normalised",
        "train_seconds": round(seconds, 1),
        "split": split_info,
        "preprocessing": spec,
        "toolchain": toolchain_versions(),
    }
    if evaluate:
        eval_keys, eval_crops = pair_images(split.eval_pairs, people)
        info["keras_eval"] = verification(
            dict(zip(eval_keys, embed_keras(model, student_inputs(eval_crops, spec), spec))), split.eval_pairs)
        print(f"{recipe}: evaluation folds {list(split.eval_folds)}: accuracy {info['keras_eval']['accuracy_mean']:.4f} "
              f"± {info['keras_eval']['accuracy_std']:.4f}, AUC {info['keras_eval']['auc']:.4f} "
              f"({info['keras_eval']['pairs']} pairs)", flush=True)
    path = save_run(out, model, history, info)
    (out / CHECKPOINT).unlink(missing_ok=True)  # superseded by model.keras, written just now
    return path


def compare_recipes(out: Path, recipes: list[str], epochs: int, arch: str = "edge", **kwargs: Any) -> list[dict[str, Any]]:
    """Short runs of several recipes on the same split, data and budget → one table (out/recipes.json).

    Each row holds the validation people's numbers (what a choice between recipes may rest on) and the
    evaluation folds' LFW numbers (what the table reports). Rows of earlier calls with another (recipe, arch)
    are kept, so the seed reference can be added later.
    """
    if kwargs.get("pack"):
        raise ValueError("--compare measures the evaluation folds, which a training pack does not hold: "
                         "run it where the LFW folder is")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:  # before the first run, not after an hour of the others
        raise ValueError(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    table = out / "recipes.json"
    rows = json.loads(table.read_text()) if table.is_file() else []
    for recipe in recipes:
        run = out / (recipe.replace("+", "_") + ("" if arch == "edge" else f"-{arch}"))
        train(run, recipe=recipe, epochs=epochs, arch=arch, evaluate=True, **kwargs)
        info = json.loads((run / "train_info.json").read_text())
        ev = info["keras_eval"]
        rows = [r for r in rows if (r["recipe"], r["arch"]) != (recipe, arch)]
        rows.append({"recipe": recipe, "arch": arch, "parameters": info["parameters"], "epochs": info["epochs_run"],
                     "train_samples": info["train_samples"], "validation_accuracy": info["validation_accuracy"],
                     "validation_balanced_accuracy": info["validation"].get("val_balanced_accuracy"),
                     "accuracy_mean": ev["accuracy_mean"], "accuracy_std": ev["accuracy_std"], "auc": ev["auc"],
                     "tar_far_1pct": ev["tar_far_1pct"],  # 0.1% is beyond what ~850 different pairs resolve
                     "pairs": ev["pairs"], "seconds": info["train_seconds"]})
        table.write_text(json.dumps(rows, indent=2) + "\n")
    return rows
