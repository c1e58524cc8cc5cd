"""A face training pack: everything `training face` needs in one file, for a machine without LFW or dlib.

Distillation needs dlib (host-only, slow) and the LFW folder; a rented GPU machine usually has neither. The
host writes a pack once (`training face-pack`), the GPU machine trains from it (`training face --pack`):
- the training images as their encoded file bytes (~30 MB for LFW's 7,720 training images, where decoded
  crops would be 126 MB), re-decoded and re-augmented on the other side by the same code (`data.augment`);
- the teacher's embedding of every version of every image, aligned by (image, version) rather than by pixel
  hash, so a different JPEG decoder or OpenCV build on the other machine costs rounding, not targets.
  Stored as int8 with one scale (cos >= 0.9998 to the float vectors after centring, measured on LFW);
- the validation images (data.ValidationSet: up to 10 per validation person plus every image a validation pair
  names), the validation pairs and the split's description (evaluation images are not in it: the evaluation
  folds are measured on the host, by the converter).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets.lfw import Pair, Split, frame_face, load_faces
from training.face.data import FaceSet, ValidationSet, person_of, validation_keys, versioned
from training.teacher import TeacherCache, TeacherUnavailable, teacher_embeddings

FORMAT = "edge-face-pack/2"  # /2: the whole validation set, not only the pairs' images


@dataclass
class FacePack:
    """A pack read back: training set (all versions) with targets, validation images and pairs."""

    data: FaceSet
    targets: np.ndarray  # (N, 128) float32 unit vectors, aligned with data
    validation: ValidationSet
    split: dict[str, Any]
    pixels_match: bool  # decoded originals identical to the host's


def _encoded(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    blobs = [np.fromfile(str(p), dtype=np.uint8) for p in paths]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return (np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)), offsets


def _decoded(blob: np.ndarray, offsets: np.ndarray, keys: list[str]) -> np.ndarray:
    from device.images import decode_image

    return np.stack([frame_face(decode_image(blob[a:b], key)) for a, b, key in zip(offsets[:-1], offsets[1:], keys)])


def _digest(crops: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(crops).tobytes()).hexdigest()


def write_pack(path: Path, people: dict, split: Split, versions: int, cache: TeacherCache,
               embed: Callable[[np.ndarray], np.ndarray] | None, workers: int = 1) -> Path:
    """Write the pack; teacher embeddings missing from `cache` are computed with `embed` (in `workers`
    processes), or with `embed=None` are an error naming the install command."""
    images = split.training_images(people)
    items = [(label, key, file) for label, name in enumerate(split.train_people) for key, file in images[name].items()]
    keys = [key for _, key, _ in items]
    labels = np.array([label for label, _, _ in items], np.int32)
    originals = load_faces([file for _, _, file in items])
    data = versioned(originals, labels, keys, versions)
    targets = teacher_embeddings(data.crops, cache, embed, desc="teacher (pack)", workers=workers)
    scale = 127.0 / float(np.abs(targets).max())
    blob, offsets = _encoded([file for _, _, file in items])
    val_keys = validation_keys(split, people)
    val_blob, val_offsets = _encoded([people[person_of(k)][k] for k in val_keys])
    pairs = split.validation_pairs
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, format=np.array(FORMAT), versions=np.array(versions),
             keys=np.array(keys), labels=labels,
             images=blob, offsets=offsets, originals_sha256=np.array(_digest(originals)),
             targets=np.round(targets * scale).astype(np.int8).reshape(len(keys), versions, -1),
             target_scale=np.array(scale, np.float32), teacher_digest=np.array(cache.model_digest),
             validation_keys=np.array(val_keys), validation_images=val_blob, validation_offsets=val_offsets,
             pair_folds=np.array([p.fold for p in pairs], np.int32),
             pair_names=np.array([[p.name1, p.name2] for p in pairs]),
             pair_indices=np.array([[p.index1, p.index2] for p in pairs], np.int32),
             split=np.array(json.dumps(split.describe())))
    return path


def read_pack(path: Path, versions: int | None = None) -> FacePack:
    """Decode and re-augment a pack; `versions` (default all) takes the first N versions of every image."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise TeacherUnavailable(f"{path}: not a readable face training pack ({exc})") from exc
    with data:
        if "format" not in data or str(data["format"]) != FORMAT:
            found = str(data["format"]) if "format" in data else "none"
            raise TeacherUnavailable(f"{path}: format {found}, this code reads {FORMAT}; "
                                     "write it again with `training face-pack` (make face-pack)")
        have = int(data["versions"])
        versions = have if versions is None else versions
        if versions > have:
            raise ValueError(f"{path} holds {have} versions per image; asked for {versions}")
        keys = [str(k) for k in data["keys"]]
        originals = _decoded(data["images"], data["offsets"], keys)
        labels = data["labels"]
        targets = data["targets"][:, :versions].reshape(-1, data["targets"].shape[-1]).astype(np.float32)
        targets /= np.linalg.norm(targets, axis=1, keepdims=True)
        val_keys = [str(k) for k in data["validation_keys"]]
        val_crops = _decoded(data["validation_images"], data["validation_offsets"], val_keys)
        pairs = [Pair(int(f), str(n[0]), int(i[0]), str(n[1]), int(i[1]))
                 for f, n, i in zip(data["pair_folds"], data["pair_names"], data["pair_indices"])]
        split = json.loads(str(data["split"]))
        pixels_match = _digest(originals) == str(data["originals_sha256"])
    face_set = versioned(originals, labels, keys, versions)
    return FacePack(face_set, targets, ValidationSet(val_keys, val_crops, pairs), split, pixels_match)
