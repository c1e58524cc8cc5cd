"""Reading a handwritten digit from any photo or scan with a digits bundle."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.bundle import Bundle, BundleError
from device.images import load_image
from device.preprocess import mnist_style, normalize


@dataclass(frozen=True)
class DigitResult:
    """The most likely digit, its probability, and the runners-up (digit, probability), best first."""

    digit: int
    confidence: float
    top_k: list[tuple[int, float]] = field(default_factory=list)


class DigitReader:
    """A digits bundle ready to read images. Load once, read many."""

    def __init__(self, bundle: Bundle, variant: str = "int8", threads: int | None = None):
        if not bundle.task.startswith("digits"):
            raise BundleError(f"{bundle.root} is a '{bundle.task}' bundle, not a digits model")
        self.bundle = bundle
        self.spec = bundle.preprocessing
        self.labels = [int(label) for label in bundle.labels]
        self.model = bundle.model(variant, threads=threads)

    @classmethod
    def from_bundle(cls, path: str | Path, variant: str = "int8", threads: int | None = None) -> "DigitReader":
        """Verify the bundle's hashes, then load its `variant` ("int8" or "float") model."""
        return cls(Bundle.load(path), variant=variant, threads=threads)

    def probabilities(self, digit28: np.ndarray) -> np.ndarray:
        """Class probabilities for an image already in MNIST framing (28x28 uint8)."""
        return self.model.run(normalize(digit28, self.spec))[0]

    def read(self, image: np.ndarray | str | Path, k: int = 3) -> DigitResult:
        """Read one image (a path or a BGR/grey array of any size and polarity)."""
        pixels = load_image(image) if isinstance(image, (str, Path)) else image
        probs = self.probabilities(mnist_style(pixels))
        order = np.argsort(probs)[::-1][:k]
        top = [(self.labels[i], float(probs[i])) for i in order]
        return DigitResult(digit=top[0][0], confidence=top[0][1], top_k=top)
