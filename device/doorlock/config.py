"""Door lock settings: one TOML file, validated completely before anything touches the lock.

Every key has a default (see `example.toml`), so a config only needs what differs. Unknown
keys and wrong types are errors, not warnings: a typo such as `unlock_sec` silently ignored
would leave the door behaving differently from what its owner wrote. Numbers must be finite (TOML
allows inf and nan, which would silently switch a rule off) and within limits that keep the lock a lock.
Relative paths, the default database's included, are taken relative to the config file, so `enroll` and
`run` share one database whatever folder they are started from.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from device.bundle import VARIANTS, default_models_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on older Raspberry Pi OS
    import tomli as tomllib


class ConfigError(Exception):
    """The config file is missing, not TOML, or has a bad key or value."""


@dataclass
class CameraConfig:
    source: str = "picamera2"
    width: int = 640
    height: int = 480
    loop: bool = False  # replay a recorded video / image folder forever (demos, soak tests)


@dataclass
class ModelConfig:
    # dlib's ResNet, ported (98.5% LFW, ~3x the student's embedding time); models/face is the lighter student.
    bundle: Path = field(default_factory=lambda: default_models_dir() / "face-resnet")
    variant: str = "int8"
    threads: int = 0  # 0 = all cores


@dataclass
class DetectorConfig:
    yunet_model: Path | None = None  # None = OpenCV's Haar cascade
    min_face: int = 80
    min_blur: float = 30.0
    detect_width: int = 320


@dataclass
class DecisionConfig:
    # A bundle threshold name (matched on the cohort-normalised score when the bundle has a cohort), or a raw
    # distance (a number turns normalisation off). far_0.001pct per PAIR because a stranger is compared with every
    # enrolled embedding: with ~100 of them that is about 0.1% per attempt (far_0.1pct would be ~10%).
    threshold: str | float = "far_0.001pct"
    votes_needed: int = 3
    window: int = 5
    cooldown_s: float = 5.0
    max_attempts: int = 5
    attempt_window_s: float = 60.0
    lockout_s: float = 120.0
    idle_reset_s: float = 2.0


@dataclass
class LivenessConfig:
    enabled: bool = True
    # Mean grey-level change of the aligned face crops (decide.motion). Still, noisy, flickering and hand-shifted
    # pictures measured 0.2-0.9 through the detector; two different photos of one person 20-35 (see README).
    min_motion: float = 2.0


@dataclass
class RelayConfig:
    pin: int | str = 17
    active_high: bool = True
    unlock_s: float = 3.0
    mock: bool = False  # gpiozero's MockFactory: dry run on a machine without GPIO


@dataclass
class StorageConfig:
    database: Path = Path("doorlock.db")  # relative to the config file (see parse_config), like every path
    snapshots: Path | None = None  # folder for JPEGs of refused attempts; None = keep none
    snapshot_keep: int = 200


@dataclass
class Config:
    camera: CameraConfig = field(default_factory=CameraConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


_POSITIVE = {"width", "height", "min_face", "detect_width", "votes_needed", "window", "max_attempts",
             "unlock_s", "attempt_window_s", "snapshot_keep", "idle_reset_s"}
_OPTIONAL_PATHS = {"yunet_model", "snapshots"}  # "" in the file means: not used
_NON_NEGATIVE = {"threads", "min_blur", "cooldown_s", "lockout_s", "min_motion"}
# Upper limits where a large value defeats the lock's purpose: the door energised for a day, a lockout that never
# ends, a liveness bar no face can pass. Seconds unless noted.
_MAXIMUM = {"unlock_s": 30.0, "cooldown_s": 600.0, "lockout_s": 86400.0, "attempt_window_s": 86400.0,
            "idle_reset_s": 60.0, "min_motion": 50.0}
# Accepted, with a warning at start and in check-config: 7.8% of strangers admitted per attempt in the README's test.
LOOSE_THRESHOLDS = {"far_0.1pct"}
# BCM GPIO numbers on the Raspberry Pi's 40-pin header.
BCM_PINS = range(0, 28)
# Bundle thresholds too loose for a door: best_accuracy admits most strangers in a gallery of many embeddings.
_REFUSED_THRESHOLDS = {"best_accuracy": "it lets in most strangers (it balances errors on pairs, and a stranger at "
                                        "the door is compared with every enrolled embedding)"}


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; `None` gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, base=path.resolve().parent, name=str(path))


def parse_config(data: dict[str, Any], base: Path = Path("."), name: str = "config") -> Config:
    """Build a `Config` from parsed TOML, checking every section, key, type and range."""
    config = Config()
    sections = {f.name: f for f in fields(Config)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{name}: unknown section [{section}]; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: '{section}' must be a [section] table")
        target = getattr(config, section)
        known = {f.name: f for f in fields(target)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{name}: unknown key '{key}' in [{section}]; known: {', '.join(known)}")
            default = getattr(target, key)
            setattr(target, key, _convert(f"[{section}] {key}", value, default, base, name))
    if not config.storage.database.is_absolute():  # the default too: enroll and run must share one database
        config.storage.database = base / config.storage.database
    _check(config, name)
    return config


def _convert(where: str, value: Any, default: Any, base: Path, name: str) -> Any:
    """Coerce one TOML value to the type of its default, with a message naming the key."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: {where} must be true or false, got {value!r}")
        return value
    key = where.rsplit(" ", 1)[-1]
    if key in _OPTIONAL_PATHS and value == "":
        return None
    if isinstance(default, Path) or key in _OPTIONAL_PATHS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{name}: {where} must be a non-empty path string, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    if key == "threshold":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name}: {where} must be a bundle threshold name or a number, got {value!r}")
        return float(value) if isinstance(value, (int, float)) else value
    if key == "pin":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{name}: {where} must be a BCM number (17) or a name ('GPIO17', 'BOARD11')")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: {where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: {where} must be a whole number, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{name}: {where} must be a string, got {value!r}")
    return value


