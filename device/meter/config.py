"""One meter's configuration, read from a TOML file and validated before anything runs.

A meter reader that starts with a typo in its config and then reports nonsense for weeks is worse
than one that refuses to start, so every key is checked here, with the file name and the key in
the message. Relative paths (reference marks, model bundle, state, history) are relative to the
config file, so a meter's folder can be moved as a whole.

Example (see device/meter/examples/water.toml for a complete, commented file)::

    [meter]
    name = "water"            # MQTT topics, Home Assistant ids, log lines
    unit = "m³"
    device_class = "water"    # water | gas | energy | none
    decimals = 3              # how many of the wheels are after the decimal point

    [[alignment.marks]]       # reference marks: small template images cut from a good frame
    image = "marks/left.png"
    x = 40                    # where the mark's top-left corner is in the reference frame
    y = 30

    [[digits]]                # one table per digit wheel, left (most significant) to right
    x = 100
    y = 200
    w = 40
    h = 64

Analogue needles (the dials below the counter of many water meters) are not read yet: a `[[needles]]`
table is refused with a message saying so, rather than silently ignored.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device.bundle import VARIANTS, default_models_dir

if TYPE_CHECKING:
    from device.meter.model import Stretch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEVICE_CLASSES: dict[str, tuple[str, ...]] = {
    # Home Assistant only accepts these units for these device classes; checked here so that the
    # sensor does not silently fail to appear in Home Assistant's energy dashboard.
    "water": ("m³", "L", "gal", "ft³", "CCF"),
    "gas": ("m³", "ft³", "CCF"),
    "energy": ("Wh", "kWh", "MWh", "GJ"),
    "none": (),
}
RATE_MODES = ("per_minute", "per_reading")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")  # what Home Assistant's MQTT discovery topics accept


class ConfigError(ValueError):
    """The meter config file is missing, not TOML, or has a wrong or missing value."""


@dataclass(frozen=True)
class Roi:
    """A rectangle in reference-frame pixels (x, y = top-left corner)."""

    x: int
    y: int
    w: int
    h: int
    name: str = ""

    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.w, self.h


@dataclass(frozen=True)
class Mark:
    """A reference mark: a template image and where its top-left corner is in the reference frame."""

    image: Path
    x: int
    y: int


@dataclass(frozen=True)
class AlignmentConfig:
    marks: tuple[Mark, ...]
    search_px: int = 40  # how far (px) a mark may have moved from its reference position
    min_score: float = 0.6  # normalised cross-correlation a mark must reach to count as found
    max_rotation_deg: float = 10.0
    max_scale_change: float = 0.15  # |scale - 1| allowed before the frame is refused
    min_marks: int = 0  # marks that must be found; 0 = all, or all but one when there are 3 or more


@dataclass(frozen=True)
class ReadingConfig:
    decimals: int = 0  # wheels after the decimal point
    extended_resolution: bool = False  # append the last wheel's tenths as one more decimal
    last_wheel_tolerance: float = 0.2  # see reader.assemble
    min_confidence: float = 0.0  # refuse a reading when any wheel is below this model confidence


@dataclass(frozen=True)
class PostprocessConfig:
    allow_negative: bool = False
    max_rate: float | None = None  # units per minute (or per reading), None = no limit
    rate_mode: str = "per_minute"
    jitter: float | None = None  # tolerated decrease; None = 2 steps of the last shown digit
    recovery_readings: int = 3  # N consecutive agreeing readings override a rejection
    prevalue_max_age_min: float = 720.0  # an older stored value is not used to check readings
    state_file: Path | None = None


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    base_topic: str = ""
    discovery_prefix: str = "homeassistant"
    client_id: str = ""
    keepalive: int = 60


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8088
    token: str | None = None  # when set, POST /api/value needs "Authorization: Bearer <token>"


@dataclass(frozen=True)
class MeterConfig:
    """Everything needed to read one meter, with paths already resolved."""

    path: Path
    name: str
    unit: str
    device_class: str
    bundle: Path
    variant: str
    threads: int | None
    # Contrast stretch before the model (device.meter.model.stretch_contrast): true for a low-contrast wheel meter
    # (never an LCD), false never, "auto" (default) for frames dimmer than any of the training/validation meters'.
    stretch_contrast: Stretch
    alignment: AlignmentConfig
    digits: tuple[Roi, ...]
    reading: ReadingConfig
    postprocess: PostprocessConfig
    source: str = "0"
    interval_s: float = 60.0
    capture_size: tuple[int, int] | None = None
    mqtt: MqttConfig | None = None
    http: HttpConfig | None = None
    history: Path | None = None
    history_keep_days: float = 365.0

    @property
    def resolution(self) -> float:
        """The value of one step of the least significant digit reported."""
        return 10.0 ** -(self.reading.decimals + (1 if self.reading.extended_resolution else 0))


class _Table:
    """A TOML table with typed getters that name the file and key in every error."""

    def __init__(self, data: Any, where: str, source: Path):
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: [{where}] must be a table")
        self.data = data
        self.where = where
        self.source = source
        self.used: set[str] = set()

    def _err(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.where}.{key} {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, lo: float | None = None,
            hi: float | None = None, choices: tuple[Any, ...] | None = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self._err(key, "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self._err(key, f"must be {names}, got {value!r}")
        if choices is not None and value not in choices:
            raise self._err(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        if lo is not None and value < lo:
            raise self._err(key, f"must be at least {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise self._err(key, f"must be at most {hi}, got {value!r}")
        return value

    def table(self, key: str, required: bool = False) -> "_Table | None":
        self.used.add(key)
        if key not in self.data:
            if required:
                raise self._err(key, "is required")
            return None
        return _Table(self.data[key], f"{self.where}.{key}" if self.where else key, self.source)

    def tables(self, key: str) -> list["_Table"]:
        self.used.add(key)
        items = self.data.get(key, [])
        if not isinstance(items, list):
            raise self._err(key, "must be an array of tables ([[...]])")
        return [_Table(item, f"{self.where}.{key}[{i}]" if self.where else f"{key}[{i}]", self.source)
                for i, item in enumerate(items)]

    def path(self, key: str, default: Any = ...) -> Path | None:
        value = self.get(key, str, default)
        if value is None:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.source.parent / path).resolve()

    def check_unknown(self) -> None:
        """A misspelt key would otherwise be ignored and its default silently used."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            prefix = f"{self.where}." if self.where else ""
            raise ConfigError(f"{self.source}: unknown key(s) {', '.join(prefix + k for k in unknown)}")


