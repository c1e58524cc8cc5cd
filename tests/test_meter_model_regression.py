"""Accuracy regression of the SHIPPED meter-digits bundle on the held-out test meters.

Both models run through the device API (`MeterDigitModel.from_bundle`: LiteRT, the bundle's preprocessing and
its test-time views) on every crop of the test groups, meters the model never saw in training, exactly as the
converter measured them; the numbers must reproduce the manifest's, int8 must stay within the gate of float and
reach the issue's aims.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converter.meter import AIMS
from device.bundle import Bundle
from device.meter.model import TASK, TTA_VIEWS, MeterDigitModel, decode
from training.datasets.meter import TEST_GROUPS, VALIDATION_GROUPS, load_meter_digits
from training.meter import evaluate


@pytest.fixture(scope="module")
def measured(models_dir: Path, data_dir: Path) -> dict:
    bundle = Bundle.load(models_dir / "meter-digits")  # verifies every sha256 in the manifest
    test = load_meter_digits(data_dir, splits=("test",)).splits["test"]
    values = {variant: decode(MeterDigitModel.from_bundle(bundle.root, variant).probabilities(test.images))[0]
              for variant in ("float", "int8")}
    return {
        "bundle": bundle,
        "n": len(test),
        "test": test,
        "int8_values": values["int8"],
        **{variant: evaluate(values[variant], test.labels, test.groups) for variant in ("float", "int8")},
    }


def test_bundle_describes_task_split_and_preprocessing(measured: dict) -> None:
    manifest = measured["bundle"].manifest
    assert manifest["task"] == TASK and len(manifest["labels"]) == 100 and manifest["labels"][79] == "7.9"
    assert manifest["split"]["test_groups"] == list(TEST_GROUPS)
    assert manifest["split"]["validation_groups"] == list(VALIDATION_GROUPS)
    assert not set(manifest["split"]["train_groups"]) & set(TEST_GROUPS)
    assert manifest["preprocessing"]["size"] == [32, 20] and manifest["preprocessing"]["color"] == "RGB"
    assert manifest["models"]["int8"]["input"]["dtype"] == "int8"
    assert manifest["evaluation"]["n"] == measured["n"] and manifest["evaluation"]["limited_to"] is None
    assert manifest["inference"]["views"] == [list(v) for v in TTA_VIEWS]  # measured as the device reads a wheel


def test_manifest_metrics_are_what_the_device_measures(measured: dict) -> None:
    """The manifest's numbers must be reproducible from the shipped files on the real test crops."""
    recorded = measured["bundle"].manifest["metrics"]
    for variant in ("float", "int8"):
        for key in ("whole_digit_accuracy", "rolling_within_0.1", "rolling_within_0.2"):
            assert recorded[variant][key] == pytest.approx(measured[variant][key], abs=1e-9)
        assert recorded[variant]["per_group"] == measured[variant]["per_group"]
    assert set(measured["int8"]["per_group"]) == set(TEST_GROUPS)


def test_int8_stays_within_the_gate_of_float(measured: dict) -> None:
    gate = measured["bundle"].manifest["gate"]
    assert gate["metric"] == "whole_digit_accuracy" and gate["passed"]
    drop_pp = 100 * (measured["float"]["whole_digit_accuracy"] - measured["int8"]["whole_digit_accuracy"])
    assert drop_pp <= gate["max_drop_pp"] == 0.5
    assert measured["float"]["rolling_within_0.2"] - measured["int8"]["rolling_within_0.2"] <= 0.005


@pytest.mark.xfail(strict=True, reason="issue 4's rolling aim (98% within ±0.2) is missed by a hair on the 7 test "
                   "meters' crops as the converter gates them, without the reader's auto stretch (int8 97.98% with 5 "
                   "views per wheel; watermeter/pp 88.6%; with it 98.31%, the test below). It read 98.19% while an 8th "
                   "test meter, watermeter2, turned out to be in training under new/ and was moved there; strict, so "
                   "reaching it fails this marker")
def test_int8_reaches_the_rolling_aim_on_unseen_meters(measured: dict) -> None:
    assert measured["int8"]["rolling_within_0.2"] >= AIMS["rolling_within_0.2"]


@pytest.mark.xfail(strict=True, reason="issue 4's whole-digit aim is not reached yet on the test meters (int8 98.65%, "
                   "7 misses: lcd/lcd_pb 3, watermeter/pp 4; models/meter-digits/report.md; 99.03% with the reader's "
                   "auto stretch); strict, so reaching it fails this marker and it must be removed")
def test_int8_reaches_the_whole_digit_aim_on_unseen_meters(measured: dict) -> None:
    assert measured["int8"]["whole_digit_accuracy"] >= AIMS["whole_digit_accuracy"]


def test_the_readers_default_auto_stretch_on_unseen_meters(measured: dict, models_dir: Path) -> None:
    """The reader's default, `stretch_contrast = "auto"`, stretches the wheels of a frame whose clearest wheel is dimmer
    than any real training or validation meter's (AUTO_STRETCH_BELOW, chosen on those meters only). The data set has
    crops, not frames: a test frame here is 8 consecutive crops of one test meter in file order. It may switch on
    only for watermeter/pp (grey digits on dark red), must not read any meter worse than plain, and, read so, the
    test meters reach the rolling aim (98.31% within ±0.2; whole digits 99.03%, still under 99.5%). Disclosure: pp's
    low contrast was seen (session 9) before the threshold rule was written."""
    test = measured["test"]
    model = MeterDigitModel.from_bundle(models_dir / "meter-digits", "int8", stretch="auto")
    values, stretched = np.zeros(len(test)), set()
    for group in TEST_GROUPS:
        members = sorted((path, i) for i, (path, g) in enumerate(zip(test.paths, test.groups)) if g == group)
        index = [i for _, i in members]
        for start in range(0, len(index), 8):
            frame = index[start:start + 8]
            crops = [test.images[i] for i in frame]
            values[frame] = decode(model.probabilities(crops))[0]
            if model.stretches(crops):
                stretched.add(group)
    auto = evaluate(values, test.labels, test.groups)
    assert stretched == {"watermeter/pp"}
    for group, plain in measured["int8"]["per_group"].items():
        for key in ("whole_digit_accuracy", "rolling_within_0.2"):
            if plain[key] is not None:
                assert auto["per_group"][group][key] >= plain[key], (group, key)
    assert auto["whole_digit_accuracy"] > measured["int8"]["whole_digit_accuracy"]
    assert auto["rolling_within_0.2"] >= AIMS["rolling_within_0.2"], auto["rolling_within_0.2"]


def test_blank_lcd_positions_read_as_leading_zeros(measured: dict) -> None:
    """lcd/lcd_pb labels its unlit leading positions 0.0; before blank positions were synthesised in training
    (training/meter.py: blank_position) the model read most of them as 1 (77.7% whole digits on that meter)."""
    test = measured["test"]
    zeros = np.array([g == "lcd/lcd_pb" and v == 0.0 for g, v in zip(test.groups, test.labels)])
    assert zeros.sum() >= 20  # 20 of these 31 show an unlit position, the rest a real 0
    read = np.round(measured["int8_values"][zeros]).astype(int) % 10
    assert np.mean(read == 0) >= 0.9
    assert measured["int8"]["per_group"]["lcd/lcd_pb"]["whole_digit_accuracy"] >= 0.95
