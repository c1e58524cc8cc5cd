"""Where the data sets are: a flag, the `EDGE_DATA_DIR` variable, or `../shared/data` beside the checkout.

Every loader takes an explicit `data_dir` (from a CLI flag) and falls back to `data_root()`.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "EDGE_DATA_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEVELOPMENT_DATA = PROJECT_ROOT.parent / "shared" / "data"


class DataNotFoundError(FileNotFoundError):
    """A data set is not where any of the documented places say; the message lists them all."""


def data_root(data_dir: str | Path | None = None) -> Path:
    """The data directory: the argument, else $EDGE_DATA_DIR, else ../shared/data beside the project."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return DEVELOPMENT_DATA