def _roi(table: _Table) -> Roi:
    roi = Roi(x=table.get("x", int, lo=0), y=table.get("y", int, lo=0), w=table.get("w", int, lo=4),
              h=table.get("h", int, lo=4), name=table.get("name", str, ""))
    table.check_unknown()
    return roi


def _alignment(root: _Table) -> AlignmentConfig:
    table = root.table("alignment", required=True)
    marks = []
    for item in table.tables("marks"):
        image = item.path("image")
        if not image.is_file():
            raise ConfigError(f"{item.source}: {item.where}.image: {image} not found")
        marks.append(Mark(image=image, x=item.get("x", int, lo=0), y=item.get("y", int, lo=0)))
        item.check_unknown()
    if not marks:
        raise ConfigError(f"{root.source}: at least one [[alignment.marks]] is required; the reader refuses to "
                          "read a frame it cannot align (use `meter preview` to cut marks from a good frame)")
    config = AlignmentConfig(
        marks=tuple(marks),
        search_px=table.get("search_px", int, 40, lo=1),
        min_score=table.get("min_score", float, 0.6, lo=0.0, hi=1.0),
        max_rotation_deg=table.get("max_rotation_deg", float, 10.0, lo=0.0, hi=45.0),
        max_scale_change=table.get("max_scale_change", float, 0.15, lo=0.0, hi=0.5),
        min_marks=table.get("min_marks", int, len(marks) - 1 if len(marks) >= 3 else len(marks),
                            lo=1, hi=len(marks)),
    )
    table.check_unknown()
    return config


def _postprocess(root: _Table, name: str) -> PostprocessConfig:
    table = root.table("postprocess") or _Table({}, "postprocess", root.source)
    max_rate = table.get("max_rate", float, None, lo=0.0)
    config = PostprocessConfig(
        allow_negative=table.get("allow_negative", bool, False),
        max_rate=max_rate or None,
        rate_mode=table.get("rate_mode", str, "per_minute", choices=RATE_MODES),
        jitter=table.get("jitter", float, None, lo=0.0),
        recovery_readings=table.get("recovery_readings", int, 3, lo=2, hi=100),
        prevalue_max_age_min=table.get("prevalue_max_age_min", float, 720.0, lo=0.0),
        state_file=table.path("state_file", f"{name}.state.json"),
    )
    table.check_unknown()
    return config


