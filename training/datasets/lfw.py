"""Labeled Faces in the Wild: images by person, the official View 2 pairs, and an identity-disjoint split.

Reads three layouts, all `<Name>/<Name>_NNNN.jpg`:
- `faces/lfw-crop-gray-128` under the data root (grey 128x128 crops of the centre of LFW; the default);
- a standard LFW folder (`lfw/`, `lfw-deepfunneled/`, 250x250 colour): the same central 118 px are cut
  out and resized, so every source looks like the crops the device makes with `device.face.crop_face`;
- any `<person>/<images>` folder of face crops (resized to 128x128 grey), for benchmarks and the door
  lock's tests. Training and the converter follow pairs.txt, so they need LFW's people and file names.

The split is by identity, never by image: a face model evaluated on people it was trained on measures
memory, not verification. Evaluation people are everyone named in the evaluation folds' pairs; they are
removed from training and validation entirely.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.face import CROP_SIZE, resize_gray
from device.images import load_image, to_gray
from training.datasets import DataNotFoundError, data_root

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
CROP_DIR = Path("faces") / "lfw-crop-gray-128"
PAIRS_FILE = Path("faces") / "pairs.txt"
STANDARD_DIRS = (Path("faces") / "lfw", Path("lfw"), Path("faces") / "lfw-deepfunneled", Path("lfw-deepfunneled"))
LFW_ORIGINAL = 250  # side of an original LFW image
LFW_KEPT = 118  # central part of it that our crops keep (see the data README)
EVAL_FOLDS = (8, 9, 10)
VALIDATION_FOLDS = (7,)
# LFW errata that cross our split: a photo filed under a second name, or one person under two names. Found by
# comparing every evaluation image with its nearest training image (pixels and embeddings, checked by eye).
# They are never trained on nor put in a cohort; the evaluation pairs keep them, as the protocol has them.
LFW_DUPLICATE_IMAGES = {
    "Katie_Harman_0002": "Erika_Harold_0003",  # the same photo, one of them mislabelled
    "Gerhard_Schroeder_0073": "Franz_Muentefering_0004",
    "Richard_Lugar_0001": "John_Sununu_0001",
    "Todd_Haynes_0001": "Julianne_Moore",  # her face, filed under the director's name
}
LFW_SAME_PERSON = {"Mireya_Elisa_Moscoso_Rodriguez": "Mireya_Moscoso"}  # full name and short name


@dataclass(frozen=True)
class Pair:
    """One verification pair of the official protocol (fold numbered from 1)."""

    fold: int
    name1: str
    index1: int
    name2: str
    index2: int

    @property
    def same(self) -> bool:
        return self.name1 == self.name2

    def keys(self) -> tuple[str, str]:
        return image_key(self.name1, self.index1), image_key(self.name2, self.index2)


def image_key(name: str, index: int) -> str:
    """LFW's file stem, e.g. `George_W_Bush_0003`; the key every image and pair is referred to by."""
    return f"{name}_{index:04d}"


def find_faces_dir(data_dir: str | Path | None = None) -> Path:
    """The face image folder: `data_dir` itself if it holds `<person>/<images>`, else the known places under it."""
    root = data_root(data_dir)
    candidates = [root / CROP_DIR, *(root / d for d in STANDARD_DIRS), root]
    for candidate in candidates:
        if candidate.is_dir() and _looks_like_people_dir(candidate):
            return candidate
    raise DataNotFoundError(
        "no face images found: looked for <person>/<image>.jpg folders in "
        + ", ".join(str(c) for c in candidates)
        + " (set --data-dir or $EDGE_DATA_DIR)"
    )


def _looks_like_people_dir(path: Path) -> bool:
    for person in sorted(path.iterdir())[:20]:
        if person.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in person.iterdir()):
            return True
    return False


