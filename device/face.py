"""Face embeddings on the device: crop a detected face the way the training crops were made, embed it,
compare two embeddings against the threshold calibrated for the model that is actually running.

The embedder was trained on `lfw-crop-gray-128`: grey 128x128 crops that are the central ~118 px of
LFW's 250x250 originals, which are themselves centred on an OpenCV Haar (Viola-Jones) detection
enlarged ~2.2x (so the detector box is ~114 of the 250 px). `crop_face` reproduces that framing from a
Haar box on any camera frame, because an embedder only works on crops framed like its training data.

Thresholds are Euclidean distances between unit embeddings (accept when distance <= threshold). Each
model variant's entry in the manifest carries the thresholds calibrated on that variant (int8 and float
differ slightly); the top-level `thresholds` are those of the default int8 model. `threshold()` always
answers for the model this object runs. A bundle may also carry a cohort for score normalisation
(`Cohort`) with its own thresholds on the normalised score (`score_threshold()`; accept when score >= it).

A bundle whose preprocessing has `align` (models/face-resnet: dlib's network, trained on aligned chips; models/face:
the student cut from it) also carries dlib's 5-point landmark model: `Aligner` finds the eyes and nose in the 128x128
crop and resamples the chip dlib would cut (device/landmarks.py; 150x150, or the student's 112x112), which is what
the model then sees.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from device.bundle import Bundle, BundleError, sha256_file
from device.images import ImageError, check_image, to_gray
from device.landmarks import ShapePredictor, chip_transform
from device.preprocess import normalize
from device.runtime import Model

CROP_SIZE = 128
# Side of the training crop relative to the Haar box: LFW keeps ~118 px around a ~114 px detection.
CROP_TO_BOX = 118.0 / 114.0
THRESHOLD_NAMES = ("far_0.1pct", "far_0.001pct", "best_accuracy")
# How a 128x128 crop becomes embedder input; written into each face bundle's manifest, which is what the
# device reads (this default is what training uses). 96x96 grey: the shipped model (width 64 at 96 px) beat
# width 48 at 64 px on the validation fold (96.4% vs 95.8%) at ~4x the MACs, still ~2x below 128x128.
FACE_SPEC: dict[str, Any] = {
    "kind": "face-crop-gray",
    "size": [96, 96],
    "channels": 1,
    "scale": 1.0 / 127.5,
    "offset": -1.0,
    "crop": "device.face.crop_face: square centred on the Haar box, side = 118/114 of the box, 128x128 grey, "
            "then resized to `size` with area interpolation",
    # The embedding is the mean direction of the crop's and its mirror image's outputs (see `embedding`).
    "flip_average": True,
}


def face_spec(side: int) -> dict[str, Any]:
    """FACE_SPEC for a model whose input is `side` pixels square (the bundle records the one it was built with)."""
    return {**FACE_SPEC, "size": [int(side), int(side)]}


# Where dlib's 5-point landmark model looks for the face in a 128x128 crop: the median box (left, top, right,
# bottom, inclusive) of dlib's own HOG face detector on 400 LFW crops, which is the kind of box the landmark model was
# trained with (a Haar box is wider and higher). The crop is centred on the Haar box, so this is fixed in the crop.
ALIGN_BOX = (8, 19, 112, 123)
CHIP_SIZE, CHIP_PADDING = 150, 0.25  # dlib's face chip: get_face_chip_details(shape, 150, 0.25)
LANDMARKS_FILE = "landmarks_5pt.npz"


def aligned_spec(chip: int = CHIP_SIZE) -> dict[str, Any]:
    """The preprocessing of a model that takes dlib's aligned chip at `chip` px a side (150: dlib's own network;
    smaller: a student distilled from it, training/face/slim.py)."""
    return {
        **FACE_SPEC,
        "kind": "face-chip-5pt",
        "size": [chip, chip],
        "crop": "device.face.crop_face of the Haar box (128x128 grey), then device.face.Aligner: dlib's 5-point "
                f"landmarks in `align.box` and the similarity transform to dlib's {chip}x{chip} chip (padding "
                f"{CHIP_PADDING}), bilinear, 0 outside",
        "align": {"landmarks": LANDMARKS_FILE, "crop": CROP_SIZE, "box": list(ALIGN_BOX), "chip": chip,
                  "padding": CHIP_PADDING},
    }


ALIGNED_SPEC = aligned_spec()


@dataclass
class Aligner:
    """A face crop → the aligned chip an `align` bundle's model was made for (dlib's alignment, without dlib).

    The landmarks come from dlib's own 5-point model, ported to numpy (`device.landmarks`, ~0.7 ms per face), and
    the chip from OpenCV's warpAffine with dlib's transform (within ~1 grey level of dlib's own chip).
    """

    predictor: ShapePredictor
    digest: str  # sha256 of the landmark-model bytes it was built from (part of FaceEmbedder.identity)
    crop: int = CROP_SIZE
    box: tuple[float, float, float, float] = ALIGN_BOX
    size: int = CHIP_SIZE
    padding: float = CHIP_PADDING

    def __post_init__(self) -> None:
        """Refuse geometry that would fail or silently degrade on every frame (a damaged manifest's `align`)."""
        left, top, right, bottom = self.box
        if not (isinstance(self.crop, int) and self.crop > 1 and isinstance(self.size, int) and self.size > 1):
            raise ValueError(f"crop {self.crop!r} and chip {self.size!r} must be whole numbers of pixels above 1")
        if not (0 <= left < right < self.crop and 0 <= top < bottom < self.crop):
            raise ValueError(f"landmark box {self.box} must lie inside the {self.crop}x{self.crop} crop")
        if not (np.isfinite(self.padding) and 0 <= self.padding <= 2):
            raise ValueError(f"chip padding {self.padding} must be between 0 and 2")

    @classmethod
    def from_spec(cls, spec: dict[str, Any], read: Callable[[str], bytes]) -> "Aligner":
        """The aligner a bundle's preprocessing names; `read(file name)` gives the landmark model's checked bytes.

        The chip must be the model input the spec names (`size`), or every frame would fail at the interpreter.
        """
        align = spec["align"]
        box = tuple(float(v) for v in align["box"])
        if len(box) != 4 or not all(np.isfinite(box)):
            raise ValueError(f"landmark box {align['box']!r} must be four numbers (left, top, right, bottom)")
        if [int(align["chip"])] * 2 != [int(v) for v in spec["size"]]:
            raise ValueError(f"chip {align['chip']!r} is not the model input size {spec['size']!r}")
        data = read(align["landmarks"])
        return cls(ShapePredictor.load(io.BytesIO(data)), hashlib.sha256(data).hexdigest(), int(align["crop"]),
                   (box[0], box[1], box[2], box[3]), int(align["chip"]), float(align["padding"]))

    def landmarks(self, gray: np.ndarray) -> np.ndarray:
        """dlib's 5 landmarks of a grey face crop (any size; brought to `crop` px first), in `crop` px."""
        return self.predictor.predict(resize_gray(gray, self.crop), self.box)

    def chip(self, gray: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        """A grey face crop (any size; brought to `crop` px first) → the size x size aligned grey chip.

        `landmarks` (this crop's, from `landmarks()` of an aligner with the same landmark model and box) saves finding
        them again when one face is cut at two chip sizes (training cuts the teacher's and the student's).
        """
        gray = resize_gray(gray, self.crop)
        points = self.landmarks(gray) if landmarks is None else landmarks
        matrix = chip_transform(points, self.size, self.padding)
        return cv2.warpAffine(gray, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def crop_face(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """A BGR or grey frame plus a detector box (x, y, w, h) → 128x128 grey uint8 crop framed like our LFW crops.

    Geometry: a square centred on the box centre, side = max(w, h) * 118/114 (the LFW crop keeps ~118 px
    around the ~114 px Haar box), resized to 128x128 (area interpolation when shrinking). Where the square
    leaves the frame the border pixels are repeated (edge padding) rather than filled with black, so a face at
    the edge of the frame does not get a hard artificial edge the model never saw in training.
    """
    gray = to_gray(check_image(image, "frame"))
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"face box must be four numbers (x, y, w, h), got {box!r}") from exc
    if w <= 0 or h <= 0:
        raise ImageError(f"face box {box!r} has no area")
    side = max(1, int(round(max(w, h) * CROP_TO_BOX)))
    x0 = int(round(x + w / 2 - side / 2))
    y0 = int(round(y + h / 2 - side / 2))
    height, width = gray.shape
    if x0 >= width or y0 >= height or x0 + side <= 0 or y0 + side <= 0:
        raise ImageError(f"face box {box!r} lies outside the {width}x{height} frame")
    pad_left, pad_top = max(0, -x0), max(0, -y0)
    pad_right, pad_bottom = max(0, x0 + side - width), max(0, y0 + side - height)
    region = gray[max(0, y0) : min(height, y0 + side), max(0, x0) : min(width, x0 + side)]
    if pad_left or pad_top or pad_right or pad_bottom:
        region = cv2.copyMakeBorder(region, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_REPLICATE)
    return resize_gray(region, CROP_SIZE)


def resize_gray(gray: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Grey image → height x width (square by default); area averaging when shrinking avoids aliasing."""
    width = height if width is None else width
    if gray.shape == (height, width):
        return gray
    interpolation = cv2.INTER_AREA if gray.shape[0] > height else cv2.INTER_LINEAR
    return cv2.resize(gray, (width, height), interpolation=interpolation)


def face_input(face_crop: np.ndarray, spec: dict[str, Any], aligner: Aligner | None = None) -> np.ndarray:
    """A face crop (grey or BGR, any size, framed like `crop_face`) → float model input per the bundle's spec.

    Shared by the device and the converter's measurements, so the number in the report is the number
    the device gets. A spec with `align` needs the bundle's `aligner`.
    """
    gray = to_gray(check_image(face_crop, "face crop"))
    if "align" in spec:
        if aligner is None:
            raise ValueError("this face model takes aligned chips: give face_input the bundle's Aligner "
                             "(FaceEmbedder.from_bundle loads it)")
        return normalize(aligner.chip(gray), spec)
    height, width = (int(v) for v in spec["size"])
    return normalize(resize_gray(gray, height, width), spec)


def unit(vector: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy; int8 outputs are dequantised and only approximately unit length."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise ValueError("embedding is all zeros; cannot normalise it")
    return vector / norm


def mirror(x: np.ndarray) -> np.ndarray:
    """Model input(s) shaped (..., height, width, channels) mirrored left-right."""
    return x[..., ::-1, :]


def embedding(output: np.ndarray, mirrored_output: np.ndarray | None = None) -> np.ndarray:
    """The unit embedding from the model's output for a crop and, with flip averaging, for its mirror image.

    A face and its mirror image are the same person, but a small network does not give them the same
    vector; their mean direction cancels part of that noise (measured on the validation fold with the
    first shipped model: verification accuracy 84.3% → 86.1%, AUC 0.907 → 0.928) for a second inference.
    Bundles whose preprocessing has `flip_average` use it, and the converter measures exactly this.
    """
    vector = unit(output)
    return vector if mirrored_output is None else unit(vector + unit(mirrored_output))


def embeddings(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Unit embeddings of a batch of model inputs (N, H, W, C), `run` mapping inputs to raw outputs (N, D).

    The one definition of "the embedding" for the device, the converter's measurements and the gate.
    """
    outputs = run(x)
    mirrored = run(mirror(x)) if spec.get("flip_average") else [None] * len(outputs)
    return np.stack([embedding(o, m) for o, m in zip(outputs, mirrored)])


def threshold_at_far(impostor_distances: np.ndarray, far: float) -> float:
    """Largest threshold that accepts at most `far` of the impostor (different-person) pairs.

    With n impostors it accepts floor(far * n) of them (fewer where distances tie across that line); the
    threshold sits halfway to the next impostor so that float noise cannot move a pair across it.
    """
    ordered = np.sort(np.asarray(impostor_distances, dtype=np.float64))
    allowed = int(np.floor(far * len(ordered) + 1e-9))
    if allowed >= len(ordered):
        return float(ordered[-1])
    upper = ordered[allowed]
    # Impostors tied with the first refused one are refused with it: the FAR may fall under `far`, never over.
    first_refused = int(np.searchsorted(ordered, upper, side="left"))
    lower = ordered[first_refused - 1] if first_refused > 0 else upper - 1e-3
    return float((lower + upper) / 2)


@dataclass
class Cohort:
    """Adaptive symmetric score normalisation (AS-norm) against faces of people nobody enrolls.

    A weak embedder puts some faces (blurred, side-lit, a common look) close to everyone: raw distances
    then mix "this pair is alike" with "this face is alike to all". Measuring each face against a cohort
    of strangers — the mean and spread of its `top_k` highest cosine similarities to them — and scoring a
    pair by how far its similarity stands above both faces' cohort levels, ((s - mu_a)/sd_a + (s - mu_b)/sd_b)/2,
    removes most of that. Measured on the validation people (never trained on) with the shipped int8
    model: TAR at FAR 0.1% of all pairs 46% → 76%, at FAR 0.001% 6% → 37%. The cohort is one embedding per
    training person, made by the same model variant; higher score = more alike.
    """

    vectors: np.ndarray  # (N, D) float32 unit embeddings
    top_k: int

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= len(self.vectors):
            raise ValueError(f"cohort top_k {self.top_k} must be between 1 and the cohort size {len(self.vectors)}")

    def stats(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of each embedding's top-k cosine similarities to the cohort."""
        sims = np.atleast_2d(np.asarray(embeddings, np.float32)) @ self.vectors.T
        top = np.partition(sims, sims.shape[1] - self.top_k, axis=1)[:, -self.top_k:]
        return top.mean(axis=1), np.maximum(top.std(axis=1), 1e-6)

    def scores(self, probes: np.ndarray, enrolled: np.ndarray,
               enrolled_stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Normalised scores (n_probes, n_enrolled); pass `enrolled_stats` to reuse them across calls."""
        probes = np.atleast_2d(np.asarray(probes, np.float32))
        enrolled = np.atleast_2d(np.asarray(enrolled, np.float32))
        return self.normalise(probes @ enrolled.T, self.stats(probes),
                              enrolled_stats if enrolled_stats is not None else self.stats(enrolled))

    @staticmethod
    def normalise(sims: np.ndarray, probe_stats: tuple[np.ndarray, np.ndarray],
                  enrolled_stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Cosine similarities (n_probes, n_enrolled) → normalised scores, given both sides' `stats`."""
        (mu_p, sd_p), (mu_e, sd_e) = probe_stats, enrolled_stats
        return ((sims - mu_p[:, None]) / sd_p[:, None] + (sims - mu_e[None, :]) / sd_e[None, :]) / 2

    @classmethod
    def load(cls, path: Path | BinaryIO, top_k: int) -> "Cohort":
        """A cohort file as the converter writes it: int8 rows plus one float scale (`vectors / scale`)."""
        with np.load(path, allow_pickle=False) as data:
            vectors = data["vectors"].astype(np.float32) / float(data["scale"])
        return cls(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), top_k)

    def to_bytes(self) -> bytes:
        """The file `load` reads: int8 rows and their scale (a quarter of float32's size, cosine > 0.999)."""
        scale = 127.0 / float(np.abs(self.vectors).max())
        buffer = io.BytesIO()
        np.savez(buffer, vectors=np.round(self.vectors * scale).astype(np.int8), scale=np.float32(scale))
        return buffer.getvalue()


class FaceEmbedder:
    """A face bundle's model as `crop → unit embedding`, with the bundle's calibrated thresholds."""

    def __init__(self, model: Model, spec: dict[str, Any], thresholds: dict[str, float], variant: str,
                 cohort: Cohort | None = None, score_thresholds: dict[str, float] | None = None,
                 aligner: Aligner | None = None):
        self.model = model
        self.spec = spec
        self.thresholds = thresholds
        self.variant = variant
        self.cohort = cohort
        self.score_thresholds = score_thresholds or {}
        self.aligner = aligner

    @classmethod
    def from_bundle(cls, path: str | Path, variant: str = "int8", threads: int | None = None) -> "FaceEmbedder":
        """Load a verified face bundle (e.g. models/face) and the thresholds calibrated on `variant`."""
        bundle = Bundle.load(path)
        if bundle.task != "face-embedding":
            raise BundleError(f"{bundle.root} is a '{bundle.task}' bundle, not a face-embedding bundle")
        model = bundle.model(variant, threads=threads)
        thresholds = bundle.model_info(variant).get("thresholds")
        if thresholds is None and variant == bundle.manifest.get("default_model"):
            thresholds = bundle.thresholds  # top-level `thresholds` belong to the default (int8) model
        if not thresholds:
            raise BundleError(f"bundle {bundle.root} has no match thresholds for its '{variant}' model")
        cohort, score_thresholds = None, {}
        normalisation = bundle.model_info(variant).get("score_normalisation")
        if normalisation:
            try:  # from the bytes whose sha256 was just checked
                cohort = Cohort.load(io.BytesIO(bundle.read(normalisation["cohort"])), int(normalisation["top_k"]))
                score_thresholds = {k: float(v) for k, v in normalisation["thresholds"].items()}
            except (KeyError, TypeError, ValueError, OSError) as exc:
                raise BundleError(f"bundle {bundle.root}: unusable score_normalisation for the '{variant}' model "
                                  f"({type(exc).__name__}: {exc})") from exc
        aligner = None
        if "align" in bundle.preprocessing:
            try:  # like the cohort, from the checked bytes
                aligner = Aligner.from_spec(bundle.preprocessing, bundle.read)
                if tuple(model.input_shape[1:3]) != (aligner.size, aligner.size):
                    raise ValueError(f"the chip is {aligner.size} px, the model takes {model.input_shape[1:3]}")
            except (KeyError, TypeError, ValueError, OSError) as exc:
                raise BundleError(f"bundle {bundle.root}: unusable face alignment ({type(exc).__name__}: {exc})") from exc
        return cls(model, bundle.preprocessing, {k: float(v) for k, v in thresholds.items()}, variant,
                   cohort, score_thresholds, aligner)

    @property
    def identity(self) -> str:
        """sha256 of everything that decides an embedding: the model file, and for an aligning bundle also its landmark
        model and preprocessing (a rebuilt bundle with another landmark box must not be matched against embeddings
        enrolled with the old one). For other bundles it is the model file's sha256, as enrolments have always been
        keyed."""
        model_sha = sha256_file(self.model.path)
        if self.aligner is None:
            return model_sha
        digest = hashlib.sha256(model_sha.encode())
        digest.update(self.aligner.digest.encode())
        digest.update(json.dumps(self.spec, sort_keys=True).encode())
        return digest.hexdigest()

    def embed(self, face_crop: np.ndarray) -> np.ndarray:
        """128x128 grey crop from `crop_face` (any size or BGR is accepted and converted) → unit vector."""
        x = face_input(face_crop, self.spec, self.aligner)[np.newaxis]
        return embeddings(lambda batch: np.stack([self.model.run(v)[0] for v in batch]), x, self.spec)[0]

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> float:
        """Cosine similarity (1 = same direction)."""
        return float(np.dot(unit(a), unit(b)))

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        """Euclidean distance between the unit vectors (0 … 2); sqrt(2 - 2 cos)."""
        return float(np.linalg.norm(unit(a) - unit(b)))

    def threshold(self, name: str = "far_0.1pct") -> float:
        """Distance threshold from the manifest, calibrated on people the model never saw.

        "far_0.1pct": one comparison lets in about 0.1% of strangers (1:1 verification, `compare`'s default);
        "far_0.001pct": for matching against a gallery, where a stranger meets every enrolled face (the door
        lock); "best_accuracy": the most accurate split of same/different pairs, never for access control.
        """
        if name not in self.thresholds:
            raise BundleError(f"no threshold '{name}' for the {self.variant} model; "
                              f"available: {', '.join(sorted(self.thresholds))}")
        return self.thresholds[name]

    def score_threshold(self, name: str = "far_0.1pct") -> float:
        """Threshold on the cohort-normalised score (accept when score >= it), calibrated like `threshold`."""
        if self.cohort is None:
            raise BundleError(f"the {self.variant} model's bundle has no cohort for score normalisation")
        if name not in self.score_thresholds:
            raise BundleError(f"no normalised-score threshold '{name}' for the {self.variant} model; "
                              f"available: {', '.join(sorted(self.score_thresholds))}")
        return self.score_thresholds[name]

    def compare(self, known: np.ndarray, candidate: np.ndarray, threshold: float | None = None) -> bool:
        """Same person? True when the embeddings are within `threshold` (default: the FAR 0.1% threshold)."""
        limit = self.threshold() if threshold is None else float(threshold)
        return self.distance(known, candidate) <= limit
