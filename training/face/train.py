"""Training the face embedder on LFW's training identities, with identity losses and/or distillation.

Reads top to bottom: losses → recipes → evaluation → the training loop → the recipe comparison.
Losses (weights per recipe):
- `triplet`: FaceNet triplet loss with online semi-hard mining inside each P×K batch;
- `cosface`: large-margin cosine softmax over the training identities (CosFace, s=30, m=0.35);
- `distill`: 1 − cos(student, teacher) to dlib's embedding of the very same pixels;
- `simmatch`: pairwise similarity matching — the batch's student cosine matrix regressed onto the teacher's.
Early stopping watches verification accuracy on the validation fold (identities disjoint from training
and evaluation); the evaluation folds are measured once, at the end, and never steer anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from device.face import FACE_SPEC
from device.face import embeddings as device_embeddings
from training.common import count_macs, save_run, seed_everything, toolchain_versions
from training.datasets.lfw import Split, find_faces_dir, find_pairs_file, list_people, make_split, read_pairs
from training.face.data import FaceSet, PKSampler, pair_images, student_inputs, training_set
from training.face.metrics import best_threshold, pair_distances, roc_auc, verification_report
from training.face.models import ARCHITECTURES, EMBEDDING_SIZE
from training.face.recipes import RECIPES, TEACHER_LOSSES
from training.teacher import TeacherCache, TeacherUnavailable, load_teacher, teacher_available, teacher_embeddings

TRIPLET_MARGIN = 0.2
COSFACE_SCALE, COSFACE_MARGIN = 30.0, 0.35
DEFAULT_CACHE = Path("build/face/teacher")
CHECKPOINT = "checkpoint-best.keras"  # best validation epoch so far, rewritten while training runs


def semi_hard_triplet_loss(labels: tf.Tensor, embeddings: tf.Tensor, margin: float = TRIPLET_MARGIN) -> tf.Tensor:
    """FaceNet's online semi-hard mining over every (anchor, positive) pair of the batch.

    For each pair the negative is the closest one still farther than the positive (semi-hard); when none
    is, the farthest negative (gentlest gradient) stands in, as in FaceNet, to avoid collapsing early.
    Distances are squared Euclidean on unit vectors.
    """
    distances = tf.maximum(2.0 - 2.0 * tf.matmul(embeddings, embeddings, transpose_b=True), 0.0)
    same = tf.equal(labels[:, None], labels[None, :])
    negative = tf.logical_not(same)
    positive = tf.logical_and(same, tf.logical_not(tf.eye(tf.shape(labels)[0], dtype=tf.bool)))
    d_ap = distances[:, :, None]  # [anchor, positive, 1]
    d_an = distances[:, None, :]  # [anchor, 1, negative]
    beyond = tf.logical_and(negative[:, None, :], d_an > d_ap)
    big = tf.reduce_max(distances) + 1.0
    semi_hard = tf.reduce_min(tf.where(beyond, d_an, big), axis=2)
    farthest = tf.reduce_max(tf.where(negative, distances, 0.0), axis=1)[:, None]
    chosen = tf.where(tf.reduce_any(beyond, axis=2), semi_hard, tf.broadcast_to(farthest, tf.shape(semi_hard)))
    losses = tf.maximum(distances - chosen + margin, 0.0)
    weights = tf.cast(positive, tf.float32)
    return tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def cosface_loss(labels: tf.Tensor, embeddings: tf.Tensor, centres: tf.Variable) -> tf.Tensor:
    cosine = tf.matmul(embeddings, tf.math.l2_normalize(centres, axis=1), transpose_b=True)
    onehot = tf.one_hot(labels, tf.shape(centres)[0])
    logits = COSFACE_SCALE * (cosine - COSFACE_MARGIN * onehot)
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(onehot, logits))


def distill_loss(student: tf.Tensor, teacher: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(1.0 - tf.reduce_sum(student * teacher, axis=1))


def similarity_matching_loss(student: tf.Tensor, teacher: tf.Tensor) -> tf.Tensor:
    """Match the batch's pairwise cosine matrix: the student keeps the teacher's geometry, not its axes."""
    s = tf.matmul(student, student, transpose_b=True)
    t = tf.matmul(teacher, teacher, transpose_b=True)
    return tf.reduce_mean(tf.square(s - t)) * 10.0


def centred(targets: np.ndarray) -> np.ndarray:
    """Teacher embeddings minus their mean, re-normalised.

    dlib's embeddings sit in a narrow cone (mean pairwise cosine ~0.84 on our crops): regressed as they
    are, the student learns the cone's axis and collapses every face onto it (measured: mean pairwise
    cosine 0.99999, chance-level verification). Centring keeps what tells faces apart.
    """
    shifted = targets - targets.mean(axis=0, keepdims=True)
    return (shifted / np.linalg.norm(shifted, axis=1, keepdims=True)).astype(np.float32)


def embed_keras(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Embeddings as the device computes them (flip averaging included), so validation picks what ships."""
    return device_embeddings(lambda batch: model.predict(batch, batch_size=256, verbose=0), x, FACE_SPEC)


