"""Training data for the face embedder: fixed augmented versions of each crop, and P×K identity batches.

Augmentation is *materialised*: version 0 of an image is the crop itself, version v >= 1 is a seeded
random jitter (v odd: also mirrored) of it. The teacher embeds exactly these pixels once (cached), and
the student trains on exactly the same pixels, so a distillation target always belongs to its input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

from device.face import Aligner, face_input
from training.datasets.lfw import Pair, Split, load_faces

# Images per validation person in the all-pairs measure: enough genuine pairs from everyone, without
# letting the few people with 50+ photos supply most of them.
VALIDATION_PER_PERSON = 10


def augment(crop: np.ndarray, key: str, version: int) -> np.ndarray:
    """Version `version` of a 128x128 grey crop; deterministic in (key, version) so caches stay valid.

    Jitter stays within what a Haar box and a door camera vary by: shift ±4 px, rotation ±8°, scale ±6%,
    brightness ±20, contrast ×0.8–1.2, and a Gaussian blur (σ 0.6–1.2) in a third of the versions.
    """
    if version == 0:
        return crop
    seed = int.from_bytes(hashlib.sha256(f"{key}/{version}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    image = crop[:, ::-1] if version % 2 == 1 else crop
    size = image.shape[0]
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-8, 8), rng.uniform(0.94, 1.06))
    matrix[:, 2] += rng.uniform(-4, 4, size=2)
    image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    if rng.uniform() < 1 / 3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.6, 1.2))
    image = image.astype(np.float32)
    image = (image - image.mean()) * rng.uniform(0.8, 1.2) + image.mean() + rng.uniform(-20, 20)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def student_inputs(crops: np.ndarray, spec: dict, aligner: Aligner | None = None) -> np.ndarray:
    """128x128 crops → float model input, through the device's own preprocessing (and alignment, for a spec with
    `align`)."""
    return np.stack([face_input(c, spec, aligner) for c in crops]).astype(np.float32)


@dataclass
class FaceSet:
    """Crops (all versions) of a set of people, with identity labels and LFW keys."""

    crops: np.ndarray  # (N, 128, 128) uint8
    labels: np.ndarray  # (N,) int identity index
    keys: list[str]  # LFW key of the source image (e.g. Name_0001)
    versions: np.ndarray  # (N,) augmentation version


def training_set(split: Split, people: dict, versions: int) -> FaceSet:
    """Every image of every training person, in `versions` versions (0 = the original)."""
    images = split.training_images(people)
    items = [(label, key, path) for label, name in enumerate(split.train_people)
             for key, path in images[name].items()]
    originals = load_faces([path for _, _, path in items])
    return versioned(originals, np.array([label for label, _, _ in items]), [key for _, key, _ in items], versions)


def versioned(originals: np.ndarray, labels: np.ndarray, keys: list[str], versions: int) -> FaceSet:
    """Versions 0..versions-1 of every crop, image by image (the order teacher targets are stored in)."""
    crops = [augment(crop, key, v) for crop, key in zip(originals, keys) for v in range(versions)]
    return FaceSet(np.stack(crops), np.repeat(labels, versions), [k for k in keys for _ in range(versions)],
                   np.tile(np.arange(versions), len(keys)))


def pair_images(pairs: list, people: dict) -> tuple[list[str], np.ndarray]:
    """The distinct images named by `pairs`: their keys and 128x128 crops."""
    keys = sorted({k for p in pairs for k in p.keys()})
    paths = [people[person_of(k)][k] for k in keys]
    return keys, load_faces(paths)


def person_of(key: str) -> str:
    """The person an LFW key (Name_0001) belongs to."""
    return key.rsplit("_", 1)[0]


@dataclass
class ValidationSet:
    """Validation people's images with identity labels, and the validation fold's pairs among them.

    Model selection scores every pair of these images (LFW fold 7: 1,101 images, 605,550 pairs, 2,799 genuine)
    rather than only the fold's 554 pairs.txt pairs, on which models within ~1 pp swap places by chance.
    """

    keys: list[str]
    crops: np.ndarray  # (N, 128, 128) uint8
    pairs: list[Pair]

    @property
    def labels(self) -> np.ndarray:
        names = sorted({person_of(k) for k in self.keys})
        index = {name: i for i, name in enumerate(names)}
        return np.array([index[person_of(k)] for k in self.keys], np.int32)


def validation_keys(split: Split, people: dict, per_person: int = VALIDATION_PER_PERSON) -> list[str]:
    """The first `per_person` images of every validation person plus every image a validation pair names."""
    named = {k for p in split.validation_pairs for k in p.keys()}
    return sorted(named | {k for name in split.validation_people for k in sorted(people[name])[:per_person]})


def validation_set(split: Split, people: dict, per_person: int = VALIDATION_PER_PERSON) -> ValidationSet:
    keys = validation_keys(split, people, per_person)
    return ValidationSet(keys, load_faces([people[person_of(k)][k] for k in keys]), split.validation_pairs)


class PKSampler:
    """Batches of P identities × K samples each, as triplet and margin losses need positives in the batch."""

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int):
        self.by_label = [np.flatnonzero(labels == label) for label in range(int(labels.max()) + 1)]
        self.by_label = [indices for indices in self.by_label if len(indices)]
        self.p, self.k = p, k
        self.rng = np.random.default_rng(seed)
        self.steps_per_epoch = max(1, len(labels) // (p * k))

    def batch(self) -> np.ndarray:
        chosen = self.rng.choice(len(self.by_label), self.p, replace=False)
        return np.concatenate([
            self.rng.choice(self.by_label[c], self.k, replace=len(self.by_label[c]) < self.k) for c in chosen
        ])

