"""dlib's 5-point landmarks and face-chip alignment in numpy (device/landmarks.py) compute what dlib computes.

The references in tests/fixtures/landmarks_reference.json are dlib 20.0.1's own outputs, written by its C++ code
(`shape_predictor` with shape_predictor_5_face_landmarks.dat, `get_face_chip_details(shape, 150, 0.25)`,
`extract_image_chip`) on five LFW crops of the shared data folder (the file names them; the images stay there):
the box each was given (the largest HOG detection, or the whole crop where dlib found none, one box reaching
past the crop's left edge), the landmarks it returned, the chip's rectangle and angle, and a hash of the chip.
The model file is the public-domain one from the face_recognition_models package (host extra `host`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO

from device.face import ALIGN_BOX
from device.landmarks import (ChipDetails, ShapePredictor, chip_to_image, chip_transform, face_chip_details,
                              read_dlib_shape_predictor)
from training.face.dlib_resnet import LANDMARKS_DAT, find_model_file

FIXTURE = REPO / "tests" / "fixtures" / "landmarks_reference.json"
@pytest.fixture(scope="module")
def predictor() -> ShapePredictor:
    return read_dlib_shape_predictor(find_model_file(LANDMARKS_DAT))


@pytest.fixture(scope="module")
def reference(data_dir: Path) -> tuple[dict, list[np.ndarray]]:
    recorded = json.loads(FIXTURE.read_text())
    faces = data_dir / "faces" / "lfw-crop-gray-128"
    crops = [cv2.imread(str(faces / r["crop"]), cv2.IMREAD_GRAYSCALE) for r in recorded["references"]]
    assert all(c is not None and c.shape == (128, 128) for c in crops)
    return recorded, crops


def pyramid_levels(details: ChipDetails) -> int:
    """How many times dlib's extract_image_chips halves the image (pyramid_down<2>) before sampling this chip.

    It halves while the rectangle, halved (dlib's rect_down: corners / 2 - (1.25, 0.75)), still has more pixels
    than the chip — i.e. only when the chip is cut from a region over about twice its size.
    """
    width, height = details.right - details.left, details.bottom - details.top
    levels = 0
    while (width / 2 + 1) * (height / 2 + 1) > details.rows * details.cols:
        width, height, levels = width / 2, height / 2, levels + 1
    return levels


def extract_chip(image: np.ndarray, landmarks: np.ndarray, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """dlib's aligned face chip, extract_image_chip(img, get_face_chip_details(shape, size, padding)), in numpy: the
    oracle that shows `chip_to_image` is dlib's sampling map (the device cuts chips with cv2.warpAffine instead).

    `image` uint8 grey (H, W) or colour (H, W, C); the chip has the same channels. Each chip pixel is dlib's
    bilinear interpolation at `chip_to_image` of its coordinates, in double, truncated to an integer (not
    rounded), and 0 wherever one of the four pixels it needs lies outside the image. That is exactly dlib's
    chip whenever dlib samples the image itself (chip rectangle up to about twice the chip size: a face chip
    of 150 px from a face up to ~300 px across). Beyond that dlib first halves the image with its 5-tap
    pyramid filter; here each halving is a 2x2 mean instead, so large faces get a close, not identical, chip.
    """
    details = face_chip_details(landmarks, size, padding)
    to_image = chip_to_image(details)
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or pixels.size == 0:
        raise ValueError(f"image must be a non-empty uint8 (H, W) or (H, W, C) array, got {pixels.dtype} "
                         f"{pixels.shape}")
    levels = pyramid_levels(details)
    if levels:
        shrunk = pixels.astype(np.float64)
        for _ in range(levels):
            h, w = shrunk.shape[0] // 2 * 2, shrunk.shape[1] // 2 * 2
            shrunk = (shrunk[0:h:2, 0:w:2] + shrunk[1:h:2, 0:w:2] + shrunk[0:h:2, 1:w:2] + shrunk[1:h:2, 1:w:2]) / 4
        pixels = shrunk.astype(np.uint8)
        # a pixel of the halved image covers pixels 2j and 2j+1: x' = (x - 0.5) / 2 per halving
        factor = 2.0 ** levels
        to_image = to_image / factor
        to_image[:, 2] -= (factor - 1) / (2 * factor)
    cols, rows = np.meshgrid(np.arange(details.cols, dtype=np.float64), np.arange(details.rows, dtype=np.float64))
    x = to_image[0, 0] * cols + to_image[0, 1] * rows + to_image[0, 2]
    y = to_image[1, 0] * cols + to_image[1, 1] * rows + to_image[1, 2]
    left, top = np.floor(x), np.floor(y)
    height, width = pixels.shape[:2]
    inside = (left >= 0) & (top >= 0) & (left + 1 < width) & (top + 1 < height)
    x0 = np.clip(left, 0, max(width - 2, 0)).astype(np.intp)
    y0 = np.clip(top, 0, max(height - 2, 0)).astype(np.intp)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = x - left, y - top
    if pixels.ndim == 3:
        fx, fy, inside = fx[..., None], fy[..., None], inside[..., None]
    source = pixels.astype(np.float64)
    # dlib's expression, term for term (the order of the double operations decides the truncated value)
    value = (1 - fy) * ((1 - fx) * source[y0, x0] + fx * source[y0, x1]) \
        + fy * ((1 - fx) * source[y1, x0] + fx * source[y1, x1])
    return np.where(inside, np.clip(value, 0, 255).astype(np.uint8), np.uint8(0))


def test_model_structure(predictor: ShapePredictor) -> None:
    # dlib's 5-point model: 15 cascade levels of 500 depth-4 trees over 800 feature pixels each.
    assert predictor.num_parts == 5
    assert predictor.anchor_idx.shape == (15, 800)
    assert predictor.split_thresh.shape == (15, 500, 15)
    assert predictor.leaf_values.shape == (15, 500, 16, 10)
    # the mean shape sits inside the box: eyes in the upper half, nose base below them
    x, y = predictor.initial_shape.T
    assert np.all((x > 0) & (x < 1)) and np.all(y[:4] < 0.5) and y[4] > y[:4].max()


def test_landmarks_equal_dlibs(predictor: ShapePredictor, reference) -> None:
    recorded, crops = reference
    for ref, crop in zip(recorded["references"], crops):
        landmarks = predictor.predict(crop, tuple(ref["box"]))
        assert landmarks.dtype == np.float32 and landmarks.shape == (5, 2)
        np.testing.assert_array_equal(landmarks, np.array(ref["landmarks"], np.float32), err_msg=ref["crop"])
        # dlib rounds to whole pixels; the unrounded positions are within half a pixel of its answer
        subpixel = predictor.predict(crop, tuple(ref["box"]), subpixel=True)
        assert np.abs(subpixel - landmarks).max() <= 0.5
        # a colour frame gives dlib's intensity (c0 + c1 + c2) // 3: for a grey picture the same landmarks
        colour = np.repeat(crop[:, :, None], 3, axis=2)
        np.testing.assert_array_equal(predictor.predict(colour, tuple(ref["box"])), landmarks)


def test_npz_round_trip_predicts_identically(predictor: ShapePredictor, reference, tmp_path: Path) -> None:
    recorded, crops = reference
    path = tmp_path / "landmarks.npz"
    path.write_bytes(predictor.to_bytes())
    loaded = ShapePredictor.load(path)
    for name in ("initial_shape", "anchor_idx", "deltas", "split_idx1", "split_idx2", "split_thresh", "leaf_values"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(predictor, name), err_msg=name)
    with path.open("rb") as f:
        from_file = ShapePredictor.load(f)
    for ref, crop in zip(recorded["references"], crops):
        box = tuple(ref["box"])
        expected = predictor.predict(crop, box, subpixel=True)
        np.testing.assert_array_equal(loaded.predict(crop, box, subpixel=True), expected)
        np.testing.assert_array_equal(from_file.predict(crop, box, subpixel=True), expected)


def test_other_files_are_refused(predictor: ShapePredictor, data_dir: Path, tmp_path: Path) -> None:
    jpeg = data_dir / "faces" / "lfw-crop-gray-128" / "Joe_Torre" / "Joe_Torre_0002.jpg"
    with pytest.raises(ValueError, match="not a dlib shape predictor"):
        read_dlib_shape_predictor(jpeg)
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(find_model_file(LANDMARKS_DAT).read_bytes()[:100_000])
    with pytest.raises(ValueError, match="not a dlib shape predictor"):
        read_dlib_shape_predictor(truncated)
    npz = tmp_path / "landmarks.npz"
    npz.write_bytes(predictor.to_bytes())
    with pytest.raises(ValueError, match="not a dlib shape predictor"):
        read_dlib_shape_predictor(npz)
    with pytest.raises(ValueError):
        ShapePredictor.load(jpeg)
    other = tmp_path / "other.npz"
    np.savez(other, leaf_values=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="not a dlib-shape-predictor"):
        ShapePredictor.load(other)


def test_chip_details_and_chip_equal_dlibs(reference) -> None:
    recorded, crops = reference
    size, padding = recorded["chip_size"], recorded["chip_padding"]
    for ref, crop in zip(recorded["references"], crops):
        landmarks = np.array(ref["landmarks"], np.float64)
        details = face_chip_details(landmarks, size, padding)
        # the reference was stored as float32: equal up to its rounding
        np.testing.assert_allclose(details[:4], ref["chip_rect"], atol=2e-5, err_msg=ref["crop"])
        assert details.angle == pytest.approx(ref["chip_angle"], abs=1e-7)
        assert (details.rows, details.cols) == (size, size)
        # chip_transform (image -> chip) inverts dlib's sampling map (chip -> image)
        forward = np.vstack([chip_transform(landmarks, size, padding), [0, 0, 1]])
        np.testing.assert_allclose(forward @ np.vstack([chip_to_image(details), [0, 0, 1]]), np.eye(3), atol=1e-12)
        # the chip dlib cut, bit for bit
        chip = extract_chip(crop, landmarks, size, padding)
        assert hashlib.sha256(chip.tobytes()).hexdigest() == ref["chip_sha256"], ref["crop"]
        # OpenCV with the same map: same pixel-centre convention, differing only by rounding (OpenCV rounds,
        # dlib truncates) and where dlib zeroes the chip's border past the image
        warped = cv2.warpAffine(crop, chip_transform(landmarks, size, padding), (size, size), flags=cv2.INTER_LINEAR)
        difference = np.abs(warped.astype(int) - chip.astype(int))
        assert difference.mean() < 2.5
        assert np.median(difference[chip > 0]) <= 1


def test_landmarks_sit_on_the_face(predictor: ShapePredictor, data_dir: Path) -> None:
    # independent of dlib's references: on crops of other people the points land where faces have them
    faces = data_dir / "faces" / "lfw-crop-gray-128"
    paths = sorted(faces.glob("A*/*_0001.jpg"))[:12]
    assert len(paths) == 12
    for path in paths:
        crop = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        (x0, y0), (x1, y1), (x2, y2), (x3, y3), (x4, y4) = predictor.predict(crop, ALIGN_BOX)
        # image right to left: outer, inner corner of one eye, inner, outer corner of the other
        assert x0 > x1 > x3 > x2, path.name
        assert x3 < x4 < x1, path.name  # the nose base between the inner eye corners
        assert max(y0, y1, y2, y3) + 15 < y4, path.name  # well below the eyes
        eye_span = x0 - x2
        assert 0.35 * 104 < eye_span < 0.85 * 104, path.name  # outer eye corners span about half the 104 px box
        assert abs((y0 + y1) / 2 - (y2 + y3) / 2) < 0.3 * eye_span, path.name  # upright faces: eyes level-ish
    # the same face shifted by 10 px gives the same landmarks shifted by 10 px (up to dlib's pixel rounding)
    crop = cv2.imread(str(paths[0]), cv2.IMREAD_GRAYSCALE)
    shifted = np.zeros((148, 148), np.uint8)
    shifted[10:138, 10:138] = crop
    base = predictor.predict(crop, ALIGN_BOX, subpixel=True)
    moved = predictor.predict(shifted, tuple(v + 10 for v in ALIGN_BOX), subpixel=True)
    np.testing.assert_allclose(moved - 10, base, atol=1e-3)
