"""The shipped face bundles through the device API, on the real LFW evaluation pairs: models/face (the student cut
out of dlib's network and distilled from it) and models/face-resnet (dlib's network, ported), each module test once
per bundle.

int8 must stay within the bundle's own gate of float, and the thresholds in the manifest must be the ones
calibrated on the int8 model's embeddings (recomputed here from scratch through `FaceEmbedder`).
The teacher test needs dlib (host extra `teacher`) and is skipped without it.
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from device.bundle import Bundle, BundleError, write_manifest
from device.face import FaceEmbedder
from training.datasets.lfw import find_faces_dir, find_pairs_file, list_people, make_split, read_pairs
from training.face.data import pair_images
from training.teacher import teacher_available


# A floor under each shipped model's int8 accuracy (~97% and 98.5%): a broken rebuild passes the relative gate,
# not this.
FLOORS = {"face": 0.96, "face-resnet": 0.975}


@pytest.fixture(scope="module", params=sorted(FLOORS))
def bundle(models_dir, request):
    path = models_dir / request.param
    if not (path / "manifest.json").is_file():
        pytest.fail(f"models/{request.param} is missing: build it with `make quantize-{request.param}`")
    return Bundle.load(path)


@pytest.fixture(scope="module")
def eval_set(data_dir, bundle):
    faces = find_faces_dir(data_dir)
    people = list_people(faces)
    split = make_split(people, read_pairs(find_pairs_file(data_dir, faces)),
                       eval_folds=tuple(bundle.manifest["evaluation"]["folds"]))
    keys, crops = pair_images(split.eval_pairs, people)
    return split, keys, crops


@pytest.fixture(scope="module")
def embeddings(bundle, eval_set):
    _, _, crops = eval_set
    result = {}
    for variant in ("float", "int8"):
        embedder = FaceEmbedder.from_bundle(bundle.root, variant=variant, threads=2)
        result[variant] = (embedder, np.stack([embedder.embed(c) for c in crops]))
    return result


def test_int8_within_gate_of_float_on_eval_pairs(bundle, eval_set, embeddings):
    from converter.face import PairSet

    split, keys, _ = eval_set
    pairs = PairSet(split.eval_pairs, keys)
    float_report = pairs.report(embeddings["float"][1])
    int8_report = pairs.report(embeddings["int8"][1])
    assert int8_report["pairs"] == bundle.manifest["evaluation"]["pairs"] == len(split.eval_pairs)
    drop_pp = 100 * (float_report["accuracy_mean"] - int8_report["accuracy_mean"])
    # The documented gate, not the bundle's own record of it (a bundle converted with a looser limit must fail).
    assert bundle.manifest["gate"]["max_drop_pp"] == 0.5 and drop_pp <= 0.5 + 1e-9
    assert int8_report["accuracy_mean"] >= FLOORS[bundle.root.name]
    assert int8_report["accuracy_mean"] == pytest.approx(bundle.manifest["metrics"]["int8"]["accuracy_mean"], abs=1e-9)
    assert np.mean(np.sum(embeddings["float"][1] * embeddings["int8"][1], axis=1)) > 0.95


@pytest.fixture(scope="module")
def calibration(data_dir, bundle, eval_set, embeddings):
    """The validation people's images (the thresholds' calibration set) embedded by each variant."""
    from converter.face import PairSet
    from training.face.data import validation_set

    split, _, _ = eval_set
    validation = validation_set(split, list_people(find_faces_dir(data_dir)))
    assert not {k.rsplit("_", 1)[0] for k in validation.keys} & set(split.eval_people)
    vectors = {v: np.stack([embeddings[v][0].embed(c) for c in validation.crops]) for v in ("float", "int8")}
    return PairSet(split.validation_pairs, validation.keys), vectors


def test_manifest_thresholds_are_the_int8_models(bundle, calibration, embeddings):
    """Recomputed from scratch through the device API on the calibration (validation) people."""
    calibrate, vectors = calibration
    embedder, _ = embeddings["int8"]
    recalibrated = calibrate.thresholds(vectors["int8"])
    assert set(bundle.thresholds) == {"far_0.1pct", "far_0.001pct", "best_accuracy"}
    for name, value in recalibrated.items():
        assert bundle.thresholds[name] == pytest.approx(value, abs=1e-5)
        assert embedder.threshold(name) == bundle.thresholds[name]
    assert bundle.thresholds["far_0.001pct"] < bundle.thresholds["far_0.1pct"]
    float_thresholds = bundle.model_info("float")["thresholds"]
    assert embeddings["float"][0].threshold() == float_thresholds["far_0.1pct"]


def test_a_threshold_calibrated_on_some_strangers_holds_for_others(eval_set, embeddings):
    """The bundle's thresholds are calibrated on every impostor pair of the evaluation people, so checking their
    FAR on those same pairs proves nothing. Here the evaluation people are split in two halves: the distance
    that lets in 0.1% of the impostor pairs among one half's images is applied to the other half's, whose
    strangers it never saw. A calibration that generalises stays near 0.1% (allowed: up to 3x)."""
    split, keys, _ = eval_set
    _, int8 = embeddings["int8"]
    person = np.array([k.rsplit("_", 1)[0] for k in keys])
    names = sorted(set(person))
    half = np.isin(person, names[::2])

    def impostor_distances(rows: np.ndarray) -> np.ndarray:
        vectors, who = int8[rows], person[rows]
        i, j = np.triu_indices(len(vectors), 1)
        different = who[i] != who[j]
        return np.sqrt(np.maximum(0.0, 2 - 2 * np.sum(vectors[i[different]] * vectors[j[different]], axis=1)))

    far = {}
    for calibrate, check in ((half, ~half), (~half, half)):
        seen, unseen = impostor_distances(np.flatnonzero(calibrate)), impostor_distances(np.flatnonzero(check))
        threshold = np.sort(seen)[int(0.001 * len(seen))]  # accept distances below: 0.1% of the seen strangers
        assert len(unseen) > 300_000 and np.mean(seen < threshold) <= 0.001
        far[len(far)] = float(np.mean(unseen < threshold))
    print("FAR on unseen strangers at a threshold for 0.1% on the others:", far)
    assert all(value <= 0.003 for value in far.values()), far


def test_normalised_thresholds_are_the_int8_models_and_beat_raw_distance(bundle, eval_set, embeddings, calibration):
    """The cohort file and score thresholds the device loads reproduce the converter's calibration, and on the
    evaluation people the normalised score accepts more genuine pairs than the raw distance at the same FAR."""
    from converter.face import PairSet

    split, keys, _ = eval_set
    embedder, int8 = embeddings["int8"]
    assert embedder.cohort is not None and len(embedder.cohort.vectors) == len(split.train_people)
    pairs = PairSet(split.eval_pairs, keys)
    calibrate, vectors = calibration
    recalibrated = calibrate.score_thresholds(vectors["int8"], embedder.cohort)
    for name, value in recalibrated.items():
        assert embedder.score_threshold(name) == pytest.approx(value, abs=1e-4)
    details = pairs.check_normalised(int8, embedder.cohort, recalibrated)
    raw = pairs.check(int8, calibrate.thresholds(vectors["int8"]))
    for name in ("far_0.1pct", "far_0.001pct"):
        assert details[name]["tar_on_pairs"] > raw[name]["tar_on_pairs"], name
    assert details["pairs_report"]["auc"] > bundle.manifest["metrics"]["int8"]["auc"]
    with pytest.raises(BundleError, match="available"):
        embedder.score_threshold("no-such-threshold")


def test_a_bundle_without_a_cohort_matches_on_distance(bundle, tmp_path):
    """Bundles made before score normalisation (or by other tools) still load; the lock then uses distances."""
    from device.detect import FaceDetector
    from device.doorlock.pipeline import Recognizer

    copy = tmp_path / "face"
    shutil.copytree(bundle.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for info in manifest["models"].values():
        (copy / info.pop("score_normalisation")["cohort"]).unlink()
    write_manifest(copy, manifest)
    embedder = FaceEmbedder.from_bundle(copy)
    assert embedder.cohort is None
    with pytest.raises(BundleError, match="no cohort"):
        embedder.score_threshold()
    recognizer = Recognizer(FaceDetector(), embedder, min_blur=0)
    assert not recognizer.normalises("far_0.001pct") and recognizer.gallery([], "far_0.001pct").cohort is None
    assert recognizer.threshold("far_0.001pct") == embedder.threshold("far_0.001pct")
    assert recognizer.describe_threshold("far_0.001pct").startswith("far_0.001pct = distance <= ")


def test_embedder_api_on_a_real_pair(bundle, eval_set, embeddings):
    split, keys, crops = eval_set
    embedder, int8 = embeddings["int8"]
    index = {k: i for i, k in enumerate(keys)}
    vectors = {k: int8[i] for k, i in index.items()}
    a, b = (vectors[k] for k in split.eval_pairs[0].keys())
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert embedder.distance(a, b) == pytest.approx(np.sqrt(2 - 2 * embedder.similarity(a, b)), abs=1e-5)
    assert embedder.compare(a, a) is True
    assert embedder.compare(a, b, threshold=embedder.distance(a, b)) is True
    # BGR input of another size is accepted and lands on nearly the same embedding.
    bgr = np.repeat(crops[index[split.eval_pairs[0].keys()[0]]][:, :, None], 3, axis=2)
    assert embedder.similarity(embedder.embed(bgr), a) > 0.999
    with pytest.raises(BundleError, match="available"):
        embedder.threshold("no-such-threshold")


@pytest.mark.skipif(not teacher_available(), reason="dlib teacher not installed (pip install .[teacher]); host-only")
def test_teacher_separates_a_real_pair(eval_set):
    from training.teacher import load_teacher

    split, keys, crops = eval_set
    teacher = load_teacher()
    index = {k: i for i, k in enumerate(keys)}
    same = next(p for p in split.eval_pairs if p.same)
    different = next(p for p in split.eval_pairs if not p.same)
    embed = {k: teacher.embed(crops[index[k]]) for p in (same, different) for k in p.keys()}
    assert all(abs(np.linalg.norm(v) - 1) < 1e-4 for v in embed.values())
    distance = {name: np.linalg.norm(embed[p.keys()[0]] - embed[p.keys()[1]])
                for name, p in (("same", same), ("different", different))}
    assert distance["same"] < distance["different"]
    # worker processes get the teacher by pickling, which loads the same model files again
    clone = pickle.loads(pickle.dumps(teacher))
    assert clone.model_digest == teacher.model_digest
    np.testing.assert_allclose(clone.embed(crops[index[same.keys()[0]]]), embed[same.keys()[0]], atol=1e-6)


def test_flip_averaged_embedding_is_mirror_invariant(bundle, eval_set, embeddings):
    """Face bundles average a face's and its mirror image's outputs, so a mirrored crop gives the same embedding:
    exactly when the model sees the resized crop, nearly when it sees an aligned chip, as both shipped bundles do
    (the landmarks of the mirrored crop, searched in the same box, are not exactly the mirrored landmarks: cosine
    down to 0.984 for the 112 px student, 0.994 for face-resnet)."""
    _, _, crops = eval_set
    embedder, _ = embeddings["int8"]
    assert bundle.preprocessing.get("flip_average") is True
    for crop in crops[:5]:
        mirrored, plain = embedder.embed(np.ascontiguousarray(crop[:, ::-1])), embedder.embed(crop)
        if "align" in bundle.preprocessing:  # the same person by a wide margin even at the strictest threshold
            assert float(np.linalg.norm(mirrored - plain)) < 0.5 * embedder.threshold("far_0.001pct")
        else:
            np.testing.assert_allclose(mirrored, plain, atol=1e-6)
