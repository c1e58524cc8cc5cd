"""The face training pack: what the host writes is what a GPU machine without LFW or dlib trains on.

Real LFW images of 12 training people and the real validation pairs; the teacher vectors are a fixed random
projection standing in for dlib (CI has no dlib; the pack's job is to carry vectors aligned to their image
versions, whatever computed them). The last test trains one real epoch from the pack.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training.datasets.lfw import find_faces_dir, find_pairs_file, list_people, make_split, read_pairs
from training.face.data import training_set, validation_set
from training.face.pack import read_pack, write_pack
from training.teacher import TeacherCache, TeacherUnavailable, teacher_embeddings

VERSIONS = 3


@pytest.fixture(scope="module")
def small(data_dir: Path, tmp_path_factory) -> tuple[Path, object, np.ndarray]:
    """A pack of 12 training people x 3 versions, and the float teacher vectors it was written from."""
    faces = find_faces_dir(data_dir)
    people = list_people(faces)
    split = make_split(people, read_pairs(find_pairs_file(data_dir, faces)))
    split = replace(split, train_people=[n for n in split.train_people if len(people[n]) >= 2][:12])
    folder = tmp_path_factory.mktemp("pack")
    projection = np.random.default_rng(0).normal(size=(128 * 128, 128)).astype(np.float32)

    def embed(crop: np.ndarray) -> np.ndarray:
        v = crop.reshape(-1).astype(np.float32) @ projection
        return v / np.linalg.norm(v)

    data = training_set(split, people, VERSIONS)
    cache = TeacherCache(folder / "cache", "stand-in")
    vectors = teacher_embeddings(data.crops[::2], cache, embed)  # half cached beforehand: the pack computes the rest
    path = write_pack(folder / "pack.npz", people, split, VERSIONS, cache, embed)
    vectors = teacher_embeddings(data.crops, cache, None)
    return path, (split, data), vectors


def test_pack_reproduces_the_training_set_and_its_targets(small, data_dir):
    path, (split, data), vectors = small
    pack = read_pack(path)
    assert pack.pixels_match  # same decoder here: the re-decoded originals are bit-identical
    np.testing.assert_array_equal(pack.data.crops, data.crops)  # every augmented version, re-made from the bytes
    np.testing.assert_array_equal(pack.data.labels, data.labels)
    assert pack.data.keys == data.keys and list(pack.data.versions) == list(data.versions)
    cosine = np.sum(pack.targets * vectors, axis=1)  # int8 storage keeps each target's direction
    assert cosine.min() > 0.999
    validation = validation_set(split, list_people(find_faces_dir(data_dir)))  # what training from LFW uses
    assert pack.validation.pairs == validation.pairs and pack.validation.keys == validation.keys
    np.testing.assert_array_equal(pack.validation.crops, validation.crops)
    np.testing.assert_array_equal(pack.validation.labels, validation.labels)
    assert pack.split["train_people"] == 12 and pack.split["eval_folds"] == [8, 9, 10]


def test_pack_takes_fewer_versions_and_refuses_more(small):
    path, (_, data), vectors = small
    first = read_pack(path, versions=1)
    assert len(first.data.crops) == len(data.crops) // VERSIONS and set(first.data.versions) == {0}
    assert np.sum(first.targets * vectors[::VERSIONS], axis=1).min() > 0.999
    with pytest.raises(ValueError, match="holds 3 versions"):
        read_pack(path, versions=VERSIONS + 1)


def test_pack_errors_name_the_problem(small, tmp_path):
    not_pack = tmp_path / "other.npz"
    np.savez(not_pack, x=np.zeros(3))
    with pytest.raises(TeacherUnavailable, match="format none, this code reads edge-face-pack/2"):
        read_pack(not_pack)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(small[0].read_bytes()[:1000])
    with pytest.raises(TeacherUnavailable, match="not a readable face training pack"):
        read_pack(broken)


def test_training_runs_from_a_pack_alone(small, tmp_path):
    """One real epoch of distillation + triplet from the pack, with no data directory and no teacher cache."""
    from training.face.train import train

    path = train(tmp_path / "run", recipe="distill+triplet", epochs=1, versions=VERSIONS, p=4, k=4, pack=small[0],
                 data_dir=tmp_path / "no-data-here", cache_dir=tmp_path / "no-cache-here", width=16, input_size=48)
    info = json.loads(path.with_name("train_info.json").read_text())
    assert info["pack"] == str(small[0]) and info["train_samples"] == len(small[1][1].crops)
    assert info["preprocessing"]["size"] == [48, 48] and "keras_eval" not in info  # evaluation is the converter's
    history = json.loads(path.with_name("history.json").read_text())
    assert history["distill"][0] > 0 and 0.0 <= history["val_balanced_accuracy"][0] <= 1.0


def test_pack_without_teacher_names_the_missing_embeddings(small, data_dir, tmp_path):
    """No teacher and an incomplete cache: nothing is written, and the error says how to get the teacher."""
    faces = find_faces_dir(data_dir)
    people = list_people(faces)
    split = make_split(people, read_pairs(find_pairs_file(data_dir, faces)))
    split = replace(split, train_people=split.train_people[:3])
    with pytest.raises(TeacherUnavailable, match=r"not cached; .*pip install \.\[teacher\]"):
        write_pack(tmp_path / "p.npz", people, split, 2, TeacherCache(tmp_path, "stand-in"), None)
    assert not (tmp_path / "p.npz").exists()