def _outputs(root: _Table, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if (table := root.table("mqtt")) is not None:
        out["mqtt"] = MqttConfig(
            host=table.get("host", str),
            port=table.get("port", int, 1883, lo=1, hi=65535),
            username=table.get("username", str, None),
            password=table.get("password", str, None),
            base_topic=table.get("base_topic", str, f"meter/{name}").strip("/"),
            discovery_prefix=table.get("discovery_prefix", str, "homeassistant").strip("/"),
            client_id=table.get("client_id", str, f"meter-{name}"),
            keepalive=table.get("keepalive", int, 60, lo=5),
        )
        table.check_unknown()
    if (table := root.table("http")) is not None:
        out["http"] = HttpConfig(host=table.get("host", str, "127.0.0.1"),
                                 port=table.get("port", int, 8088, lo=0, hi=65535),
                                 token=table.get("token", str, None))
        table.check_unknown()
    if (table := root.table("history")) is not None:
        out["history"] = table.path("database", f"{name}.history.sqlite")
        out["history_keep_days"] = table.get("keep_days", float, 365.0, lo=1.0)
        table.check_unknown()
    return out


def load_config(path: str | Path) -> MeterConfig:
    """Read and validate a meter config file. Raises ConfigError with the file and key on any problem."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    root = _Table(data, "", path)
    if "needles" in data or "analog" in data:
        raise ConfigError(f"{path}: analogue needles are not supported yet; read the digit wheels only "
                          "(remove the [[needles]] tables)")

    meter = root.table("meter", required=True)
    name = meter.get("name", str)
    if not NAME_PATTERN.fullmatch(name):
        # not str.isalnum(): it accepts "küche" or "m²", which Home Assistant's discovery topics do not match,
        # so those entities would be silently ignored there
        raise ConfigError(f"{path}: meter.name must be letters, digits, '-' or '_', ASCII only (it is used in "
                          f"MQTT topics and Home Assistant ids, which allow nothing else); got {name!r}")
    device_class = meter.get("device_class", str, "none", choices=tuple(DEVICE_CLASSES))
    unit = meter.get("unit", str, "")
    allowed = DEVICE_CLASSES[device_class]
    if allowed and unit not in allowed:
        raise ConfigError(f"{path}: meter.unit {unit!r} is not accepted by Home Assistant for device_class "
                          f"{device_class!r}; use one of {', '.join(allowed)}")
    reading = ReadingConfig(
        decimals=meter.get("decimals", int, 0, lo=0, hi=12),
        extended_resolution=meter.get("extended_resolution", bool, False),
        last_wheel_tolerance=meter.get("last_wheel_tolerance", float, 0.2, lo=0.0, hi=0.5),
        min_confidence=meter.get("min_confidence", float, 0.0, lo=0.0, hi=1.0),
    )
    meter.check_unknown()

    digits = tuple(_roi(t) for t in root.tables("digits"))
    if not digits:
        raise ConfigError(f"{path}: at least one [[digits]] table (one per digit wheel) is required")
    if reading.decimals > len(digits):
        raise ConfigError(f"{path}: meter.decimals is {reading.decimals} but only {len(digits)} digit wheels "
                          "are configured")

    model = root.table("model") or _Table({}, "model", path)
    default_bundle = default_models_dir() / "meter-digits"
    bundle = model.path("bundle", str(default_bundle))
    variant = model.get("variant", str, "int8", choices=VARIANTS)
    threads = model.get("threads", int, None, lo=1)
    stretch = model.get("stretch_contrast", (bool, str), "auto")
    if not (isinstance(stretch, bool) or stretch == "auto"):
        raise model._err("stretch_contrast", f'must be true, false or "auto", got {stretch!r}')
    model.check_unknown()

    capture = root.table("capture") or _Table({}, "capture", path)
    source = capture.get("source", str, "0")
    interval = capture.get("interval_s", float, 60.0, lo=0.0)
    size = capture.get("size", list, None)
    # bool is an int subclass: without the explicit check, [true, 480] would pass as [1, 480]
    if size is not None and (len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                       for v in size)):
        raise ConfigError(f"{path}: capture.size must be [width, height] in pixels, got {size!r}")
    capture.check_unknown()

    config = MeterConfig(
        path=path, name=name, unit=unit, device_class=device_class, bundle=bundle, variant=variant,
        threads=threads, stretch_contrast=stretch, alignment=_alignment(root), digits=digits, reading=reading,
        postprocess=_postprocess(root, name), source=source, interval_s=interval,
        capture_size=tuple(size) if size else None, **_outputs(root, name),
    )
    root.check_unknown()
    return config