def _check(config: Config, name: str) -> None:
    """Range and consistency checks that single values cannot express."""
    for section in fields(config):
        part = getattr(config, section.name)
        assert is_dataclass(part)
        for f in fields(part):
            value = getattr(part, f.name)
            where = f"{name}: [{section.name}] {f.name}"
            if isinstance(value, float) and not math.isfinite(value):  # TOML has inf and nan
                raise ConfigError(f"{where} must be a finite number, got {value}")
            if f.name in _MAXIMUM and value > _MAXIMUM[f.name]:
                raise ConfigError(f"{where} must be <= {_MAXIMUM[f.name]:g}, got {value}")
            if f.name in _POSITIVE and value <= 0:
                raise ConfigError(f"{where} must be > 0, got {value}")
            if f.name in _NON_NEGATIVE and value < 0:
                raise ConfigError(f"{where} must be >= 0, got {value}")
    d = config.decision
    if d.votes_needed > d.window:
        raise ConfigError(f"{name}: [decision] votes_needed ({d.votes_needed}) cannot exceed window ({d.window})")
    if isinstance(d.threshold, float) and not 0 < d.threshold < 2:
        raise ConfigError(f"{name}: [decision] threshold {d.threshold} is not a distance between unit vectors (0..2)")
    if d.threshold in _REFUSED_THRESHOLDS:
        raise ConfigError(f"{name}: [decision] threshold {d.threshold!r} is refused for a door: "
                          f"{_REFUSED_THRESHOLDS[d.threshold]}; use \"far_0.001pct\" (or \"far_0.1pct\")")
    live = config.liveness
    if live.enabled and live.min_motion > 0 and d.votes_needed < 2:
        raise ConfigError(f"{name}: [decision] votes_needed must be >= 2 while [liveness] is on: motion is measured "
                          f"between the matching frames, so one frame can never pass it and the door would never open")
    pin = config.relay.pin
    if isinstance(pin, int) and pin not in BCM_PINS:
        raise ConfigError(f"{name}: [relay] pin {pin} is not a BCM GPIO number ({BCM_PINS.start}..{BCM_PINS.stop - 1})")
    if config.model.variant not in VARIANTS:
        raise ConfigError(f"{name}: [model] variant must be one of {', '.join(VARIANTS)}, got {config.model.variant!r}")
    if not config.camera.source.strip():
        raise ConfigError(f"{name}: [camera] source is empty")
