"""dlib's face ResNet rebuilt in Keras (training/face/dlib_resnet.py) computes what dlib computes.

The reference descriptors in tests/fixtures/dlib_chip_descriptors.json were written by dlib 20.0.1's own
`face_recognition_model_v1.compute_face_descriptor` on 150x150 chips cut from three LFW crops exactly as
`chip` below cuts them (the file names the crops; the images stay in the shared data folder). Where dlib is
installed (host extra `teacher`) the same check also runs against dlib live.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, copy_bundle

from device.bundle import Bundle, BundleError, write_manifest
from device.face import ALIGNED_SPEC, LANDMARKS_FILE, Aligner, FaceEmbedder, face_input
from device.landmarks import read_dlib_shape_predictor
from training.face.dlib_resnet import (CHIP, CONVOLUTIONS, FRAMING, LANDMARKS_DAT, Framing, chip_model,
                                       find_model_file, find_weights, grey_embedder, read_dlib_resnet)
from training.teacher import teacher_available

FIXTURE = REPO / "tests" / "fixtures" / "dlib_chip_descriptors.json"


def chip(crop: np.ndarray, framing: Framing = FRAMING) -> np.ndarray:
    """The framing's square of a grey crop, resized to dlib's 150 px (bilinear, half-pixel centres as Keras'
    Resizing), as RGB uint8 — the pixels dlib was given for the reference descriptors."""
    square = crop[framing.top:framing.top + framing.side, framing.left:framing.left + framing.side]
    grey = cv2.resize(square.astype(np.float32), (CHIP, CHIP), interpolation=cv2.INTER_LINEAR)
    return np.repeat(np.clip(np.round(grey), 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


@pytest.fixture(scope="module")
def net():
    return read_dlib_resnet(find_weights())


@pytest.fixture(scope="module")
def reference(data_dir: Path):
    recorded = json.loads(FIXTURE.read_text())
    faces = data_dir / "faces" / "lfw-crop-gray-128"
    crops = [cv2.imread(str(faces / name), cv2.IMREAD_GRAYSCALE) for name in recorded["crops"]]
    assert all(c is not None and c.shape == (128, 128) for c in crops)
    return recorded, crops, np.array(recorded["descriptors"], np.float32)


def dlib_input(chips: np.ndarray, net) -> np.ndarray:
    """dlib's input layer: (pixel - channel mean) / 256, channels R, G, B."""
    return (chips.astype(np.float32) - np.array(net.channel_means, np.float32)) / 256


def test_weights_file_is_dlibs_resnet(net, reference) -> None:
    recorded, _, _ = reference
    assert net.sha256 == recorded["weights_sha256"]
    assert len(net.convs) == CONVOLUTIONS == 29
    assert [c.kernel.shape[-1] for c in net.convs][:3] == [32, 32, 32] and net.convs[-1].kernel.shape == (3, 3, 256, 256)
    assert [c.stride for c in net.convs].count(2) == 5  # the stem and four downsampling blocks
    assert net.dense.shape == (256, 128)
    assert net.channel_means == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)


