"""Reading images from disk with errors a user can act on instead of OpenCV's silent `None`.

Files are decoded with `cv2.IMREAD_UNCHANGED` so that 16-bit depth and alpha reach `check_image`,
which turns them into something the apps can read (see there). That flag also makes OpenCV skip the
EXIF Orientation tag, so `decode_image` applies it itself: a phone photo stored sideways with
"rotate 90°" in its EXIF must be read upright, or digits are misread and faces not found.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

import cv2
import numpy as np


class ImageError(Exception):
    """An image file is missing, unreadable, or has no usable content."""


def load_image(path: str | Path) -> np.ndarray:
    """Load an image file as a BGR (or grey) uint8 array, upright as its EXIF orientation says.

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
    """An encoded image (JPEG, PNG, ... file contents) → BGR (or grey) uint8 array, with `name` in errors.

    A 4th channel is transparency and 16-bit data is scaled, as `check_image` describes. The EXIF
    orientation of JPEG, PNG (eXIf chunk) and WebP (EXIF chunk) files is applied, all eight values
    including the mirrored ones, whatever the OpenCV version (OpenCV's own support varies by version
    and is off with IMREAD_UNCHANGED). Other formats (TIFF, AVIF, ...) are read as stored.
    """
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else np.asarray(data, dtype=np.uint8)
    if data.size == 0:
        raise ImageError(f"{name}: file is empty")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{name}: not a readable image (corrupt, truncated, or an unsupported format)")
    upright = ORIENTATIONS.get(exif_orientation(data))
    return check_image(upright(image) if upright else image, name, alpha=True)


# EXIF Orientation value → the transform that turns the stored pixels upright (as OpenCV's IMREAD_COLOR does).
ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda image: cv2.flip(image, 1),  # mirrored left-right
    3: lambda image: cv2.rotate(image, cv2.ROTATE_180),
    4: lambda image: cv2.flip(image, 0),  # mirrored top-bottom
    5: cv2.transpose,  # mirrored along the main diagonal
    6: lambda image: cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE),  # the usual portrait phone photo
    7: lambda image: cv2.flip(cv2.transpose(image), -1),  # mirrored along the other diagonal
    8: lambda image: cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def exif_orientation(data: np.ndarray) -> int:
    """The EXIF Orientation (1-8) in a JPEG, PNG or WebP file's bytes (1-D uint8); 1 (as stored) when
    there is none.

    Damaged or unknown metadata also gives 1: a bad EXIF block must not make readable pixels unreadable.
    """
    buf = memoryview(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1))
    try:
        if buf[:2] == b"\xff\xd8":
            return _tiff_orientation(_jpeg_exif(buf))
        if buf[:8] == b"\x89PNG\r\n\x1a\n":
            return _tiff_orientation(_png_exif(buf))
        if buf[:4] == b"RIFF" and buf[8:12] == b"WEBP":
            return _tiff_orientation(_webp_exif(buf))
    except struct.error:  # a length pointing past the end of a truncated file
        pass
    return 1


def _jpeg_exif(buf: memoryview) -> memoryview | None:
    """The TIFF block of a JPEG's EXIF APP1 segment, looked for among the segments before the image data."""
    pos = 2
    while pos + 4 <= len(buf) and buf[pos] == 0xFF:
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            pos += 2
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata after this
            return None
        else:
            (length,) = struct.unpack_from(">H", buf, pos + 2)
            segment = buf[pos + 4 : pos + 2 + length]
            if marker == 0xE1 and segment[:6] == b"Exif\0\0":
                return segment[6:]
            pos += 2 + length
    return None


