"""The compact student cut out of dlib's network (training/face/slim.py): the cut, its teacher-label cache, a smoke run.

The cut is checked against the real dlib weights (face_recognition_models, host extra) on real LFW crops aligned by
the device's own Aligner: at dlib's full widths the "cut" must be dlib's network with its channels reordered, which
proves the channel bookkeeping (the residual stream's order across down blocks) that a narrower cut relies on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device.face import aligned_spec
from device.landmarks import read_dlib_shape_predictor
from training.common import count_macs
from training.datasets.lfw import load_faces
from training.face.dlib_resnet import (CHIP, LANDMARKS_DAT, LEVELS, find_model_file, find_weights, grey_embedder,
                                       read_dlib_resnet)
from training.face.slim import WIDTHS, aligner_for, channel_scores, chips_of, cut, teacher_targets, train_slim


@pytest.fixture(scope="module")
def net():
    return read_dlib_resnet(find_weights())


@pytest.fixture(scope="module")
def teacher(net):
    return grey_embedder(net, None)


@pytest.fixture(scope="module")
def crops(data_dir: Path) -> np.ndarray:
    faces = data_dir / "faces" / "lfw-crop-gray-128"
    return load_faces(sorted(faces.glob("A*/*_0001.jpg"))[:24], progress=False)


@pytest.fixture(scope="module")
def landmarks() -> bytes:
    return read_dlib_shape_predictor(find_model_file(LANDMARKS_DAT)).to_bytes()


def as_input(chips: np.ndarray) -> np.ndarray:
    return chips[..., None].astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def scores(teacher, crops, landmarks):
    return channel_scores(teacher, as_input(chips_of(crops, aligner_for(CHIP, landmarks))))


def test_full_width_cut_is_dlibs_network_reordered(net, teacher, crops, landmarks, scores) -> None:
    full = cut(net, scores, tuple(width for _, width in LEVELS), CHIP)
    x = as_input(chips_of(crops, aligner_for(CHIP, landmarks)))
    same = grey_embedder(full, None).predict(x, verbose=0)
    expected = teacher.predict(x, verbose=0)
    assert np.sum(same * expected, axis=1).min() > 0.99999
    # The channels really were reordered (by activation), so the identity above is not trivial.
    assert not np.array_equal(full.convs[0].kernel, net.convs[0].kernel)


def test_shipped_widths_make_a_compact_112px_student(net, scores, crops, landmarks) -> None:
    slim = cut(net, scores, WIDTHS, 112)
    model = grey_embedder(slim, None, chip=112, centre=np.zeros(128, np.float32))
    assert model.input_shape == (None, 112, 112, 1)
    assert model.count_params() < 1_000_000 < read_param_count(net)
    assert count_macs(model) < 100_000_000
    # Only the last down block sees 2x2 at 112 px, too small for dlib's unpadded stride-2 convolution.
    assert [c.padding for c in slim.convs if c.stride == 2] == [0, 0, 0, 0, "same"]
    out = model.predict(as_input(chips_of(crops, aligner_for(112, landmarks))), verbose=0)
    assert np.isfinite(out).all() and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


def read_param_count(net) -> int:
    return sum(c.kernel.size + c.bias.size for c in net.convs) + net.dense.size


@pytest.mark.parametrize("widths", [(32, 48, 64, 80), (64, 48, 64, 80, 96), (32, 48, 64, 80, 300), (0, 8, 8, 8, 8)])
def test_bad_widths_are_refused(net, scores, widths) -> None:
    with pytest.raises(ValueError, match="width"):
        cut(net, scores, widths, 112)


def test_teacher_labels_are_cached_under_a_checksum_of_the_pixels(tmp_path, teacher, crops, landmarks) -> None:
    chips = chips_of(crops[:6], aligner_for(CHIP, landmarks))
    first = teacher_targets(teacher, chips, tmp_path, "weights-sha")
    assert len(list(tmp_path.glob("*.npz"))) == 1
    calls = []

    class Counting:
        def predict(self, *args, **kwargs):
            calls.append(1)
            return teacher.predict(*args, **kwargs)

    again = teacher_targets(Counting(), chips, tmp_path, "weights-sha")
    assert calls == [] and np.array_equal(first, again)
    changed = chips.copy()
    changed[0, 70, 70] ^= 1  # one grey level of one pixel: a new key, labelled afresh
    teacher_targets(Counting(), changed, tmp_path, "weights-sha")
    assert calls == [1] and len(list(tmp_path.glob("*.npz"))) == 2
    for stored in tmp_path.glob("*.npz"):  # a damaged cache file is recomputed, not trusted
        stored.write_bytes(b"not an npz")
    again = teacher_targets(Counting(), chips, tmp_path, "weights-sha")
    assert calls == [1, 1] and np.allclose(first, again, atol=1e-6)


def test_training_smoke_run_saves_an_aligned_chip_model(tmp_path, data_dir) -> None:
    """A real, tiny run: 40 people, 1 version, 1 epoch. It must save a model the converter can read as an aligned
    112 px chip model, keep the best of the untrained cut and the trained epoch, and record its split."""
    path = train_slim(tmp_path / "run", data_dir, size=112, versions=1, epochs=1, batch=32,
                      cache_dir=tmp_path / "cache", subset_people=40)
    info = json.loads((tmp_path / "run" / "train_info.json").read_text())
    assert path.is_file() and info["input"] == "aligned-chip" and info["widths"] == list(WIDTHS)
    assert info["preprocessing"] == aligned_spec(112)
    assert info["best_epoch"] in (0, 1) and 0.5 < info["validation"]["val_balanced_accuracy"] <= 1.0
    assert info["split"]["train_people"] == 40 and 8 in info["split"]["eval_folds"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["val_balanced_accuracy"]) == 2  # epoch 0 (the cut) and epoch 1
