"""One frame through the recognition chain: detect → quality checks → crop → embed → match.

Shared by enrollment (which wants exactly one good face per photo), the service (one frame at a
time) and the benchmark (which times each stage), so all three see faces the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from device.bundle import Bundle, BundleError
from device.detect import Face, FaceDetector, blur_score
from device.doorlock.config import Config, ConfigError
from device.doorlock.decide import Gallery, Match
from device.face import FaceEmbedder, crop_face


@dataclass
class FrameResult:
    """What one frame gave: the face (if any), why it was skipped (if it was), and its match."""

    face: Face | None = None
    skipped: str | None = None
    crop: np.ndarray | None = None
    embedding: np.ndarray | None = None
    match: Match | None = None
    ms: dict[str, float] = field(default_factory=dict)


class Recognizer:
    """Detector + embedder + quality limits, configured once from a `Config`."""

    def __init__(self, detector: FaceDetector, embedder: FaceEmbedder, min_blur: float):
        self.detector = detector
        self.embedder = embedder
        self.min_blur = min_blur
        self.model_sha256 = embedder.identity  # what enrolled embeddings are keyed by (re-embedded when it changes)
        self._last_box = None
        self._last_shape: tuple[int, ...] | None = None

    @classmethod
    def from_config(cls, config: Config) -> "Recognizer":
        d = config.detector
        detector = FaceDetector(d.yunet_model, detect_width=d.detect_width, min_face=d.min_face)
        if Bundle.load(config.model.bundle, verify=False).rejected:  # hashes: checked by from_bundle below
            raise BundleError(f"{config.model.bundle} failed its accuracy gate: the door lock will not run it")
        embedder = FaceEmbedder.from_bundle(config.model.bundle, variant=config.model.variant,
                                            threads=config.model.threads or None)
        return cls(detector, embedder, d.min_blur)

    def normalises(self, setting: str | float) -> bool:
        """Whether matching uses the bundle's cohort-normalised score: for a named threshold, when the bundle
        has a cohort. A number in the config is always a raw distance."""
        return isinstance(setting, str) and self.embedder.cohort is not None

    def threshold(self, setting: str | float) -> float:
        """A config threshold (a bundle threshold name or a distance) for this model, in the gallery's units.

        A number is a raw distance, and distances mean different things for different models (0.40 was strict for
        the student and lets in ~a quarter of stranger attempts with face-resnet), so one looser than the model's
        own `far_0.1pct` distance, the loosest a bundle offers for access, is refused (a normalised score copied
        from `check-config` looks like one too).
        """
        if isinstance(setting, str):
            return self.embedder.score_threshold(setting) if self.normalises(setting) else self.embedder.threshold(setting)
        loosest = self.embedder.threshold("far_0.1pct")
        if float(setting) > loosest:
            raise ConfigError(f"[decision] threshold {setting} is a raw distance (a number always is) looser than "
                              f"this model's far_0.1pct distance {loosest:.3f}: strangers would be let in. Use a "
                              f"bundle threshold name such as \"far_0.001pct\", or a distance below {loosest:.3f}")
        return float(setting)

    def gallery(self, entries: list[tuple[str, np.ndarray]], setting: str | float) -> Gallery:
        """Enrolled embeddings as a matcher whose units agree with `threshold(setting)`."""
        return Gallery(entries, self.embedder.cohort if self.normalises(setting) else None)

    def describe_threshold(self, setting: str | float) -> str:
        units = "normalised score >=" if self.normalises(setting) else "distance <="
        return f"{setting} = {units} {self.threshold(setting):.4f}"

    def embed_face(self, image: np.ndarray, face: Face) -> tuple[np.ndarray, np.ndarray]:
        """The embedder-framed crop of `face` and its unit embedding."""
        crop = crop_face(image, face.box)
        return crop, self.embedder.embed(crop)

    def process(self, frame: np.ndarray, gallery: Gallery | None = None, threshold: float = 0.0,
                track: bool = True) -> FrameResult:
        """Run one frame; with a gallery, also match. `track` searches near the last face first.

        Tracking restarts when the frame size changes (a camera reopened at another resolution): the last box is
        in the old frame's pixels.
        """
        result = FrameResult()
        if frame.shape != self._last_shape:
            self._last_box, self._last_shape = None, frame.shape
        t0 = time.perf_counter()
        face = self.detector.largest(frame, near=self._last_box if track else None)
        t1 = time.perf_counter()
        result.ms["detect"] = (t1 - t0) * 1000
        self._last_box = face.box if face else None
        if face is None:
            result.skipped = "no face"
            return result
        result.face = face
        sharpness = blur_score(frame, face.box)
        if sharpness < self.min_blur:
            result.skipped = f"blurred (sharpness {sharpness:.0f} < {self.min_blur:.0f})"
            return result
        t2 = time.perf_counter()
        result.crop = crop_face(frame, face.box)
        t3 = time.perf_counter()
        result.embedding = self.embedder.embed(result.crop)
        t4 = time.perf_counter()
        result.ms["quality"] = (t2 - t1) * 1000
        result.ms["crop"] = (t3 - t2) * 1000
        result.ms["embed"] = (t4 - t3) * 1000
        if gallery is not None:
            result.match = gallery.match(result.embedding, threshold)
            result.ms["match"] = (time.perf_counter() - t4) * 1000
        return result
