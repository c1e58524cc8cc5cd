"""Face detection (device/detect.py) on the real scene photos in the shared data set."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from device.detect import DetectorError, FaceDetector, blur_score
from device.images import load_image


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def scene(data_dir: Path, name: str) -> np.ndarray:
    return load_image(data_dir / "faces" / "scenes" / name)


@pytest.mark.parametrize("name", ["obama.jpg", "obama2.jpg", "biden.jpg", "alex-lacamoire.png", "obama-480p.jpg"])
def test_one_face_in_portraits(detector: FaceDetector, data_dir: Path, name: str) -> None:
    image = scene(data_dir, name)
    faces = detector.detect(image)
    assert len(faces) == 1
    x, y, w, h = faces[0].box
    # The face is in the upper part of a portrait and a sizeable share of the width.
    assert 0 <= x and x + w <= image.shape[1] and 0 <= y < image.shape[0] / 2
    assert w > image.shape[1] / 8


def test_two_people_largest_first(detector: FaceDetector, data_dir: Path) -> None:
    image = scene(data_dir, "two_people.jpg")
    faces = detector.detect(image)
    assert len(faces) == 2
    assert faces[0].box[2] * faces[0].box[3] >= faces[1].box[2] * faces[1].box[3]
    assert detector.largest(image) == faces[0]
    # One on the left half, one on the right half.
    centres = sorted(f.box[0] + f.box[2] / 2 for f in faces)
    assert centres[0] < image.shape[1] / 2 < centres[1]


@pytest.mark.parametrize("name", ["obama_partial_face.jpg", "obama_partial_face2.jpg"])
def test_partial_faces_are_not_detected(detector: FaceDetector, data_dir: Path, name: str) -> None:
    assert detector.detect(scene(data_dir, name)) == []


def test_minimum_face_size(data_dir: Path) -> None:
    image = scene(data_dir, "obama.jpg")
    face = FaceDetector().largest(image)
    assert face is not None
    assert FaceDetector(min_face=2 * face.size).detect(image) == []
    assert all(f.size >= 150 for f in FaceDetector(min_face=150).detect(scene(data_dir, "two_people.jpg")))


def test_search_near_previous_box_finds_the_same_face(detector: FaceDetector, data_dir: Path) -> None:
    image = scene(data_dir, "two_people.jpg")
    faces = detector.detect(image)
    # Hinted with the smaller face, the search around it returns that face (tracking the person in front).
    near = detector.detect(image, near=faces[1].box)[0].box
    assert np.abs(np.subtract(near, faces[1].box)).max() <= faces[1].box[2] * 0.15


def test_blur_score_drops_on_blurred_face(detector: FaceDetector, data_dir: Path) -> None:
    image = scene(data_dir, "obama.jpg")
    box = detector.largest(image).box
    sharp = blur_score(image, box)
    blurred = blur_score(cv2.GaussianBlur(image, (0, 0), 6), box)
    assert blurred < sharp / 5
    assert blur_score(image, (10_000, 10_000, 5, 5)) == 0.0


def test_missing_yunet_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match="not found"):
        FaceDetector(tmp_path / "face_detection_yunet.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(DetectorError, match="YuNet"):
        FaceDetector(bad)


def test_haar_box_reproduces_the_lfw_framing(detector: FaceDetector, data_dir: Path) -> None:
    """The embedder was trained on LFW crops (central 118 px of the 250 px original, whose Haar box is ~114 px).
    Run on those crops, upscaled and mirror-padded to give context, our detector must find a box of ~114/118 of
    the crop, centred: then `crop_face` on a camera frame gives the framing the model was trained on."""
    paths = sorted((data_dir / "faces" / "lfw-crop-gray-128").glob("*/*_0001.jpg"))[::40][:120]
    sizes, offsets = [], []
    for path in paths:
        crop = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (256, 256))
        face = detector.largest(cv2.copyMakeBorder(crop, 128, 128, 128, 128, cv2.BORDER_REFLECT))
        if face is not None:
            x, y, w, h = face.box
            sizes.append(w / 256)
            offsets.append(((x + w / 2 - 256) / 256, (y + h / 2 - 256) / 256))
    assert len(sizes) >= 0.95 * len(paths)
    assert abs(np.median(sizes) - 114 / 118) < 0.04
    assert np.abs(np.median(offsets, axis=0)).max() < 0.03


def test_tracking_box_outside_a_smaller_frame_is_ignored(detector: FaceDetector, data_dir: Path) -> None:
    """Failure report: after the camera came back at a smaller resolution, the last face box (in the old frame's
    pixels) lay outside the new frame; the search region around it was empty and every frame failed."""
    image = scene(data_dir, "obama.jpg")
    height, width = image.shape[:2]
    (face,) = detector.detect(image)
    stale = (width + 300, 50, 300, 300)  # where the face was in a 1.5x wider frame
    assert detector.detect(image, near=stale) == [face]
    assert detector.detect(image, near=(-500, -500, 100, 100)) == [face]