def _png_exif(buf: memoryview) -> memoryview | None:
    """The body of a PNG's eXIf chunk (chunks: length, type, body, CRC; eXIf may follow the image data)."""
    pos = 8
    while pos + 8 <= len(buf):
        length, kind = struct.unpack_from(">I4s", buf, pos)
        if kind == b"eXIf":
            return buf[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return None


def _webp_exif(buf: memoryview) -> memoryview | None:
    """The body of a WebP's EXIF chunk (RIFF chunks: type, little-endian length, body padded to even)."""
    pos = 12
    while pos + 8 <= len(buf):
        kind, length = struct.unpack_from("<4sI", buf, pos)
        if kind == b"EXIF":
            return buf[pos + 8 : pos + 8 + length]
        pos += 8 + length + length % 2
    return None


def _tiff_orientation(tiff: memoryview | None) -> int:
    """The Orientation tag (0x0112) of an EXIF TIFF block's first IFD, or 1."""
    if tiff is not None and tiff[:6] == b"Exif\0\0":  # some PNG and WebP writers keep JPEG's prefix
        tiff = tiff[6:]
    if tiff is None or len(tiff) < 8:
        return 1
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    if order is None or struct.unpack_from(order + "H", tiff, 2)[0] != 42:
        return 1
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind, _, value = struct.unpack_from(order + "HHIH", tiff, entry)
        if tag == 0x0112:
            return value if kind == 3 and 1 <= value <= 8 else 1  # a SHORT, stored in the entry itself
    return 1


def check_image(image: np.ndarray, name: str = "image", alpha: bool = False) -> np.ndarray:
    """Validate an in-memory image and bring it to uint8 grey or 3-channel BGR.

    16-bit images are scaled by their brightest value (see `to_uint8`). A 4th channel is dropped
    unless `alpha` says it is transparency (a decoded PNG or WebP): in camera frames (XRGB-style
    formats) it is padding with no defined value. Transparency is flattened onto a background (see
    `flatten_alpha`) instead, because transparent pixels usually hold black, so dropping it turns
    black strokes on a transparent canvas into an all-black image.
    """
    if not isinstance(image, np.ndarray) or image.size == 0 or image.ndim not in (2, 3):
        raise ImageError(f"{name}: empty or not an image array")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] not in (3, 4):
        raise ImageError(f"{name}: {image.shape[2]} channels; expected grey, BGR or BGRA")
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{name}: pixel type {image.dtype} not supported; expected 8 or 16 bit")
    if image.ndim == 3 and image.shape[2] == 4:
        return flatten_alpha(image) if alpha else to_uint8(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR))
    return to_uint8(image)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A uint8 or uint16 image as uint8; 16-bit values are scaled so the brightest becomes 255.

    Scaling by the image's own maximum (one factor for all channels, so colours keep their balance)
    rather than `>> 8` keeps the contrast of 10-, 12- or 14-bit sensor data stored in 16 bits, which
    `>> 8` turned nearly black. Black stays 0 (no contrast stretch), and the gain never exceeds 1, so
    8-bit values stored in 16 bits come out unchanged and a dark, almost blank image is not blown up
    into noise.
    """
    if image.dtype == np.uint8:
        return image
    peak = max(int(image.max()), 255)
    return ((image.astype(np.uint32) * 255 + peak // 2) // peak).astype(np.uint8)


def flatten_alpha(image: np.ndarray) -> np.ndarray:
    """A BGRA image (8 or 16 bit) → BGR uint8, composited over white or black, whichever contrasts with it.

    Over white, like a document viewer, when the visible pixels are dark on average (ink, pen strokes on
    a canvas export); over black when they are light (white chalk-style strokes), which a fixed white
    background would make vanish. Fully opaque images come out as their colour channels unchanged.
    """
    alpha = image[:, :, 3].astype(np.float32) / np.iinfo(image.dtype).max
    colour = to_uint8(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR))
    weight = float(alpha.sum())
    shade = float((to_gray(colour) * alpha).sum()) / weight if weight else 0.0
    background = 0.0 if shade > 127.5 else 255.0
    alpha = alpha[:, :, np.newaxis]
    return np.rint(colour * alpha + background * (1.0 - alpha)).astype(np.uint8)


def to_gray(image: np.ndarray) -> np.ndarray:
    """Single-channel view of a grey or BGR image."""
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
