"""Real meter digit crops (`meter-digits/collected`), grouped by physical meter and split by group.

Why groups: crops of one meter look alike (same font, wheel, lighting, camera), so a split by image
would test on near-copies of training crops and flatter the model. Each group is one meter (or one
meter model photographed by one collector); train, validation and test never share a group.

How a group is named: the crop's folder relative to `collected/`, with date (`20230604`,
`20230630_manual`) and hour (`07`) folders dropped, since those are one meter photographed at
different times. Then groups that share a byte-identical image are merged (the data set holds the
same ISKRA meter under two names, and copies of the Metrona LCD crops under `lcd/`), and every
duplicate image is kept once.

Labels: the file name before the first `_`: `d.t` is the wheel position in tenths, a bare `d` (LCD
groups mostly) the whole digit d. A bare `10` is the reference system's "not a digit" class (9 LCD
crops); it has no wheel position and is left out.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from device.images import load_image
from training.datasets import DataNotFoundError, data_root

SUBDIR = Path("meter-digits") / "collected"
_TIME_FOLDER = re.compile(r"\d{8}(_manual)?|\d{2}")
_LABEL = re.compile(r"(\d)(?:\.(\d))?")
NOT_A_DIGIT = "10"

# The split, fixed by name so it never moves when files are added. Test and validation each take
# whole meters of every kind the data set has (wheel water, power and gas meters, LCD counters)
# and of different sizes/fonts; the big groups (ISKRA, `new`, the iotson gas/power meters) stay in
# training. Chosen from the group list (kinds, sizes, image counts) before any model was trained.
# `watermeter/Unknown/iotson/watermeter2` was a test meter until a review found the same meter in `new/`
# (146 crops of its unique 49x27 size, its file naming and wheel readings, thumbnails correlating up to
# 0.985): it is a training meter now, and a test checks that no test or validation crop has a near-copy
# in training.
TEST_GROUPS: tuple[str, ...] = (
    "watermeter/Wasser_Geraete_GmbH",
    "watermeter/pp",
    "watermeter/Unknown/abl",
    "powermeter/unknown/miboe",
    "powermeter/Landis+Gyr - MM2600JH",
    "powermeter/LandisGyrT330_C",
    "lcd/lcd_pb",
)
VALIDATION_GROUPS: tuple[str, ...] = (
    "watermeter/altair/alkr",
    "watermeter/Unknown/pilg",
    "powermeter/ itron_C114U_2",
    "powermeter/unknown/timm",
    "watermeter/watermeter_lcd",
)
SPLITS = ("train", "validation", "test")
# Segment LCD counters (dark segments on a light glass) among the training and validation groups.
LCD_GROUPS: tuple[str, ...] = ("lcd/digital italic", "watermeter/Metrona/cold", "watermeter/watermeter_lcd")


def parse_label(name: str) -> float | None:
    """Wheel position in [0, 10) from a file name (`7.9_x.jpg` → 7.9, `3_x.jpg` → 3.0); None for "not a digit".

    Raises ValueError for a name that carries no label, so a stray file is reported, not guessed.
    """
    prefix = name.split("_", 1)[0]
    if prefix == NOT_A_DIGIT:
        return None
    match = _LABEL.fullmatch(prefix)
    if not match:
        raise ValueError(f"{name}: file name does not start with a digit label like '7.9_' or '7_'")
    return int(match.group(1)) + int(match.group(2) or 0) / 10.0


def folder_group(relative: Path) -> str:
    """Group name of a crop from its path relative to `collected/` (time folders dropped)."""
    parts = [p for p in relative.parent.parts if not _TIME_FOLDER.fullmatch(p)]
    return "/".join(parts) or "."


def split_of(group: str) -> str:
    if group in TEST_GROUPS:
        return "test"
    if group in VALIDATION_GROUPS:
        return "validation"
    return "train"


@dataclass
class MeterCrops:
    """Crops of one split: raw BGR images (any size), wheel positions, group names, source paths."""

    images: list[np.ndarray] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float64)

    def __add__(self, other: "MeterCrops") -> "MeterCrops":
        return MeterCrops(self.images + other.images, self.values + other.values, self.groups + other.groups,
                          self.paths + other.paths)

    def subset(self, indices: np.ndarray | list[int]) -> "MeterCrops":
        return MeterCrops([self.images[i] for i in indices], [self.values[i] for i in indices],
                          [self.groups[i] for i in indices], [self.paths[i] for i in indices])


@dataclass
class MeterDataset:
    """Every usable crop, split by group, and what was dropped on the way."""

    splits: dict[str, MeterCrops]
    root: Path
    duplicates: int
    not_a_digit: int
    merged: dict[str, list[str]]


class _Groups:
    """Union-find over group names: groups sharing an identical image become one."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, g: str) -> str:
        self.parent.setdefault(g, g)
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: str, b: str) -> None:
        # Keep a test or validation meter's name (a copy of one of its crops filed elsewhere must not move the
        # meter into training), else the longer (more specific) name, e.g. the meter over `lcd`.
        ra, rb = sorted((self.find(a), self.find(b)), key=lambda g: (SPLITS[::-1].index(split_of(g)), -len(g), g))
        self.parent[rb] = ra


def meter_root(data_dir: str | Path | None = None) -> Path:
    root = data_root(data_dir) / SUBDIR
    if not root.is_dir():
        raise DataNotFoundError(f"meter digit crops not found at {root} (set --data-dir or $EDGE_DATA_DIR to the "
                                f"folder that holds {SUBDIR})")
    return root


def load_meter_digits(data_dir: str | Path | None = None, splits: tuple[str, ...] = SPLITS,
                      progress: bool = False) -> MeterDataset:
    """Load, deduplicate, group and split the crops. Deterministic: sorted paths, fixed group lists."""
    root = meter_root(data_dir)
    paths = sorted(root.rglob("*.jpg"))
    if not paths:
        raise DataNotFoundError(f"no .jpg crops under {root}")
    groups = _Groups()
    first_by_hash: dict[str, Path] = {}
    kept: list[tuple[Path, str]] = []
    duplicates = not_a_digit = 0
    for path in paths:
        group = folder_group(path.relative_to(root))
        groups.find(group)
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if digest in first_by_hash:
            groups.union(folder_group(first_by_hash[digest].relative_to(root)), group)
            duplicates += 1
            continue
        first_by_hash[digest] = path
        kept.append((path, group))
    merged: dict[str, list[str]] = defaultdict(list)
    for g in groups.parent:
        if groups.find(g) != g:
            merged[groups.find(g)].append(g)

    result = {name: MeterCrops() for name in splits}
    iterator = kept
    if progress:
        from tqdm import tqdm

        iterator = tqdm(kept, desc="loading meter crops", unit="img", mininterval=2)
    for path, group in iterator:
        value = parse_label(path.name)
        if value is None:
            not_a_digit += 1
            continue
        group = groups.find(group)
        split = split_of(group)
        if split not in result:
            continue
        crops = result[split]
        image = load_image(path)
        # a grey JPEG (an IR camera's crop) as three equal channels, the model's RGB input
        crops.images.append(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image)
        crops.values.append(value)
        crops.groups.append(group)
        crops.paths.append(path.relative_to(root).as_posix())
    return MeterDataset(result, root, duplicates, not_a_digit, {k: sorted(v) for k, v in merged.items()})
