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

from device.face import LANDMARKS_FILE, aligned_spec
from device.landmarks import read_dlib_shape_predictor
from training.common import count_macs
from training.datasets.lfw import load_faces
from training.face.dlib_resnet import (CHIP, LANDMARKS_DAT, LEVELS, find_model_file, find_weights, grey_embedder,
                                       read_dlib_resnet)
from training.face.recipes import SLIM_WIDTHS as WIDTHS
from training.face.slim import (FEATURE_LAYERS, aligner_for, blend, channel_scores, chip_input, chip_teacher_targets,
                                chips_of, cut, feature_trainer, train_slim)


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


@pytest.fixture(scope="module")
def scores(teacher, crops, landmarks):
    return channel_scores(teacher, chip_input(chips_of(crops, (aligner_for(CHIP, landmarks),))[0]))


@pytest.mark.parametrize("size", [CHIP, 112])
def test_full_width_cut_is_dlibs_network_reordered(net, crops, landmarks, scores, size) -> None:
    """At dlib's widths the cut must be dlib's network itself, channels reordered, at 150 px and at the student's
    112 px (where the map sizes differ and dlib's add_prev grows the down blocks' output to the pool's size)."""
    full = cut(net, scores, tuple(width for _, width in LEVELS), size)
    x = chip_input(chips_of(crops, (aligner_for(size, landmarks),))[0])
    same = grey_embedder(full, None, chip=size).predict(x, verbose=0)
    expected = grey_embedder(net, None, chip=size).predict(x, verbose=0)
    assert np.sum(same * expected, axis=1).min() > 0.99999
    # The channels really were reordered (by activation), so the identity above is not trivial.
    assert not np.array_equal(full.convs[0].kernel, net.convs[0].kernel)


def test_shipped_widths_make_a_compact_112px_student(net, scores, crops, landmarks) -> None:
    slim = cut(net, scores, WIDTHS, 112)
    model = grey_embedder(slim, None, chip=112, centre=np.zeros(128, np.float32))
    assert model.input_shape == (None, 112, 112, 1)
    assert model.count_params() < 1_000_000 < teacher_param_count(net)
    assert count_macs(model) < 100_000_000
    # At 112 px every down block still has room for dlib's unpadded stride-2 convolution (the last one sees 3x3) ...
    assert [c.padding for c in slim.convs if c.stride == 2] == [0, 0, 0, 0, 0]
    assert model.get_layer("l4b0_conv1").output.shape[1:3] == (1, 1)
    # ... and a chip so small that the last one would see 2x2 pads it instead of failing to build.
    tiny = grey_embedder(cut(net, scores, WIDTHS, 96), None, chip=96)
    assert [c.padding for c in cut(net, scores, WIDTHS, 96).convs if c.stride == 2][-1] == "same"
    assert tiny.output_shape == (None, 128)
    out = model.predict(chip_input(chips_of(crops, (aligner_for(112, landmarks),))[0]), verbose=0)
    assert np.isfinite(out).all() and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


def teacher_param_count(net) -> int:
    return sum(c.kernel.size + c.bias.size for c in net.convs) + net.dense.size


@pytest.mark.parametrize("widths", [(32, 48, 64, 80), (64, 48, 64, 80, 96), (32, 48, 64, 80, 300), (0, 8, 8, 8, 8)])
def test_bad_widths_are_refused(net, scores, widths) -> None:
    with pytest.raises(ValueError, match="width"):
        cut(net, scores, widths, 112)


def test_two_chip_sizes_from_one_landmark_search_are_the_aligners_own_chips(crops, landmarks) -> None:
    big, small = aligner_for(CHIP, landmarks), aligner_for(112, landmarks)
    chips, small_chips = chips_of(crops[:4], (big, small))
    assert chips.shape == (4, CHIP, CHIP) and small_chips.shape == (4, 112, 112)
    assert np.array_equal(chips, np.stack([big.chip(c) for c in crops[:4]]))
    assert np.array_equal(small_chips, np.stack([small.chip(c) for c in crops[:4]]))


def test_teacher_labels_are_cached_under_a_checksum_of_the_pixels(tmp_path, teacher, crops, landmarks) -> None:
    chips = chips_of(crops[:6], (aligner_for(CHIP, landmarks),))[0]
    first = chip_teacher_targets(teacher, chips, tmp_path, "weights-sha")
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob("*.tmp.npz"))
    labelled = []  # chips the teacher was asked to label, per call

    class Counting:
        def predict(self, x, *args, **kwargs):
            labelled.append(len(x))
            return teacher.predict(x, *args, **kwargs)

    again = chip_teacher_targets(Counting(), chips, tmp_path, "weights-sha")
    assert labelled == [1] and np.array_equal(first, again)  # a hit: only the first chip, to check the teacher
    changed = chips.copy()
    changed[0, 70, 70] ^= 1  # one grey level of one pixel: a new key, labelled afresh
    chip_teacher_targets(Counting(), changed, tmp_path, "weights-sha")
    assert labelled == [1, 6] and len(list(tmp_path.glob("*.npz"))) == 2
    chip_teacher_targets(Counting(), chips, tmp_path, "other-weights")  # other weights: a new key too
    assert labelled == [1, 6, 6]