def test_port_reproduces_dlibs_descriptors(net, reference) -> None:
    _, crops, expected = reference
    out = chip_model(net).predict(dlib_input(np.stack([chip(c) for c in crops]), net), verbose=0)
    assert np.abs(out - expected).max() < 1e-4 * np.abs(expected).max()
    cosine = np.sum(out * expected, axis=1) / np.linalg.norm(out, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.99999
    # Three different people: the descriptors are not one constant vector.
    assert np.linalg.norm(expected[0] - expected[1]) > 0.3


@pytest.mark.skipif(not teacher_available(), reason="dlib not installed (pip install .[teacher]); host-only")
def test_port_matches_dlib_live(net, reference) -> None:
    import dlib

    _, crops, expected = reference
    resnet = dlib.face_recognition_model_v1(str(find_weights()))
    live = np.array([resnet.compute_face_descriptor(np.ascontiguousarray(chip(c))) for c in crops], np.float32)
    assert np.abs(live - expected).max() < 1e-5


def test_grey_model_is_the_chip_model_on_a_cut_chip(net, reference) -> None:
    """The --no-align model (grey 128x128 crop in, FACE_SPEC normalisation) = crop → fixed chip → dlib, unit length."""
    _, crops, expected = reference
    x = np.stack([c.astype(np.float32) / 127.5 - 1.0 for c in crops])[..., None]
    out = grey_embedder(net, FRAMING).predict(x, verbose=0)
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    # Keras resizes the float crop, the reference chip was rounded to uint8 first: half a grey level apart.
    assert np.sum(out * unit, axis=1).min() > 0.999
    assert np.linalg.norm(out, axis=1) == pytest.approx(1.0, abs=1e-5)


def test_aligned_model_is_the_chip_model_on_the_aligners_chip(net, reference) -> None:
    """The shipped model takes the Aligner's grey chip (dlib's landmarks and transform) in FACE_SPEC normalisation."""
    _, crops, _ = reference
    stored = {LANDMARKS_FILE: read_dlib_shape_predictor(find_model_file(LANDMARKS_DAT)).to_bytes()}
    aligner = Aligner.from_spec(ALIGNED_SPEC, stored.__getitem__)
    chips = np.stack([aligner.chip(c) for c in crops])
    assert chips.shape == (3, CHIP, CHIP)
    x = np.stack([face_input(c, ALIGNED_SPEC, aligner) for c in crops])
    np.testing.assert_allclose(x[..., 0], chips / 127.5 - 1.0, atol=1e-6)
    out = grey_embedder(net, None).predict(x, verbose=0)
    rgb = np.repeat(chips[..., None], 3, axis=3)
    expected = chip_model(net).predict(dlib_input(rgb, net), verbose=0)
    np.testing.assert_allclose(out, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="aligned chips"):
        face_input(crops[0], ALIGNED_SPEC)


@pytest.fixture()
def bundle_copy(models_dir: Path, tmp_path: Path) -> Path:
    return copy_bundle(models_dir, "face-resnet", tmp_path)


def test_the_aligner_is_built_from_checked_bytes(bundle_copy: Path) -> None:
    """Modified after the bundle was loaded (and its hashes checked once), the landmark model is still refused: the
    aligner reads it through Bundle.read, which checks the bytes it hands over."""
    bundle = Bundle.load(bundle_copy)
    assert Aligner.from_spec(bundle.preprocessing, bundle.read).size == CHIP
    data = bytearray((bundle_copy / LANDMARKS_FILE).read_bytes())
    data[len(data) // 2] ^= 1
    (bundle_copy / LANDMARKS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its manifest"):
        Aligner.from_spec(bundle.preprocessing, bundle.read)
    with pytest.raises(BundleError, match="does not match its manifest"):
        FaceEmbedder.from_bundle(bundle_copy)


@pytest.mark.parametrize("change, message", [
    ({"box": [8, 19, 112]}, "four numbers"),
    ({"box": [0, 0, 0, 0]}, "inside the 128x128 crop"),
    ({"box": [8, 19, 112, 200]}, "inside the 128x128 crop"),
    ({"padding": -1}, "padding"),
    ({"crop": 0}, "whole numbers"),
    ({"chip": 100}, "not the model input size"),
    ({"box": "centre"}, "four numbers|could not convert"),
])
def test_a_damaged_align_entry_is_refused_at_load(bundle_copy: Path, change: dict, message: str) -> None:
    """Bad geometry in the manifest would fail (or quietly degrade) every frame of the door lock: refused up front, so
    `doorlock check-config` catches it."""
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["preprocessing"]["align"].update(change)
    write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match=message):
        FaceEmbedder.from_bundle(bundle_copy)


def test_the_enrolment_key_covers_the_alignment(bundle_copy: Path) -> None:
    """Enrolled embeddings are keyed by FaceEmbedder.identity: for an aligning bundle it changes with the landmark
    box even where the model file stays the same, so a rebuilt bundle re-embeds the gallery."""
    before = FaceEmbedder.from_bundle(bundle_copy)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["preprocessing"]["align"]["box"] = [9, 19, 112, 123]
    write_manifest(bundle_copy, manifest)
    after = FaceEmbedder.from_bundle(bundle_copy)
    assert after.model.path.read_bytes() == before.model.path.read_bytes()
    assert after.identity != before.identity and len(after.identity) == 64


def test_other_files_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "model.dat"
    other.write_bytes(b"\x01\x05con_4" + bytes(100))
    with pytest.raises(ValueError, match="not dlib's face recognition ResNet"):
        read_dlib_resnet(other)
    with pytest.raises(ValueError, match="does not fit"):
        grey_embedder(read_dlib_resnet(find_weights()), Framing(20, 20, 117))