def find_pairs_file(data_dir: str | Path | None = None, faces_dir: Path | None = None) -> Path:
    """pairs.txt under the data root or beside the image folder."""
    root = data_root(data_dir)
    candidates = [root / PAIRS_FILE, root / "pairs.txt"]
    if faces_dir is not None:
        candidates += [faces_dir / "pairs.txt", faces_dir.parent / "pairs.txt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataNotFoundError("LFW pairs.txt not found in " + ", ".join(str(c) for c in candidates))


def list_people(faces_dir: Path) -> dict[str, dict[str, Path]]:
    """{person: {image key: path}} for every image file under `<person>/`, sorted for repeatability."""
    people: dict[str, dict[str, Path]] = {}
    for person in sorted(p for p in faces_dir.iterdir() if p.is_dir()):
        images = {f.stem: f for f in sorted(person.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}
        if images:
            people[person.name] = images
    if not people:
        raise DataNotFoundError(f"{faces_dir} has no <person>/<image> files")
    return people


def read_pairs(path: Path) -> list[Pair]:
    """Parse View 2 `pairs.txt`: a header `folds n`, then per fold n same-person and n different-person lines."""
    lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        folds, per_fold = int(lines[0][0]), int(lines[0][1])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"{path}: first line must be '<folds> <pairs per half-fold>'") from exc
    pairs: list[Pair] = []
    for number, fields in enumerate(lines[1:]):
        fold = number // (2 * per_fold) + 1
        if len(fields) == 3:
            pairs.append(Pair(fold, fields[0], int(fields[1]), fields[0], int(fields[2])))
        elif len(fields) == 4:
            pairs.append(Pair(fold, fields[0], int(fields[1]), fields[2], int(fields[3])))
        else:
            raise ValueError(f"{path}: line {number + 2} is not a pair: {' '.join(fields)}")
    if len(pairs) != folds * 2 * per_fold:
        raise ValueError(f"{path}: expected {folds * 2 * per_fold} pairs, found {len(pairs)}")
    return pairs


def load_face(path: Path) -> np.ndarray:
    """One image → 128x128 grey uint8 framed like lfw-crop-gray-128 (LFW originals get the central 118 px)."""
    return frame_face(load_image(path))


def frame_face(image: np.ndarray) -> np.ndarray:
    """A decoded face image → 128x128 grey uint8 crop (see `load_face`)."""
    gray = to_gray(image)
    if gray.shape == (LFW_ORIGINAL, LFW_ORIGINAL):
        start = (LFW_ORIGINAL - LFW_KEPT) // 2
        gray = gray[start : start + LFW_KEPT, start : start + LFW_KEPT]
    elif gray.shape[0] != gray.shape[1]:
        side = min(gray.shape)
        top, left = (gray.shape[0] - side) // 2, (gray.shape[1] - side) // 2
        gray = gray[top : top + side, left : left + side]
    return resize_gray(gray, CROP_SIZE)


def load_faces(paths: Sequence[Path], progress: bool = True) -> np.ndarray:
    """Stack of 128x128 grey crops (N, 128, 128) uint8."""
    from tqdm import tqdm

    items: Iterable[Path] = tqdm(paths, desc="loading faces", unit="img", mininterval=2) if progress else paths
    return np.stack([load_face(p) for p in items]) if len(paths) else np.zeros((0, CROP_SIZE, CROP_SIZE), np.uint8)


@dataclass
class Split:
    """Identity-disjoint split: who trains, who validates (early stopping), who is only ever evaluated."""

    train_people: list[str]
    validation_people: list[str]
    eval_people: list[str]
    eval_folds: tuple[int, ...]
    validation_folds: tuple[int, ...]
    eval_pairs: list[Pair] = field(default_factory=list)  # official pairs of the eval folds with both images
    validation_pairs: list[Pair] = field(default_factory=list)
    missing_pairs: int = 0  # eval pairs dropped because an image is absent from the folder

    def training_images(self, people: dict[str, dict[str, Path]]) -> dict[str, dict[str, Path]]:
        """{person: {key: path}} of the training people, without the LFW errata (LFW_DUPLICATE_IMAGES)."""
        return {name: {k: p for k, p in people[name].items() if k not in LFW_DUPLICATE_IMAGES}
                for name in self.train_people}

    def describe(self) -> dict:
        return {
            "rule": "identity-disjoint: evaluation people = everyone in the evaluation folds' pairs; validation "
                    "people = everyone else in the validation folds' pairs; training = all remaining people",
            "eval_folds": list(self.eval_folds),
            "validation_folds": list(self.validation_folds),
            "train_people": len(self.train_people),
            "validation_people": len(self.validation_people),
            "eval_people": len(self.eval_people),
            "eval_pairs_used": len(self.eval_pairs),
            "eval_pairs_missing": self.missing_pairs,
            "validation_pairs_used": len(self.validation_pairs),
        }


def make_split(people: dict[str, dict[str, Path]], pairs: list[Pair], eval_folds: Sequence[int] = EVAL_FOLDS,
               validation_folds: Sequence[int] = VALIDATION_FOLDS) -> Split:
    """Split people so that no evaluation identity (hence no evaluation image) reaches training or validation."""
    eval_set = {n for p in pairs if p.fold in eval_folds for n in (p.name1, p.name2)}
    validation_set = {n for p in pairs if p.fold in validation_folds for n in (p.name1, p.name2)} - eval_set

    def present(p: Pair) -> bool:
        return all(key in people.get(name, {}) for name, key in zip((p.name1, p.name2), p.keys()))

    eval_pairs = [p for p in pairs if p.fold in eval_folds]
    usable_eval = [p for p in eval_pairs if present(p)]
    # Validation pairs whose people are also evaluation people would leak through early stopping: drop them.
    validation_pairs = [p for p in pairs if p.fold in validation_folds and present(p)
                        and p.name1 not in eval_set and p.name2 not in eval_set]
    # Someone filed under two names is an evaluation person under both (an erratum, see LFW_SAME_PERSON); someone
    # whose only photos are errata (LFW_DUPLICATE_IMAGES) has nothing left to train on.
    aliases = {alias for alias, name in LFW_SAME_PERSON.items() if name in eval_set | validation_set}
    emptied = {name for name, images in people.items() if images and set(images) <= set(LFW_DUPLICATE_IMAGES)}
    return Split(
        train_people=sorted(set(people) - eval_set - validation_set - aliases - emptied),
        validation_people=sorted(validation_set & set(people)),
        eval_people=sorted(eval_set & set(people)),
        eval_folds=tuple(eval_folds),
        validation_folds=tuple(validation_folds),
        eval_pairs=usable_eval,
        validation_pairs=validation_pairs,
        missing_pairs=len(eval_pairs) - len(usable_eval),
    )
