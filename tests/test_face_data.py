"""Face embedder, host side without the teacher: LFW loaders, the identity-disjoint split, the verification
metrics on hand-checkable numbers, the augmentation and the teacher-embedding cache mechanics, crop geometry.

All on the real LFW crops and pairs.txt under the data directory; nothing here needs dlib.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from device.face import CROP_TO_BOX, crop_face
from device.images import ImageError
from training.datasets.lfw import (
    EVAL_FOLDS,
    LFW_DUPLICATE_IMAGES,
    LFW_SAME_PERSON,
    find_faces_dir,
    find_pairs_file,
    list_people,
    load_face,
    make_split,
    read_pairs,
)
from training.face.data import augment, validation_set
from training.face.metrics import (
    all_pairs_report,
    balanced_accuracy,
    best_threshold,
    cross_fold_accuracy,
    resolved_tar_at_far,
    roc_auc,
    tar_at_far,
    threshold_at_far,
    verification_report,
)
from training.teacher import TeacherCache, TeacherUnavailable, teacher_embeddings


class Projection:
    """A picklable stand-in for dlib (a fixed random projection), so worker processes can load it."""

    def __init__(self, seed: int = 0):
        self.matrix = np.random.default_rng(seed).normal(size=(128 * 128, 128)).astype(np.float32)

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        v = crop.reshape(-1).astype(np.float32) @ self.matrix
        return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def lfw(data_dir):
    faces = find_faces_dir(data_dir)
    people = list_people(faces)
    pairs = read_pairs(find_pairs_file(data_dir, faces))
    return people, pairs, make_split(people, pairs)


def test_loaders_read_the_real_data(lfw):
    people, pairs, _ = lfw
    assert len(people) == 5616
    assert sum(len(images) for images in people.values()) == 12794
    assert len(pairs) == 6000
    assert {p.fold for p in pairs} == set(range(1, 11))
    assert sum(p.same for p in pairs) == 3000
    crop = load_face(next(iter(people["George_W_Bush"].values())))
    assert crop.shape == (128, 128) and crop.dtype == np.uint8


def test_standard_lfw_layout_gets_the_same_framing(lfw, tmp_path):
    """A 250x250 LFW original is cut to its central 118 px, as lfw-crop-gray-128 was made."""
    people, _, _ = lfw
    crop = load_face(people["Colin_Powell"]["Colin_Powell_0001"])
    original = cv2.copyMakeBorder(cv2.resize(crop, (118, 118), interpolation=cv2.INTER_AREA), 66, 66, 66, 66,
                                  cv2.BORDER_CONSTANT, value=0)
    person = tmp_path / "lfw" / "Colin_Powell"
    person.mkdir(parents=True)
    cv2.imwrite(str(person / "Colin_Powell_0001.png"), cv2.cvtColor(original, cv2.COLOR_GRAY2BGR))
    assert find_faces_dir(tmp_path) == tmp_path / "lfw"
    again = load_face(person / "Colin_Powell_0001.png")
    assert again.shape == (128, 128)
    assert np.abs(again.astype(int) - crop.astype(int)).mean() < 4  # only resampling differs


def test_split_is_identity_disjoint(lfw):
    people, pairs, split = lfw
    train, validation, evaluation = set(split.train_people), set(split.validation_people), set(split.eval_people)
    assert not train & evaluation and not validation & evaluation and not train & validation
    eval_names = {n for p in pairs if p.fold in EVAL_FOLDS for n in (p.name1, p.name2)}
    assert eval_names & set(people) == evaluation
    assert len(split.eval_pairs) + split.missing_pairs == 1800
    assert split.eval_folds == (8, 9, 10)
    # No evaluation image can reach training: every eval-pair image belongs to an evaluation person.
    assert all(n in evaluation for p in split.eval_pairs for n in (p.name1, p.name2))
    assert all(n not in evaluation for p in split.validation_pairs for n in (p.name1, p.name2))
    assert train | validation | evaluation == set(people) - set(LFW_SAME_PERSON) - {"Richard_Lugar"}


def test_lfw_errata_never_reach_training_or_the_cohort(lfw):
    """Photos filed under a second name and a person filed under two names (found by nearest-neighbour search
    of every evaluation image in training): the evaluation side keeps them, the training side never sees them."""
    people, _, split = lfw
    training = split.training_images(people)
    trained_keys = {k for images in training.values() for k in images}
    assert not trained_keys & set(LFW_DUPLICATE_IMAGES) and all(training.values())  # nobody left without a photo
    owners = {k.rsplit("_", 1)[0] for k in LFW_DUPLICATE_IMAGES}  # training people, apart from the errata
    assert owners <= set(people) - set(split.eval_people) - set(split.validation_people)
    assert "Richard_Lugar" not in split.train_people  # his one photo is John Sununu's
    for alias, name in LFW_SAME_PERSON.items():
        assert name in split.eval_people and alias in people and alias not in split.train_people
    assert sum(len(v) for v in training.values()) == \
        sum(len(people[n]) for n in split.train_people) - sum(k.rsplit("_", 1)[0] in split.train_people
                                                                for k in LFW_DUPLICATE_IMAGES)


def test_metrics_on_a_hand_checkable_example():
    # Same pairs at 0.1, 0.2, 0.5; different pairs at 0.3, 0.6, 0.9.
    distances = np.array([0.1, 0.2, 0.5, 0.3, 0.6, 0.9])
    same = np.array([True, True, True, False, False, False])
    # 8 of 9 (same, different) orderings are right: only 0.5 (same) is not below 0.3 (different).
    assert roc_auc(distances, same) == pytest.approx(8 / 9)
    threshold, accuracy = best_threshold(distances, same)
    assert accuracy == pytest.approx(5 / 6) and threshold in (pytest.approx(0.25), pytest.approx(0.55))
    # One impostor in three may pass at FAR 34%: threshold between 0.3 and 0.6, two of three genuine accepted.
    result = tar_at_far(distances, same, 0.34)
    assert result["threshold"] == pytest.approx(0.45) and result["tar"] == pytest.approx(2 / 3)
    assert threshold_at_far(np.array([0.3, 0.6, 0.9]), 0.0) < 0.3
    # Ties across the line are refused together: 40% of five allows two, but the four at 1.0 are one distance.
    tied = np.array([1.0, 1.0, 1.0, 1.0, 2.0])
    assert np.mean(tied <= threshold_at_far(tied, 0.4)) == 0.0
    assert threshold_at_far(np.array([0.5, 1.0, 1.0, 1.0, 2.0]), 0.4) == pytest.approx(0.75)
    # Folds 1 and 2 each hold one same and one different pair.
    folds = np.array([1, 1, 2, 2])
    d = np.array([0.2, 0.4, 0.3, 0.8])
    s = np.array([True, False, True, False])
    cross = cross_fold_accuracy(d, s, folds)
    # Fold 1 uses fold 2's threshold (0.55): accepts 0.4 → 50%. Fold 2 uses fold 1's (0.3): 0.3 accepted → 100%.
    assert cross["per_fold"][1]["accuracy"] == 0.5 and cross["per_fold"][2]["accuracy"] == 1.0
    # LFW's way: sample std (n - 1) and standard error std / sqrt(folds): 0.3536 and 0.25 for [0.5, 1.0]
    assert cross["mean"] == 0.75 and cross["std"] == pytest.approx(0.5 ** 0.5 / 2)
    assert cross["standard_error"] == pytest.approx(0.25)
    report = verification_report(d, s, folds)
    assert report["pairs"] == 4 and report["auc"] == 1.0
    # Two different pairs cannot show a FAR of 1%: no TAR "at 1%" (it was the TAR at zero false accepts).
    assert report["tar_far_1pct"] is None and report["tar_far_0.1pct"] is None
    assert resolved_tar_at_far(np.tile(d, 50), np.tile(s, 50), 0.01) == 1.0  # 100 different pairs resolve 1%
    with pytest.raises(ValueError, match="at least 2 folds"):  # was an IndexError from an empty "other folds"
        verification_report(d[:2], s[:2], folds[:2])


def test_all_pairs_metrics_on_a_hand_checkable_example():
    # Balanced accuracy weighs genuine and impostor pairs equally, however many of each there are.
    # Sorted: 0.1 same, 0.2 same, 0.3 diff, 0.4 same, 0.5 diff → accept up to 0.25: TAR 2/3, FAR 0.
    distances = np.array([0.4, 0.1, 0.5, 0.2, 0.3])
    same = np.array([True, True, False, True, False])
    threshold, accuracy = balanced_accuracy(distances, same)
    assert threshold == pytest.approx(0.25) and accuracy == pytest.approx((2 / 3 + 1) / 2)
    # Ties stay together: a same and a different pair at one distance are accepted or refused as one.
    assert balanced_accuracy(np.array([0.2, 0.2, 0.9]), np.array([True, False, False]))[1] == pytest.approx(0.75)
    # Four unit vectors, two people: (a, a') identical, (b, b') at cos 0.8, people 90° and ~53° apart.
    vectors = np.array([[1, 0], [1, 0], [0, 1], [0.6, 0.8]])
    report = all_pairs_report(vectors, np.array([0, 0, 1, 1]))
    assert report["pairs"] == 6 and report["same_pairs"] == 2
    assert report["balanced_accuracy"] == 1.0 and report["auc"] == 1.0
    # Accepts genuine distances 0 and 0.632, refuses impostors at 0.894 and 1.414: the midpoint is between.
    assert 0.633 < report["threshold"] < 0.894


def test_validation_set_holds_every_validation_pair_and_only_validation_people(lfw):
    people, _, split = lfw
    validation = validation_set(split, people)
    named = {k for p in split.validation_pairs for k in p.keys()}
    assert named <= set(validation.keys) and validation.pairs == split.validation_pairs
    owners = {k.rsplit("_", 1)[0] for k in validation.keys}
    assert owners == set(split.validation_people)  # every validation person, nobody else
    assert len(validation.keys) == len(validation.crops) == len(validation.labels) > len(named)
    labels = validation.labels
    assert len(set(labels.tolist())) == len(owners)
    same = labels[:, None] == labels[None, :]
    assert (same.sum() - len(labels)) // 2 > 4 * sum(p.same for p in split.validation_pairs)  # far more genuine pairs


def test_augmentation_is_deterministic_and_stays_a_face_crop(lfw):
    people, _, _ = lfw
    crop = load_face(people["Tony_Blair"]["Tony_Blair_0001"])
    assert augment(crop, "Tony_Blair_0001", 0) is crop
    first, again = augment(crop, "Tony_Blair_0001", 1), augment(crop, "Tony_Blair_0001", 1)
    assert np.array_equal(first, again)  # same pixels → same teacher cache key
    assert not np.array_equal(first, augment(crop, "Tony_Blair_0001", 3))
    mirrored = crop[:, ::-1].astype(float)
    assert np.corrcoef(first.ravel(), mirrored.ravel())[0, 1] > np.corrcoef(first.ravel(), crop.ravel())[0, 1]


def test_teacher_cache_write_read_invalidate(lfw, tmp_path):
    """The cache's own mechanics with real crops; the embed function is a fixed projection standing in for dlib
    (this test is about keys, persistence and invalidation, not about the teacher's numbers)."""
    people, _, _ = lfw
    crops = np.stack([load_face(p) for p in list(people["Tony_Blair"].values())[:3]])
    projection = np.random.default_rng(0).normal(size=(128 * 128, 128)).astype(np.float32)
    calls = []

    def embed(crop: np.ndarray) -> np.ndarray:
        calls.append(1)
        v = crop.reshape(-1).astype(np.float32) @ projection
        return v / np.linalg.norm(v)

    cache = TeacherCache(tmp_path, "model-A")
    first = teacher_embeddings(crops, cache, embed)
    assert len(calls) == 3 and cache.path.is_file()

    reloaded = TeacherCache(tmp_path, "model-A")  # read back from disk: no recomputation
    assert len(reloaded) == 3
    np.testing.assert_array_equal(teacher_embeddings(crops, reloaded, None), first)
    assert TeacherCache.existing(tmp_path).model_digest == "model-A"

    changed = crops.copy()
    changed[0, 0, 0] ^= 1  # one pixel differs → that entry misses, the others still hit
    assert reloaded.get(changed[0]) is None and reloaded.get(changed[1]) is not None
    teacher_embeddings(changed, reloaded, embed)
    assert len(calls) == 4

    other_model = TeacherCache(tmp_path, "model-B")  # new model file checksum → nothing is reused
    assert len(other_model) == 0 and other_model.get(crops[1]) is None
    with pytest.raises(TeacherUnavailable, match=r"pip install \.\[teacher\]"):
        teacher_embeddings(crops, other_model, None)


def test_crop_face_reproduces_the_training_framing(lfw):
    """Place a real crop in a bigger frame as if a Haar box had found it, and crop it back."""
    people, _, _ = lfw
    crop = load_face(people["Colin_Powell"]["Colin_Powell_0001"])
    side = 236  # the crop shown 1.84x larger in a 640x480 frame
    frame = np.full((480, 640), 90, np.uint8)
    frame[100 : 100 + side, 200 : 200 + side] = cv2.resize(crop, (side, side), interpolation=cv2.INTER_LINEAR)
    box_side = side / CROP_TO_BOX
    box = (200 + (side - box_side) / 2, 100 + (side - box_side) / 2, box_side, box_side)
    back = crop_face(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR), box)
    assert back.shape == (128, 128) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - crop.astype(int)).mean() < 4

    corner = crop_face(frame, (-30, -30, 100, 100))  # square leaves the frame: edge pixels repeated
    assert corner.shape == (128, 128) and corner[0, 0] == frame[0, 0]
    for bad in [(0, 0, 0, 10), (5000, 5000, 10, 10), ("a", 0, 1, 1)]:
        with pytest.raises(ImageError):
            crop_face(frame, bad)


def test_teacher_worker_processes_return_every_embedding_in_order(lfw, tmp_path):
    """Two spawned workers must give exactly what one process gives, each vector under its own image's key."""
    people, _, _ = lfw
    paths = [path for name in sorted(people)[:400] for path in people[name].values()][:160]
    crops = np.stack([load_face(p) for p in paths])
    serial = teacher_embeddings(crops, TeacherCache(tmp_path / "serial", "m"), Projection())
    parallel_cache = TeacherCache(tmp_path / "parallel", "m")
    parallel = teacher_embeddings(crops, parallel_cache, Projection(), workers=2)
    np.testing.assert_allclose(parallel, serial, rtol=0, atol=1e-6)
    assert len(TeacherCache(tmp_path / "parallel", "m")) == len({c.tobytes() for c in crops})
