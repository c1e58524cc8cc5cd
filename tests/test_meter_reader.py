"""The meter reader: config validation, the rolling-digit assembly rule, and whole frames end to end.

Frames are COMPOSED (device/meter/compose.py): real digit-window crops of one physical electricity meter
(`powermeter/unknown/miboe`, a group the digit model never saw in training) are pasted onto a
counter band with four reference marks, then shifted, rotated, put in perspective, lit unevenly and
blurred. The data set has crops only, no whole-meter recordings with known readings, so this is the
closest honest stand-in. The crops are chosen, per label, among those the real int8 model reads
correctly on their own (within ±0.1, the labels' own precision; a looser pick let a `9.7` crop read
as 9.81 cross the last wheel's 0.2 carry tolerance), so these tests measure what the reader adds — alignment,
cropping, batching, assembly, refusal — and not the model's accuracy, which the bundle's report
measures on held-out meters.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
from conftest import dim_red, run_cli

from device.meter.compose import Layout, choose_crops, distort, mark_patch, render, write_config
from device.meter.config import ConfigError, ReadingConfig, Roi, load_config
from device.meter.model import MeterDigitModel, circular_distance, reading
from device.meter.reader import MeterReader, assemble

GROUP = Path("meter-digits/collected/powermeter/unknown/miboe")


def wheels(*values: float):
    return [reading(v, 1.0) for v in values]


# wheel positions (left to right), decimals, extended resolution -> the number a person reads
ASSEMBLY = [
    ((1.0, 2.9, 9.8), 0, True, "129.8"),  # middle wheel rolling: decided by the last wheel (not yet at 0)
    ((1.0, 3.0, 0.1), 0, True, "130.1"),  # one tick later
    ((1.0, 2.9, 0.1), 0, True, "130.1"),  # middle wheel lagging behind its neighbour's carry
    ((1.0, 3.0, 9.6), 0, True, "129.6"),  # middle wheel rolled too early ("17.9 -> 16.9")
    ((1.0, 2.9, 9.85), 0, False, "130"),  # last wheel 0.15 from 0 shows mostly 0 -> carried consistently
    ((1.0, 2.9, 9.5), 0, False, "129"),
    ((1.0, 2.5, 9.5), 0, False, "129"),  # half way: the last wheel still before its carry
    ((0.8, 9.8, 9.9, 9.8), 2, True, "9.998"),  # a carry rippling through every wheel
    ((1.0, 0.0, 0.0, 0.3), 2, True, "10.003"),  # ... and completed
    ((0.9, 9.9, 9.9, 0.3), 2, True, "10.003"),  # ... with every left wheel seen slightly lagging
    ((0.0, 0.0, 3.0, 5.0, 7.9), 3, False, "0.358"),  # last wheel centred on 8, seen as 7.9
    ((0.0, 0.0, 3.0, 5.0, 7.6), 3, False, "0.357"),
    ((4.9, 9.96), 1, True, "5.00"),  # 9.96 rounds to the next whole digit, with carry
    ((7.0,), 0, False, "7"),
]


@pytest.mark.parametrize("positions,decimals,extended,expected", ASSEMBLY)
def test_assembly_rule(positions: tuple, decimals: int, extended: bool, expected: str) -> None:
    result = assemble(wheels(*positions), ReadingConfig(decimals=decimals, extended_resolution=extended))
    assert result.text == expected
    assert result.value == pytest.approx(float(expected))


def test_assembly_accepts_a_wheel_value_of_exactly_ten() -> None:
    """A model may round 9.999 to 10.0; that is the same wheel position as 0.0."""
    assert assemble(wheels(3.0, 10.0), ReadingConfig(extended_resolution=True)).text == "30.0"
    with pytest.raises(ValueError):
        assemble([])


def crop_picker(model: MeterDigitModel, data_dir: Path) -> Callable[[tuple[str, ...]], list[np.ndarray]]:
    """labels -> one crop per label from GROUP, the first that the model reads within ±0.1 on its own."""
    def reads_correctly(image: np.ndarray, label: str) -> bool:
        return float(circular_distance(model.classify([image])[0].value, float(label))) <= 0.1 + 1e-6

    return lambda labels: choose_crops(data_dir / GROUP, list(labels), reads_correctly)


@pytest.fixture(scope="module")
def model(models_dir: Path) -> MeterDigitModel:
    return MeterDigitModel.from_bundle(models_dir / "meter-digits", variant="int8", threads=1)


@pytest.fixture(scope="module")
def pick(model: MeterDigitModel, data_dir: Path):
    return crop_picker(model, data_dir)


def cover_marks(frame: np.ndarray, marks: tuple[int, ...] = (1, 2)) -> np.ndarray:
    """Paint a bright reflection over the given reference marks (1-based) of a composed frame, in place."""
    for index in marks:
        x, y = Layout().marks[index - 1]
        cv2.ellipse(frame, (x + 20, y + 20), (45, 35), 20, 0, 360, (255, 255, 255), -1)
    return frame


def compose_meter(tmp_path: Path, crops: list, meter: str = "", marks: int = 4,
                  extra: str = "") -> tuple[np.ndarray, Path]:
    """A composed meter face and its config file (also used by the MQTT/HTTP tests)."""
    layout = Layout()
    reference = render(crops, layout, seed=1)
    return reference, write_config(tmp_path, reference, layout, len(crops), Path("models/meter-digits").resolve(),
                                   meter=meter, marks=marks, extra=extra)


# crop labels (left to right), [meter] settings -> value a person reads off the counter
FRAMES = [
    (("0.0", "0.0", "3.0", "5.0", "8.0"), "decimals = 3", 0.358),
    (("0.0", "4.0", "4.9", "9.5", "9.7"), "decimals = 0", 4499.0),  # two wheels rolling towards 4500
    (("0.0", "4.9", "9.8", "9.8", "0.2"), "decimals = 0", 5000.0),  # the carry done, left wheels lagging
    (("0.0", "3.0", "9.0", "9.5"), "decimals = 0", 389.0),  # a wheel rolled too early is corrected
    (("0.0", "4.0", "4.9", "9.5", "9.7"), "decimals = 1\nextended_resolution = true", 449.97),
]


@pytest.mark.parametrize("labels,meter,expected", FRAMES, ids=[str(f[2]) for f in FRAMES])
def test_composed_frames_read_the_known_value(tmp_path: Path, model, pick, labels, meter, expected) -> None:
    reference, config_path = compose_meter(tmp_path, pick(labels), meter)
    reader = MeterReader(load_config(config_path), model)
    for seed in range(3):
        result = reader.read(distort(reference, seed=seed))
        assert result.error == "" and result.alignment.ok, result.error
        tolerance = 0.021 if "extended" in meter else 1e-9  # extended: the last wheel's tenths ±0.2
        assert result.value == pytest.approx(expected, abs=tolerance), result.summary()
        assert len(result.wheels) == len(labels) and result.alignment.quality > 0.6


def test_two_marks_align_shift_and_rotation(tmp_path: Path, model, pick) -> None:
    reference, config_path = compose_meter(tmp_path, pick(("0.0", "3.0", "5.0", "8.0")), marks=2)
    reader = MeterReader(load_config(config_path), model)
    for seed in range(3):
        result = reader.read(distort(reference, seed=10 + seed, corners=2))
        assert result.value == 358.0, result.summary()
        assert abs(result.alignment.rotation_deg) <= 2.5


def test_alignment_failure_is_refused(tmp_path: Path, model, pick) -> None:
    reference, config_path = compose_meter(tmp_path, pick(("0.0", "3.0", "5.0", "8.0")))
    reader = MeterReader(load_config(config_path), model)
    one_lost = reader.read(cover_marks(distort(reference, seed=3), (1,)))  # a reflection over mark 1
    assert one_lost.value == 358.0 and one_lost.alignment.summary()["marks_used"] == 3, one_lost.summary()
    result = reader.read(cover_marks(distort(reference, seed=3), (1, 2)))  # 3 of 4 needed (default: all but one)
    assert result.value is None and result.wheels == ()
    assert "reference mark not found" in result.error and "mark1.png" in result.error and "mark2.png" in result.error
    h, w = reference.shape[:2]
    rotated = cv2.warpAffine(reference, cv2.getRotationMatrix2D((w / 2, h / 2), 25, 1.0), (w, h))
    assert reader.read(rotated).value is None  # camera knocked over: refused, not misread
    moved = np.roll(reference, 120, axis=1)  # far beyond search_px
    assert reader.read(moved).value is None
    config = load_config(config_path)
    beyond = MeterReader(replace(config, digits=config.digits + (Roi(620, 200, 40, 64, "d5"),)), model)
    assert "digit ROI d5 falls outside the frame" in beyond.read(distort(reference, seed=4)).error


def test_config_is_validated_with_clear_errors(tmp_path: Path, pick) -> None:
    _, config_path = compose_meter(tmp_path, pick(("0.0", "3.0")))
    good = config_path.read_text()
    config = load_config(config_path)
    assert (len(config.digits), len(config.alignment.marks), config.unit) == (2, 4, "kWh")
    bad = {
        "unknown key(s) meter.decimal": good.replace('device_class = "energy"', 'device_class = "energy"\ndecimal = 2'),
        "analogue needles are not supported yet": good + "\n[[needles]]\nx = 1\n",
        "not accepted by Home Assistant": good.replace('unit = "kWh"', 'unit = "m³"'),
        "meter.decimals is 5 but only 2 digit wheels": good.replace('device_class = "energy"',
                                                                     'device_class = "energy"\ndecimals = 5'),
        "mark1.png not found": good.replace('"mark1.png"', '"nope/mark1.png"'),
        "digits[0].w must be at least 4": good.replace("w = 40", "w = 2", 1),
        "not valid TOML": good.replace("[meter]", "[meter"),
        "meter.name must be letters": good.replace('name = "composed"', 'name = "my meter"'),
        "alignment.min_marks must be at most 4": good.replace("min_score = 0.6", "min_score = 0.6\nmin_marks = 5"),
    }
    for message, text in bad.items():
        config_path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(config_path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_cli_read_and_preview(tmp_path: Path, pick) -> None:
    reference, config_path = compose_meter(tmp_path, pick(("0.0", "4.0", "4.9", "9.5", "9.7")))
    frame = tmp_path / "frame.png"
    cv2.imwrite(str(frame), distort(reference, seed=5))
    read = run_cli("-m", "device.meter", "read", str(frame), "--config", str(config_path), "--json")
    assert read.returncode == 0, read.stderr
    assert '"value": 4499.0' in read.stdout
    out = tmp_path / "preview"
    preview = run_cli("-m", "device", "meter", "preview", str(frame), "--config", str(config_path), "--out", str(out))
    assert preview.returncode == 0, preview.stderr
    assert "reading: 4499" in preview.stdout
    assert sorted(p.name for p in out.glob("roi_*.png")) == [f"roi_0{i}.png" for i in range(1, 6)]
    assert (out / "preview.png").is_file() and len(list(out.glob("mark_*_found.png"))) == 4
    bad = run_cli("-m", "device.meter", "read", str(tmp_path / "nope.png"), "--config", str(config_path))
    assert bad.returncode == 1 and "no such file" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_cli("-m", "device.meter", "read", str(frame), "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_cli_run_service_on_a_folder_of_frames(tmp_path: Path, pick) -> None:
    """`meter run` with a folder as the camera: every frame read, checked, stored; a glare frame refused."""
    extra = '[history]\ndatabase = "h.sqlite"\n\n[postprocess]\nstate_file = "state.json"\n'
    reference, config_path = compose_meter(tmp_path, pick(("0.0", "4.0", "4.9", "9.5", "9.7")), extra=extra)
    frames = tmp_path / "frames"
    frames.mkdir()
    for seed in range(3):
        frame = distort(reference, seed=seed)
        cv2.imwrite(str(frames / f"{seed:03d}.png"), cover_marks(frame) if seed == 1 else frame)
    run = run_cli("-m", "device.meter", "run", "--config", str(config_path), "--source", str(frames),
                  "--interval", "0", "-q")
    assert run.returncode == 0, run.stderr
    statuses = [line.split()[0] for line in run.stdout.splitlines()[1:]]
    assert statuses == ["initial", "no", "ok"], run.stdout
    from device.meter.history import History

    history = History(tmp_path / "h.sqlite")
    assert [r["status"] for r in history.recent()] == ["ok", "no reading", "initial"]
    history.close()
    mark = run_cli("-m", "device.meter", "mark", str(frames / "000.png"), "--box", "10,10,700,20",
                   "--out", str(tmp_path / "m.png"))
    assert mark.returncode == 2 and "inside the 640x480 image" in mark.stderr


def test_contrast_stretch_is_auto_unless_the_meter_config_says_otherwise(tmp_path: Path, pick) -> None:
    """`[model] stretch_contrast` reaches the model: "auto" when absent, true (a low-contrast wheel meter) or false
    (never) when set; anything else is a config error naming the key."""
    _, config_path = compose_meter(tmp_path, pick(("0.0", "4.0")))
    assert MeterReader.from_config(load_config(config_path)).model.stretch == "auto"
    original = config_path.read_text()
    for value, expected in (("true", True), ("false", False), ('"auto"', "auto")):
        config_path.write_text(original.replace("[alignment]", f"stretch_contrast = {value}\n\n[alignment]", 1))
        stretch = MeterReader.from_config(load_config(config_path)).model.stretch
        assert stretch == expected and type(stretch) is type(expected)
    for bad in ("1", '"on"'):
        config_path.write_text(original.replace("[alignment]", f"stretch_contrast = {bad}\n\n[alignment]", 1))
        with pytest.raises(ConfigError, match="stretch_contrast"):
            load_config(config_path)


def test_a_dim_red_meter_is_read_with_the_default_auto_stretch(tmp_path: Path, model, pick) -> None:
    """Grey digits on a dark red wheel (as the test meter watermeter/pp): the composed meter's wheel crops re-rendered
    so, the plate and marks as before. The config's default, "auto", stretches that frame and reads it; the composed
    frames of ordinary crops are read unstretched."""
    crops = pick(("0.0", "0.0", "3.0", "5.0", "8.0"))
    for wheels, name in ((crops, "plain"), ([dim_red(c) for c in crops], "dim")):
        reference, config_path = compose_meter(tmp_path / name, wheels, "decimals = 3")
        reader = MeterReader.from_config(load_config(config_path))
        assert reader.model.stretch == "auto"
        result = reader.read(distort(reference, seed=0))
        assert result.value == 0.358, result.summary()
        assert result.summary()["contrast_stretched"] is (name == "dim"), result.summary()


def test_example_config_is_valid(tmp_path: Path) -> None:
    """The shipped example loads once its reference-mark images exist (they are cut per installation)."""
    example = Path(__file__).resolve().parents[1] / "device" / "meter" / "examples" / "water.toml"
    (tmp_path / "water.toml").write_text(example.read_text())
    (tmp_path / "marks").mkdir()
    for name in ("left.png", "right.png"):
        cv2.imwrite(str(tmp_path / "marks" / name), mark_patch(0, 40))
    config = load_config(tmp_path / "water.toml")
    assert (config.name, len(config.digits), config.reading.decimals, config.resolution) == ("water", 8, 3, 0.001)
    assert config.mqtt.base_topic == "meter/water" and config.postprocess.max_rate == 0.05
