"""The meter crop loader on the real collection: labels, groups, deduplication, and a leak-free split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli

from training.datasets import DataNotFoundError
from training.datasets.meter import (
    LCD_GROUPS,
    SPLITS,
    TEST_GROUPS,
    VALIDATION_GROUPS,
    folder_group,
    load_meter_digits,
    parse_label,
)
from training.meter import blank_position, is_whole, with_blanks


@pytest.fixture(scope="module")
def dataset(data_dir: Path):
    return load_meter_digits(data_dir)


@pytest.mark.parametrize("name, value", [
    ("7.9_ab12.jpg", 7.9), ("0.0_x.jpg", 0.0), ("9.9_0.0_main_dig6_20220602-045722.jpg", 9.9),
    ("3_0073cd07.jpg", 3.0), ("0_abc.jpg", 0.0),  # LCD groups: bare whole digits
])
def test_labels_are_wheel_positions(name: str, value: float) -> None:
    assert parse_label(name) == pytest.approx(value)


def test_not_a_digit_class_and_stray_names() -> None:
    assert parse_label("10_91ca606e.jpg") is None
    for bad in ("x_1.jpg", "12.3_a.jpg", "7.95_a.jpg", "readme.jpg"):
        with pytest.raises(ValueError, match="digit label"):
            parse_label(bad)


def test_time_folders_are_one_meter() -> None:
    assert folder_group(Path("gasmeter/GMT/iotson/20220516/07/3.4_x.jpg")) == "gasmeter/GMT/iotson"
    assert folder_group(Path("powermeter/ISKRA.T3F-01S1_20250630/20250630_manual/1.0_x.jpg")) == \
        "powermeter/ISKRA.T3F-01S1_20250630"
    assert folder_group(Path("watermeter/Unknown/iotson/watermeter2/20220519/18/1.2_x.jpg")) == \
        "watermeter/Unknown/iotson/watermeter2"
    assert folder_group(Path("new/1.0_x.jpg")) == "new"


def test_split_is_by_group_and_leak_free(dataset) -> None:
    groups = {name: set(dataset.splits[name].groups) for name in SPLITS}
    assert groups["test"] == set(TEST_GROUPS) and groups["validation"] == set(VALIDATION_GROUPS)
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]
    assert not groups["test"] & groups["validation"]
    # No byte-identical image on two sides, even where the collection holds copies under other names.
    hashes = {name: {hashlib.sha1((dataset.root / p).read_bytes()).hexdigest() for p in dataset.splits[name].paths}
              for name in SPLITS}
    assert not hashes["train"] & hashes["test"] and not hashes["train"] & hashes["validation"]
    sizes = {name: len(dataset.splits[name]) for name in SPLITS}
    assert sum(sizes.values()) + dataset.duplicates + dataset.not_a_digit == 16521  # every file accounted for
    assert sizes["test"] > 1500 and sizes["train"] > 10000


def test_no_test_or_validation_crop_has_a_near_copy_in_training(dataset) -> None:
    """Byte hashes only catch exact copies; the same meter photographed into two folders does not share bytes.
    Thumbnails (24x16 grey, mean removed, unit length) of every test and validation crop against every training
    crop: a correlation above 0.95 is the same wheel of the same meter. (`watermeter2`, once a test meter, had
    26 crops above 0.95 with crops in `new/`, up to 0.985; the other meters stay below 0.87.)"""
    def thumbnails(images: list) -> np.ndarray:
        grey = np.stack([cv2.resize(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), (16, 24), interpolation=cv2.INTER_AREA)
                         for im in images]).reshape(len(images), -1).astype(np.float32)
        grey -= grey.mean(axis=1, keepdims=True)
        return grey / np.maximum(np.linalg.norm(grey, axis=1, keepdims=True), 1e-6)

    train = thumbnails(dataset.splits["train"].images)
    for name in ("test", "validation"):
        crops = dataset.splits[name]
        best = (thumbnails(crops.images) @ train.T).max(axis=1)
        worst = int(np.argmax(best))
        assert best[worst] < 0.95, (name, crops.paths[worst], float(best[worst]))


def test_copies_under_other_names_are_merged_into_one_meter(dataset) -> None:
    assert "powermeter/ISKRA T3F-01S1" in dataset.merged["powermeter/ISKRA.T3F-01S1_20250630"]
    assert {"lcd", "watermeter/Metrona/warm"} <= set(dataset.merged["watermeter/Metrona/cold"])
    all_groups = {g for crops in dataset.splits.values() for g in crops.groups}
    assert "powermeter/ISKRA T3F-01S1" not in all_groups and "lcd" not in all_groups


def test_a_copy_filed_under_a_training_name_keeps_a_test_meter_in_test(data_dir: Path, tmp_path: Path) -> None:
    """Merging kept the longer name: one crop of test meter pp copied to `pp_copy_from_forum/` moved pp into training."""
    source = sorted((data_dir / "meter-digits" / "collected" / "watermeter" / "pp").rglob("*.jpg"))[:3]
    collected = tmp_path / "meter-digits" / "collected" / "watermeter"
    for folder, files in (("pp", source), ("pp_copy_from_forum", source[:1])):
        (collected / folder).mkdir(parents=True)
        for f in files:
            (collected / folder / f.name).write_bytes(f.read_bytes())
    loaded = load_meter_digits(tmp_path)
    assert loaded.splits["test"].groups == ["watermeter/pp"] * 3 and not loaded.splits["train"].groups
    assert loaded.merged == {"watermeter/pp": ["watermeter/pp_copy_from_forum"]}


def test_grey_crops_load_as_three_channels(data_dir: Path, tmp_path: Path) -> None:
    """A grey JPEG (an IR camera's crop) stopped training: augmentation scales three channels."""
    crop = sorted((data_dir / "meter-digits" / "collected" / "watermeter" / "pp").rglob("*.jpg"))[0]
    folder = tmp_path / "meter-digits" / "collected" / "watermeter" / "ir_camera"
    folder.mkdir(parents=True)
    grey = cv2.cvtColor(cv2.imread(str(crop)), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(folder / crop.name), grey)
    image = load_meter_digits(tmp_path).splits["train"].images[0]
    assert image.shape == (*grey.shape, 3) and np.array_equal(image[..., 1], cv2.imread(str(folder / crop.name), 0))


def test_lcd_bare_integers_are_whole_digits(dataset) -> None:
    test = dataset.splits["test"]
    lcd = np.array([g == "lcd/lcd_pb" for g in test.groups])
    values = test.labels[lcd]
    assert lcd.sum() > 100 and is_whole(values).all()
    assert set(np.round(values).astype(int)) == set(range(10))
    assert all(parse_label(Path(p).name) == v for p, v in zip(np.array(test.paths)[lcd], values))


def test_images_are_bgr_crops_and_rolling_labels_exist(dataset) -> None:
    test = dataset.splits["test"]
    assert all(im.ndim == 3 and im.shape[2] == 3 and im.dtype == np.uint8 for im in test.images)
    assert (~is_whole(test.labels)).sum() > 1000  # rolling wheels are the bulk of the test set


def test_missing_data_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_meter_digits(tmp_path)


def _ink(image: np.ndarray) -> float:
    """Stroke contrast: spread of the grey levels' fine detail (minus a blur a stroke wide), so a light
    gradient over the glass does not count as ink."""
    grey = image.mean(axis=2).astype(np.float32)
    detail = grey - cv2.GaussianBlur(grey, (0, 0), grey.shape[1] / 6)
    return float(np.percentile(detail, 95) - np.percentile(detail, 5))


def test_lcd_groups_exist_and_blank_positions_lose_their_segments(dataset) -> None:
    """Blank LCD positions (read as leading zeros) are synthesised from real LCD crops of training meters only."""
    seen = set(dataset.splits["train"].groups) | set(dataset.splits["validation"].groups)
    assert set(LCD_GROUPS) <= seen and not set(LCD_GROUPS) & set(TEST_GROUPS)
    crops = dataset.splits["train"] + dataset.splits["validation"]
    rng = np.random.default_rng(0)
    lcd = [i for i, g in enumerate(crops.groups) if g in LCD_GROUPS]
    ratios = []
    for i in rng.choice(lcd, 100, replace=False):
        blank = blank_position(crops.images[i], rng)
        assert blank.shape == crops.images[i].shape and blank.dtype == np.uint8
        ratios.append(_ink(blank) / _ink(crops.images[i]))
    assert max(ratios) < 0.75 and np.median(ratios) < 0.4  # at most a faint ghost of the segments is left

    chosen = rng.choice(len(crops), 3000)
    images, values = with_blanks(crops, chosen, rng, share=0.5)
    changed = np.array([im is not crops.images[i] for im, i in zip(images, chosen)])
    in_lcd = np.array([crops.groups[i] in LCD_GROUPS for i in chosen])
    assert changed.any() and not (changed & ~in_lcd).any()  # wheels are never blanked
    assert (values[changed] == 0.0).all()
    np.testing.assert_array_equal(values[~changed], crops.labels[chosen][~changed])


def test_training_on_a_collection_without_the_fixed_meters_or_with_a_corrupt_crop_says_so(
        data_dir: Path, tmp_path: Path) -> None:
    """A user's own collected/ folder crashed inside Keras (empty validation), a truncated JPEG with a traceback."""
    crops = sorted((data_dir / "meter-digits" / "collected" / "watermeter" / "pp").rglob("*.jpg"))[:20]
    folder = tmp_path / "meter-digits" / "collected" / "mymeter"
    folder.mkdir(parents=True)
    for f in crops:
        (folder / f.name).write_bytes(f.read_bytes())
    run = run_cli("-m", "training", "meter", "--data-dir", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "no validation crops" in run.stderr and "watermeter/altair/alkr" in run.stderr
    assert "Traceback" not in run.stderr
    (folder / "5.0_broken.jpg").write_bytes(crops[0].read_bytes()[:40])
    run = run_cli("-m", "training", "meter", "--data-dir", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "5.0_broken.jpg" in run.stderr and "Traceback" not in run.stderr
