"""Loading image files the way the apps get them: phone photos with EXIF orientation, transparent
canvas exports, 12-bit data in 16-bit PNGs, and plain 8-bit files that must stay as they were.

Every file is made here: EXIF blocks are written byte by byte (a TIFF header with one Orientation
entry) into files that OpenCV encoded, so the tests need no image library beyond OpenCV.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from device.digits import DigitReader
from device.images import check_image, exif_orientation, load_image, to_gray
from training.datasets.mnist import load_mnist

# How a camera stores an upright scene under each EXIF orientation: the inverse of what a viewer applies.
# E.g. 6 is "row 0 is the visual right side, column 0 the visual top": the scene turned a quarter
# counter-clockwise, which the viewer turns back clockwise. 2, 4, 5 and 7 are mirrored.
STORED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda upright: upright,
    2: np.fliplr,
    3: lambda upright: np.rot90(upright, 2),
    4: np.flipud,
    5: lambda upright: np.swapaxes(upright, 0, 1),
    6: lambda upright: np.rot90(upright, 1),
    7: lambda upright: np.rot90(np.swapaxes(upright, 0, 1), 2),
    8: lambda upright: np.rot90(upright, -1),
}


def tiff_block(orientation: int, byte_order: str = "<") -> bytes:
    """A minimal EXIF TIFF block: header, one IFD with just the Orientation (0x0112, SHORT) entry."""
    mark = b"II" if byte_order == "<" else b"MM"
    entry = struct.pack(byte_order + "HHIHH", 0x0112, 3, 1, orientation, 0)
    return mark + struct.pack(byte_order + "HIH", 42, 8, 1) + entry + struct.pack(byte_order + "I", 0)


def jpeg_with_exif(image: np.ndarray, orientation: int, byte_order: str = "<", tiff: bytes | None = None) -> bytes:
    """OpenCV's JPEG of `image` with an EXIF APP1 segment inserted right after the SOI marker."""
    encoded = cv2.imencode(".jpg", np.ascontiguousarray(image), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    body = b"Exif\0\0" + (tiff if tiff is not None else tiff_block(orientation, byte_order))
    return encoded[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + encoded[2:]


def png_with_exif(image: np.ndarray, orientation: int) -> bytes:
    """OpenCV's PNG of `image` with an eXIf chunk after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    encoded = cv2.imencode(".png", np.ascontiguousarray(image))[1].tobytes()
    body = tiff_block(orientation, ">")
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    return encoded[:33] + chunk + encoded[33:]


def webp_with_exif(image: np.ndarray, orientation: int) -> bytes:
    """OpenCV's (simple-format) WebP of `image` rewritten as extended format: VP8X with the EXIF flag,
    the image chunk, then an EXIF chunk."""
    encoded = cv2.imencode(".webp", np.ascontiguousarray(image))[1].tobytes()
    assert encoded[12:15] == b"VP8"  # the image chunk ("VP8 " or "VP8L") right after the RIFF header
    height, width = image.shape[:2]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0]) + (width - 1).to_bytes(3, "little") \
        + (height - 1).to_bytes(3, "little")
    tiff = tiff_block(orientation)
    exif = b"EXIF" + struct.pack("<I", len(tiff)) + tiff + b"\0" * (len(tiff) % 2)
    body = b"WEBP" + vp8x + encoded[12:] + exif
    return b"RIFF" + struct.pack("<I", len(body)) + body


def pattern(height: int = 48, width: int = 80) -> np.ndarray:
    """Upright test scene, wider than tall: white block top-left, grey block top-right, black elsewhere.
    No rotation or mirror of it looks the same, so a wrong orientation cannot pass."""
    scene = np.zeros((height, width), np.uint8)
    scene[:16, :16] = 255
    scene[:16, -16:] = 128
    return scene


def assert_upright(image: np.ndarray) -> None:
    """The loaded scene is `pattern()` the right way up: same shape, blocks in their corners (centres of
    the blocks, away from JPEG ringing)."""
    gray = to_gray(image)
    assert gray.shape == (48, 80)
    corners = {"top-left": gray[4:12, 4:12], "top-right": gray[4:12, -12:-4],
               "bottom-left": gray[-12:-4, 4:12], "bottom-right": gray[-12:-4, -12:-4]}
    means = {corner: float(block.mean()) for corner, block in corners.items()}
    assert means["top-left"] > 230 and 100 < means["top-right"] < 160, means
    assert means["bottom-left"] < 25 and means["bottom-right"] < 25, means


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("byte_order", ["<", ">"], ids=["II", "MM"])
def test_jpeg_exif_orientation_is_applied(tmp_path: Path, orientation: int, byte_order: str) -> None:
    """Every orientation, both EXIF byte orders (Android phones write II, Apple MM), colour and grey."""
    colour = cv2.cvtColor(pattern(), cv2.COLOR_GRAY2BGR)
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_with_exif(STORED[orientation](colour), orientation, byte_order))
    loaded = load_image(path)
    assert loaded.shape == (48, 80, 3)
    assert_upright(loaded)
    # The same as OpenCV's own orientation handling (IMREAD_COLOR applies EXIF on this OpenCV version).
    assert np.array_equal(loaded, cv2.imread(str(path), cv2.IMREAD_COLOR))

    gray_path = tmp_path / "scan.jpg"
    gray_path.write_bytes(jpeg_with_exif(STORED[orientation](pattern()), orientation, byte_order))
    gray = load_image(gray_path)
    assert gray.ndim == 2
    assert_upright(gray)


@pytest.mark.parametrize("orientation", [2, 5, 6, 7, 8])
@pytest.mark.parametrize("encode", [png_with_exif, webp_with_exif], ids=["png-eXIf", "webp-EXIF"])
def test_png_and_webp_exif_orientation_is_applied(tmp_path: Path, encode, orientation: int) -> None:
    """Lossless formats: the loaded pixels are exactly the upright scene."""
    upright = cv2.cvtColor(pattern(), cv2.COLOR_GRAY2BGR)
    path = tmp_path / "picture.img"
    path.write_bytes(encode(STORED[orientation](upright), orientation))
    assert exif_orientation(np.fromfile(str(path), np.uint8)) == orientation
    assert np.array_equal(load_image(path), upright)


def test_16_bit_png_with_orientation_is_turned_and_scaled(tmp_path: Path) -> None:
    deep = pattern().astype(np.uint16) * 16  # 12-bit values (0..4080) in a 16-bit PNG, stored sideways
    path = tmp_path / "deep.png"
    path.write_bytes(png_with_exif(STORED[6](deep), 6))
    loaded = load_image(path)
    assert loaded.dtype == np.uint8
    assert_upright(loaded)


@pytest.mark.parametrize(
    "tiff",
    [tiff_block(9), tiff_block(6)[:12], tiff_block(6)[:4] + struct.pack("<I", 10_000) + tiff_block(6)[8:],
     b"XX" + tiff_block(6)[2:], tiff_block(6).replace(struct.pack("<HH", 0x0112, 3), struct.pack("<HH", 0x0112, 4))],
    ids=["value-9", "truncated-ifd", "ifd-offset-past-end", "bad-byte-order", "wrong-type"],
)
def test_damaged_exif_leaves_the_image_as_stored(tmp_path: Path, tiff: bytes) -> None:
    """A broken EXIF block must not make a readable photo unreadable, nor turn it."""
    path = tmp_path / "odd.jpg"
    path.write_bytes(jpeg_with_exif(pattern(), 1, tiff=tiff))
    assert exif_orientation(np.fromfile(str(path), np.uint8)) == 1
    assert_upright(load_image(path))


def test_exif_orientation_of_files_without_exif() -> None:
    for ext in (".jpg", ".png", ".webp", ".bmp", ".tiff"):
        assert exif_orientation(cv2.imencode(ext, pattern())[1]) == 1, ext
    cut_off = b"\xff\xd8\xff\xe1\xff\xffExif\0\0II*\0"  # a truncated file: segment longer than the data
    assert exif_orientation(np.frombuffer(cut_off, np.uint8)) == 1


def canvas_export(strokes: np.ndarray, ink: int) -> np.ndarray:
    """BGRA like a drawing app's PNG export: `ink`-coloured strokes whose coverage (0-255) is the
    alpha channel, fully transparent pixels (0, 0, 0, 0) elsewhere."""
    bgra = np.zeros((*strokes.shape, 4), np.uint8)
    bgra[strokes > 0, :3] = ink
    bgra[:, :, 3] = strokes
    return bgra


def test_transparent_png_keeps_its_strokes(tmp_path: Path) -> None:
    strokes = np.zeros((120, 100), np.uint8)
    cv2.line(strokes, (20, 20), (80, 20), 255, 9, cv2.LINE_AA)  # a "7": anti-aliased, so partial alpha at edges
    cv2.line(strokes, (80, 20), (40, 105), 255, 9, cv2.LINE_AA)
    core, empty = strokes == 255, strokes == 0

    cv2.imwrite(str(tmp_path / "black.png"), canvas_export(strokes, ink=0))
    black_ink = to_gray(load_image(tmp_path / "black.png"))
    assert black_ink[empty].min() == 255 and black_ink[core].max() == 0  # over white, like a page

    cv2.imwrite(str(tmp_path / "white.png"), canvas_export(strokes, ink=255))
    white_ink = to_gray(load_image(tmp_path / "white.png"))
    assert white_ink[empty].max() == 0 and white_ink[core].min() == 255  # over black: white on white would vanish

    edge = (strokes > 60) & (strokes < 200)  # anti-aliased edge: blended, not snapped to ink or background
    assert edge.any() and 0 < black_ink[edge].min() and black_ink[edge].max() < 255


def test_opaque_and_16_bit_alpha_pngs(tmp_path: Path) -> None:
    colour = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "opaque.png"), np.dstack([colour, np.full((30, 40), 255, np.uint8)]))
    assert np.array_equal(load_image(tmp_path / "opaque.png"), colour)

    strokes = np.zeros((30, 40), np.uint16)
    strokes[10:20, 5:35] = 65535
    deep = np.dstack([np.zeros((30, 40, 3), np.uint16), strokes])  # black 16-bit strokes, transparent elsewhere
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    loaded = to_gray(load_image(tmp_path / "deep.png"))
    assert loaded.dtype == np.uint8 and loaded[strokes > 0].max() == 0 and loaded[strokes == 0].min() == 255


def test_camera_frame_4th_channel_is_padding_not_transparency() -> None:
    """In memory (XRGB-style camera buffers) the 4th byte has no defined value: it is dropped, not composited."""
    colour = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(check_image(np.dstack([colour, np.zeros((8, 8), np.uint8)])), colour)


def test_12_bit_data_in_16_bit_png_keeps_its_contrast(tmp_path: Path) -> None:
    scene = pattern().astype(np.uint16) * 16  # 0..4080: a 12-bit sensor's range
    cv2.imwrite(str(tmp_path / "12bit.png"), scene)
    loaded = load_image(tmp_path / "12bit.png")
    assert loaded.dtype == np.uint8
    assert_upright(loaded)
    assert loaded.max() == 255 and loaded[:16, -16:].max() == 128  # scaled by the peak, levels in proportion


def test_16_bit_scaling_full_range_and_8_bit_values() -> None:
    full = np.array([[0, 256, 32768, 65535]], np.uint16)
    assert check_image(full).tolist() == [[0, 1, 128, 255]]  # full 16-bit range: as `>> 8` (rounded)
    small = np.array([[0, 3, 17, 200]], np.uint16)
    assert check_image(small).tolist() == [[0, 3, 17, 200]]  # 8-bit values in 16 bits: not amplified into noise
    colour = np.zeros((2, 2, 3), np.uint16)
    colour[..., 2] = 4000
    colour[..., 0] = 1000
    assert check_image(colour)[0, 0].tolist() == [64, 0, 255]  # one factor for all channels: hue kept


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_plain_8_bit_images_are_unchanged(tmp_path: Path, ext: str) -> None:
    rng = np.random.default_rng(3)
    for name, image in {"grey": rng.integers(0, 256, (37, 51), dtype=np.uint8),
                        "colour": rng.integers(0, 256, (37, 51, 3), dtype=np.uint8)}.items():
        path = tmp_path / f"{name}{ext}"
        cv2.imwrite(str(path), image)
        loaded = load_image(path)
        assert loaded.dtype == np.uint8 and loaded.shape == image.shape, (name, ext)
        assert np.array_equal(loaded, cv2.imread(str(path), cv2.IMREAD_UNCHANGED)), (name, ext)
        if ext != ".jpg":
            assert np.array_equal(loaded, image), (name, ext)


@pytest.fixture(scope="module")
def reader(models_dir: Path) -> DigitReader:
    return DigitReader.from_bundle(models_dir / "digits")


@pytest.fixture(scope="module")
def mnist_test(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    data = load_mnist(data_dir)
    return data.x_test[:40], data.y_test[:40]


@pytest.mark.parametrize("orientation", [3, 6, 8, 2, 5])
def test_digits_in_rotated_phone_photos_are_read(reader: DigitReader, mnist_test, tmp_path: Path,
                                                 orientation: int) -> None:
    """Real MNIST digits as dark ink on paper, stored turned (or mirrored) with the EXIF tag saying so,
    as a phone saves a portrait photo: read as if upright."""
    x, y = mnist_test
    right = 0
    for i, (digit, label) in enumerate(zip(x, y)):
        big = cv2.resize(digit, (120, 120), interpolation=cv2.INTER_CUBIC)
        paper = np.full((160, 200), 230, np.uint8)
        paper[20:140, 40:160] = 230 - (big.astype(np.uint16) * 200 // 255).astype(np.uint8)
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(jpeg_with_exif(STORED[orientation](paper), orientation))
        right += reader.read(path).digit == label
    assert right >= 38


@pytest.mark.parametrize("ink", [0, 255], ids=["black-ink", "white-ink"])
def test_digits_drawn_on_transparent_canvas_are_read(reader: DigitReader, mnist_test, tmp_path: Path,
                                                     ink: int) -> None:
    """Real MNIST digits exported from a drawing app: ink-coloured strokes, alpha = stroke coverage."""
    x, y = mnist_test
    right = 0
    for i, (digit, label) in enumerate(zip(x, y)):
        strokes = np.zeros((180, 160), np.uint8)
        strokes[30:150, 20:140] = cv2.resize(digit, (120, 120), interpolation=cv2.INTER_CUBIC)
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), canvas_export(strokes, ink))
        right += reader.read(path).digit == label
    assert right >= 38