def test_a_damaged_or_foreign_cache_file_is_recomputed(tmp_path, teacher, crops, landmarks) -> None:
    chips = chips_of(crops[:4], (aligner_for(CHIP, landmarks),))[0]
    first = chip_teacher_targets(teacher, chips, tmp_path, "weights-sha")
    (stored,) = tmp_path.glob("*.npz")
    good = stored.read_bytes()
    # Labels of another teacher (a changed port, same weights file) under the right key: caught by the probe.
    with np.load(stored) as data:
        np.savez(stored, digest=data["digest"], targets=-data["targets"])
    assert np.allclose(chip_teacher_targets(teacher, chips, tmp_path, "weights-sha"), first, atol=1e-6)
    for damaged in (b"not an npz", good[: len(good) // 2], b""):
        stored.write_bytes(damaged)
        assert np.allclose(chip_teacher_targets(teacher, chips, tmp_path, "weights-sha"), first, atol=1e-6)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir) -> Path:
    """A real, tiny run: 40 people, 1 version, 1 epoch."""
    root = tmp_path_factory.mktemp("slim")
    return train_slim(root / "run", data_dir, size=112, versions=1, epochs=1, batch=32, cache_dir=root / "cache",
                      subset_people=40)


def test_training_smoke_run_saves_a_model_the_converter_reads_as_aligned(smoke_run, tmp_path) -> None:
    """The converter must load what a run saves (inference only, with the student's own layers) as a 112 px
    aligned-chip model, and the epoch kept must be the best one scored."""
    from converter.face import input_spec
    from converter.package import load_trained

    path = smoke_run
    model, info = load_trained(path, "face", 128)
    spec, aligner, files = input_spec(model, info)
    assert spec["size"] == [112, 112] and spec["align"]["chip"] == 112 and aligner.size == 112
    assert list(files) == [LANDMARKS_FILE] and info["widths"] == list(WIDTHS)
    assert model.get_layer("centre").get_weights()[0].shape == (128,)
    history = json.loads((path.parent / "history.json").read_text())
    assert history["epoch"] == [0, 1] and history["loss"][0] is None and history["loss"][1] > 0
    scores = history["val_balanced_accuracy"]
    assert info["best_epoch"] == int(np.argmax(scores)) and info["validation"]["val_balanced_accuracy"] == max(scores)
    assert info["split"]["train_people"] == 40 and 8 in info["split"]["eval_folds"]
    assert info["preprocessing"] == aligned_spec(112)


def test_a_run_continues_a_finished_model_on_fresh_blended_versions(smoke_run, data_dir, tmp_path) -> None:
    """--init/--first-version/--mixup/--feature-weight: the continued run starts from the finished model itself (its
    score is epoch 0, its centre is kept, so targets stay in the direction it learnt), records where it came from,
    and with feature distillation logs each level's gap and saves the student alone (no projections)."""
    import keras

    first = json.loads(smoke_run.with_name("train_info.json").read_text())
    path = train_slim(tmp_path / "more", data_dir, versions=1, epochs=1, batch=32, cache_dir=tmp_path / "cache",
                      subset_people=40, init=smoke_run, first_version=1, mixup=0.5, feature_weight=0.05)
    info = json.loads(path.with_name("train_info.json").read_text())
    history = json.loads(path.with_name("history.json").read_text())
    assert info["loss_weights"] == {"distill": 1.0, "features": 0.05}
    assert list(info["feature_gap_start"]) == list(FEATURE_LAYERS)
    assert all(0.0 <= gap <= 1.0 for gap in info["feature_gap_start"].values())
    gaps = [history[f"{name}_gap_loss"] for name in FEATURE_LAYERS]
    assert all(gap[0] is None and 0 < gap[1] < 10 for gap in gaps)  # index i is epoch i: the start has no loss
    assert history["embedding_loss"][0] is None and 0 < history["embedding_loss"][1] < 2  # 1 - cos, unweighted
    saved = keras.models.load_model(path, compile=False)
    assert len(saved.outputs) == 1 and saved.output_shape == (None, 128)  # the student alone, no projections
    assert history["val_balanced_accuracy"][0] == pytest.approx(first["validation"]["val_balanced_accuracy"])
    assert info["widths"] == list(WIDTHS) and info["first_version"] == 1 and info["mixup"] == 0.5
    assert info["continued_from"]["model"] == str(smoke_run) and info["continued_from"]["versions"] == 1
    before, after = (keras.models.load_model(p, compile=False).get_layer("centre").get_weights()[0]
                     for p in (smoke_run, path))
    np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError, match="mixup"):
        train_slim(tmp_path / "bad", data_dir, mixup=1.5)
    for weight in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="feature_weight"):
            train_slim(tmp_path / "bad", data_dir, feature_weight=weight)
    with pytest.raises(ValueError, match="too small"):  # before any labelling
        train_slim(tmp_path / "bad", data_dir, size=96, feature_weight=0.05)


