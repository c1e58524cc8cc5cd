"""The training command line refuses bad settings up front, with one line, before hours of data and teacher work.

Each case is a report from a review: a missing --init file was found only after the data (and, on a first
run, ~80 min of teacher embeddings) had been prepared; --p above the number of people failed inside numpy;
--compare with --pack crashed after its first run; a folder without LFW's people failed with "need at least
one array to stack"; and a training run writing to a log printed nothing for a whole 20-minute epoch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from conftest import run_cli

from training.common import StepLog


def face(*args: str) -> tuple[int, str]:
    result = run_cli("-m", "training", "face", "--recipe", "triplet", "--versions", "1", "--epochs", "1", *args)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.returncode, result.stderr


def test_missing_init_file_is_refused_before_any_data_is_read(tmp_path: Path) -> None:
    code, err = face("--data-dir", str(tmp_path / "nowhere"), "--init", str(tmp_path / "run.keras"))
    assert code == 2 and "--init" in err and "no such file" in err  # the data dir is missing too: not reached


def test_more_identities_per_batch_than_people(data_dir: Path, tmp_path: Path) -> None:
    code, err = face("--data-dir", str(data_dir), "--subset-people", "3", "--p", "8", "--out", str(tmp_path))
    assert code == 2 and "--p 8" in err and "only 3 people" in err


def test_compare_needs_the_evaluation_folds_a_pack_does_not_hold(tmp_path: Path) -> None:
    code, err = face("--pack", str(tmp_path / "pack.npz"), "--compare", "triplet", "--out", str(tmp_path))
    assert code == 2 and "training pack" in err
    code, err = face("--data-dir", str(tmp_path), "--compare", "triplet,arcface", "--out", str(tmp_path))
    assert code == 2 and "unknown recipe(s) arcface" in err


def test_a_folder_without_lfws_people_says_what_training_needs(data_dir: Path, tmp_path: Path) -> None:
    faces = tmp_path / "faces"
    for person in ("Ann", "Bob"):
        (faces / "lfw-crop-gray-128" / person).mkdir(parents=True)
        source = next((data_dir / "faces" / "lfw-crop-gray-128" / "Aaron_Peirsol").iterdir())
        shutil.copy(source, faces / "lfw-crop-gray-128" / person / "IMG_1.jpg")
    shutil.copy(data_dir / "faces" / "pairs.txt", faces / "pairs.txt")
    code, err = face("--data-dir", str(tmp_path), "--out", str(tmp_path / "run"))
    assert code == 2 and "LFW's people and file names" in err


def test_step_log_prints_lines_during_an_epoch(capsys) -> None:
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0, callbacks=[StepLog(4, every_s=0.0)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("step")]
    assert len(lines) == 4 and lines[-1].strip().startswith("step 4/4, loss ")