def verification(embeddings: dict[str, np.ndarray], pairs: list) -> dict[str, Any]:
    """Full LFW-style report on `pairs` (cross-fold accuracy needs >= 2 folds; one fold gets best-threshold)."""
    distances = pair_distances(embeddings, [p.keys() for p in pairs])
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    if len(np.unique(folds)) > 1:
        return verification_report(distances, same, folds)
    threshold, accuracy = best_threshold(distances, same)
    return {"pairs": len(pairs), "accuracy": accuracy, "threshold": threshold, "auc": roc_auc(distances, same)}


def load_lfw(data_dir: str | Path | None) -> tuple[dict, Split]:
    faces_dir = find_faces_dir(data_dir)
    people = list_people(faces_dir)
    return people, make_split(people, read_pairs(find_pairs_file(data_dir, faces_dir)))


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


def train(out: Path, recipe: str = "distill+triplet", arch: str = "edge", epochs: int = 18, versions: int = 6,
          p: int = 32, k: int = 4, learning_rate: float = 2e-3, patience: int = 6, data_dir: str | Path | None = None,
          cache_dir: Path = DEFAULT_CACHE, subset_people: int | None = None, seed: int = 1,
          evaluate: bool = True, cached_teacher_only: bool = False, teacher_workers: int = 1,
          init: Path | None = None) -> Path:
    """Train one recipe; keep the weights of the epoch with the best validation accuracy; save the run.

    `subset_people` trains on the first N training identities only (smoke runs in tests); `init` starts
    from the weights of an earlier run's model.keras (fine-tuning with more teacher versions). `teacher_workers`
    > 1 computes missing teacher embeddings in spawned processes (the command line uses every core), which
    needs the calling script to be import-safe (`if __name__ == "__main__":`).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe '{recipe}'; choose from {', '.join(RECIPES)}")
    weights = RECIPES[recipe]
    seed_everything(seed)
    people, split = load_lfw(data_dir)
    if subset_people:
        split.train_people = split.train_people[:subset_people]
    data = training_set(split, people, versions)
    if TEACHER_LOSSES & set(weights):
        targets, keep = teacher_targets(data.crops, cache_dir, cached_teacher_only, teacher_workers)
        data = FaceSet(data.crops[keep], data.labels[keep], [k for k, m in zip(data.keys, keep) if m],
                       data.versions[keep])
        targets = centred(targets[keep])
    else:
        targets = np.zeros((len(data.crops), EMBEDDING_SIZE), np.float32)
    x = student_inputs(data.crops, FACE_SPEC)
    val_keys, val_crops = pair_images(split.validation_pairs, people)
    val_x = student_inputs(val_crops, FACE_SPEC)

    size = FACE_SPEC["size"]
    model = ARCHITECTURES[arch]((size[0], size[1], FACE_SPEC["channels"]))
    if init:  # fine-tuning: start from a finished run's weights (same architecture) instead of random ones
        try:
            model.set_weights(keras.saving.load_model(init).get_weights())
        except ValueError as exc:
            raise ValueError(f"--init {init}: its weights do not fit the '{arch}' architecture ({exc})") from exc
    sampler = PKSampler(data.labels, p, k, seed)
    steps = sampler.steps_per_epoch * epochs
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps, warmup_target=None)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=1e-4)
    centres = tf.Variable(tf.random.normal((int(data.labels.max()) + 1, EMBEDDING_SIZE), stddev=0.05), name="centres")
    variables = model.trainable_variables + ([centres] if "cosface" in weights else [])

    @tf.function
    def step(xb: tf.Tensor, yb: tf.Tensor, tb: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as tape:
            e = model(xb, training=True)
            parts = {}
            if "triplet" in weights:
                parts["triplet"] = semi_hard_triplet_loss(yb, e)
            if "cosface" in weights:
                parts["cosface"] = cosface_loss(yb, e, centres)
            if "distill" in weights:
                parts["distill"] = distill_loss(e, tb)
            if "simmatch" in weights:
                parts["simmatch"] = similarity_matching_loss(e, tb)
            total = tf.add_n([weights[name] * value for name, value in parts.items()])
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        return {"loss": total, **parts}

    print(f"training {model.name} with {recipe}: {model.count_params():,} parameters, {count_macs(model):,} MACs, "
          f"{len(np.unique(data.labels)):,} people, {len(x):,} samples ({versions} versions), "
          f"{sampler.steps_per_epoch} steps of {p}x{k} per epoch, up to {epochs} epochs", flush=True)
    history: dict[str, list[float]] = {}
    best = {"accuracy": -1.0, "epoch": 0, "weights": model.get_weights()}
    started = time.time()
    for epoch in range(1, epochs + 1):
        sums: dict[str, float] = {}
        for _ in range(sampler.steps_per_epoch):
            idx = sampler.batch()
            for name, value in step(x[idx], data.labels[idx], targets[idx]).items():
                sums[name] = sums.get(name, 0.0) + float(value)
        val = verification(dict(zip(val_keys, embed_keras(model, val_x))), split.validation_pairs)
        record = {**{n: v / sampler.steps_per_epoch for n, v in sums.items()},
                  "val_accuracy": val["accuracy"], "val_auc": val["auc"]}
        for name, value in record.items():
            history.setdefault(name, []).append(float(value))
        print(f"epoch {epoch}/{epochs}: " + ", ".join(f"{n} {v:.4f}" for n, v in record.items())
              + f" ({time.time() - started:.0f} s)", flush=True)
        if val["accuracy"] > best["accuracy"]:
            best = {"accuracy": val["accuracy"], "epoch": epoch, "weights": model.get_weights()}
            out.mkdir(parents=True, exist_ok=True)
            model.save(out / CHECKPOINT)  # hours of CPU are not lost to a killed run
        elif epoch - best["epoch"] >= patience:
            print(f"early stop: validation accuracy has not improved for {patience} epochs", flush=True)
            break
    model.set_weights(best["weights"])
    seconds = time.time() - started
    info: dict[str, Any] = {
        "task": "face",
        "arch": arch,
        "recipe": recipe,
        "loss_weights": weights,
        "parameters": model.count_params(),
        "macs": count_macs(model),
        "epochs_run": len(history["loss"]),
        "best_epoch": best["epoch"],
        "validation_accuracy": best["accuracy"],
        "versions": versions,
        "batch": f"{p}x{k}",
        "learning_rate": learning_rate,
        "seed": seed,
        "initialised_from": str(init) if init else None,
        "train_samples": int(len(x)),
        "teacher_cached_only": cached_teacher_only,
        "teacher_targets": "dlib embeddings of the same pixels, centred on their training mean and re-normalised",
        "train_seconds": round(seconds, 1),
        "split": split.describe(),
        "preprocessing": FACE_SPEC,
        "toolchain": toolchain_versions(),
    }
    if evaluate:
        eval_keys, eval_crops = pair_images(split.eval_pairs, people)
        info["keras_eval"] = verification(dict(zip(eval_keys, embed_keras(model, student_inputs(eval_crops, FACE_SPEC)))),
                                          split.eval_pairs)
        print(f"{recipe}: evaluation folds {list(split.eval_folds)}: accuracy {info['keras_eval']['accuracy_mean']:.4f} "
              f"± {info['keras_eval']['accuracy_std']:.4f}, AUC {info['keras_eval']['auc']:.4f} "
              f"({info['keras_eval']['pairs']} pairs)", flush=True)
    path = save_run(out, model, history, info)
    (out / CHECKPOINT).unlink(missing_ok=True)  # superseded by model.keras, written just now
    return path


def compare_recipes(out: Path, recipes: list[str], epochs: int, arch: str = "edge", **kwargs: Any) -> list[dict[str, Any]]:
    """Short runs of several recipes on the same split, data and budget → one table (out/recipes.json).

    Rows of earlier calls with another (recipe, arch) are kept, so the seed reference can be added later.
    """
    table = out / "recipes.json"
    rows = json.loads(table.read_text()) if table.is_file() else []
    for recipe in recipes:
        run = out / (recipe.replace("+", "_") + ("" if arch == "edge" else f"-{arch}"))
        train(run, recipe=recipe, epochs=epochs, arch=arch, **kwargs)
        info = json.loads((run / "train_info.json").read_text())
        ev = info["keras_eval"]
        rows = [r for r in rows if (r["recipe"], r["arch"]) != (recipe, arch)]
        rows.append({"recipe": recipe, "arch": arch, "parameters": info["parameters"], "epochs": info["epochs_run"],
                     "train_samples": info["train_samples"], "validation_accuracy": info["validation_accuracy"],
                     "accuracy_mean": ev["accuracy_mean"], "accuracy_std": ev["accuracy_std"], "auc": ev["auc"],
                     "tar_far_1pct": ev["tar_far_1pct"], "tar_far_0.1pct": ev["tar_far_0.1pct"],
                     "pairs": ev["pairs"], "seconds": info["train_seconds"]})
        table.write_text(json.dumps(rows, indent=2) + "\n")
    return rows
