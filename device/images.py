"""Reading images from disk with errors a user can act on instead of OpenCV's silent `None`."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class ImageError(Exception):
    """An image file is missing, unreadable, or has no usable content."""


def load_image(path: str | Path) -> np.ndarray:
    """Load an image file as a BGR (or grey) uint8 array.

    Reads the bytes ourselves and decodes with `cv2.imdecode` so that non-ASCII paths work and a
    missing file, a directory, a truncated or non-image file each get their own message.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    return decode_image(np.fromfile(str(path), dtype=np.uint8), str(path))


def decode_image(data: bytes | np.ndarray, name: str = "image") -> np.ndarray:
    """An encoded image (JPEG, PNG, ... file contents) → BGR (or grey) uint8 array, with `name` in errors."""
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.asarray(data, dtype=np.uint8)
    if data.size == 0:
        raise ImageError(f"{name}: file is empty")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{name}: not a readable image (corrupt, truncated, or an unsupported format)")
    return check_image(image, name)


def check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate an in-memory image and bring it to uint8 grey or 3-channel BGR."""
    if not isinstance(image, np.ndarray) or image.size == 0 or image.ndim not in (2, 3):
        raise ImageError(f"{name}: empty or not an image array")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] != 3:
        raise ImageError(f"{name}: {image.shape[2]} channels; expected grey, BGR or BGRA")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"{name}: pixel type {image.dtype} not supported; expected 8 or 16 bit")
    return image


def to_gray(image: np.ndarray) -> np.ndarray:
    """Single-channel view of a grey or BGR image."""
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