def test_feature_trainer_starts_at_the_least_squares_fit_and_trains_only_student_and_projections(
        smoke_run, net, crops, landmarks) -> None:
    """The training model's gap outputs must compute, with the projections set to their least-squares fit, the same
    gaps the fit reports (<= 1: with a bias, a fitted projection does at least as well as the teacher map's mean;
    level 4's 1x1 map, 24 rows for 97 unknowns, fits exactly), its first output must be the student's own embedding,
    and a training step must move the student and the projections but never the teacher."""
    import keras

    student = keras.models.load_model(smoke_run, compile=False)
    size = int(student.input_shape[1])
    x = chip_input(chips_of(crops, (aligner_for(size, landmarks),))[0])
    teacher = grey_embedder(net, None, chip=size)
    trainer, start = feature_trainer(student, teacher, x)
    outputs = trainer.predict(x, verbose=0)
    assert len(start) == len(FEATURE_LAYERS) and all(0.0 <= gap <= 1.0 for gap in start)
    assert start[0] > 0.01  # 24 chips x 26 x 26 positions leave level 0 far from an exact fit
    np.testing.assert_allclose([out.mean() for out in outputs[1:]], start, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(outputs[0], student.predict(x, verbose=0), atol=1e-5)

    projections = [w for layer in trainer.layers if layer.name.endswith("_to_teacher") for w in layer.weights]
    assert len(projections) == 2 * len(FEATURE_LAYERS)
    assert {id(w) for w in trainer.trainable_weights} == {id(w) for w in student.trainable_weights + projections}
    before = {name: [np.array(w) for w in model.weights]
              for name, model in (("teacher", teacher), ("student", student))}
    before["projections"] = [np.array(w) for w in projections]
    trainer.compile(optimizer=keras.optimizers.SGD(0.01), loss=[lambda t, p: keras.ops.mean(p, axis=-1)]
                    + [lambda _, gap: gap] * len(FEATURE_LAYERS))
    trainer.fit(x, (outputs[0],) + (np.zeros(len(x), np.float32),) * len(FEATURE_LAYERS), epochs=1, verbose=0)
    moved = {name: any(not np.array_equal(a, np.array(b)) for a, b in zip(weights, current))
             for (name, weights), current in zip(before.items(),
                                                 (teacher.weights, student.weights, projections))}
    assert moved == {"teacher": False, "student": True, "projections": True}


def test_blending_mixes_the_same_partner_with_the_same_weight_at_both_sizes() -> None:
    """Chip i is filled with the value 10 i at both sizes, so a blended chip's value names its partner and weight:
    the teacher's and the student's picture must get the same ones, and the own face must keep at least half."""
    values = np.arange(20, dtype=np.uint8) * 10
    big = np.broadcast_to(values[:, None, None], (20, 6, 6)).copy()
    small = np.broadcast_to(values[:, None, None], (20, 4, 4)).copy()
    for share, seed in ((0.0, 1), (1.0, 1), (0.5, 7)):
        mixed_big, mixed_small = blend(big, small, share, seed)
        np.testing.assert_array_equal(mixed_big[:, 0, 0], mixed_small[:, 0, 0])
        assert (mixed_big == mixed_big[:, :1, :1]).all()  # a blend of flat chips stays flat
        changed = mixed_big[:, 0, 0] != values
        assert not changed.any() if share == 0 else changed.mean() >= share - 0.3
        assert (np.abs(mixed_big[:, 0, 0].astype(int) - values) <= 96).all()  # own weight >= 0.5 of a 190 range
    again = blend(big, small, 0.5, 7)
    np.testing.assert_array_equal(again[0], blend(big, small, 0.5, 7)[0])
    np.testing.assert_array_equal(big[:, 0, 0], values)  # the inputs are not changed in place


@pytest.mark.parametrize("args, message", [(["--mixup", "1.5"], "between 0 and 1"),
                                           (["--first-version", "-1"], "0 or more"),
                                           (["--feature-weight", "-0.1"], "0 or more"),
                                           (["--feature-weight", "nan"], "0 or more"),
                                           (["--feature-weight", "inf"], "0 or more")])
def test_continuation_options_are_checked_before_anything_runs(args, message, capsys) -> None:
    from training.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["face-slim", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_continuing_a_missing_model_is_a_clear_error(tmp_path, capsys) -> None:
    from training.cli import main

    assert main(["face-slim", "--init", str(tmp_path / "nowhere.keras"), "--out", str(tmp_path / "run")]) == 2
    assert "no such model file" in capsys.readouterr().err and not (tmp_path / "run").exists()
