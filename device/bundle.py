"""Model bundles: the .tflite files plus a JSON manifest, verified before anything is loaded.

A bundle is the unit that travels from the converter to a device. The manifest says what the
model expects (input shape, dtype, quantisation, preprocessing, labels, thresholds) so the
device never guesses, and it carries the sha256 of every file so that a truncated copy or a
model swapped by hand is refused instead of silently run. The writer lives here, next to the
reader, so the format is defined in one place.

What the hashes cover: every file the manifest names, and only files inside the bundle folder
(a name with "..", an absolute path or a file missing from `files` is refused). A model or cohort
is loaded from the very bytes that were hashed (`Bundle.read`), so a file replaced between the
check and the load cannot slip in. The manifest itself is not hashed: it is the source of truth
for the hashes, so a corrupt one is caught only by its structure; protecting it against a
deliberate edit (thresholds, labels) would need a signature, which bundles do not have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device.runtime import Model, edgetpu_delegate

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


log = logging.getLogger(__name__)
MODELS_ENV = "EDGE_MODELS"
# Model variants a bundle may hold; "edgetpu" is the int8 model compiled by edgetpu_compiler (runs only on a Coral).
VARIANTS = ("int8", "float", "edgetpu")
_CHECKOUT_MODELS = Path(__file__).resolve().parent.parent / "models"


class BundleError(Exception):
    """A bundle is missing, malformed, or does not match its manifest."""


def default_models_dir() -> Path:
    """Folder the apps look in when no bundle path is given: $EDGE_MODELS, else the checkout's models/, else ./models.

    Why three places: in a checkout (editable install, tests, CI) the shipped bundles sit next to the package; after
    `pip install .` the package lives in site-packages where there is no models/ folder, so a device names its
    folder once in the environment (the deploy script copies bundles to /opt/<app>/models) instead of on every
    command line.
    """
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    if _CHECKOUT_MODELS.is_dir():
        return _CHECKOUT_MODELS
    return Path("models")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large models do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified model bundle on disk."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        """Read a bundle from its folder (or its manifest file) and, by default, check every hash."""
        path = Path(path)
        root = path.parent if path.name == MANIFEST_NAME else path
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            hint = "" if root.exists() else (f" (the folder does not exist; give the bundle's path, or set "
                                             f"{MODELS_ENV} to the folder that holds the bundles)")
            raise BundleError(f"{root} is not a model bundle: {MANIFEST_NAME} not found{hint}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict):
            raise BundleError(f"{manifest_path} is not a bundle manifest (a JSON object)")
        for key in ("format", "task", "models", "files"):
            if key not in manifest:
                raise BundleError(f"{manifest_path} has no '{key}' entry; not a bundle manifest")
        if manifest["format"] != FORMAT_VERSION:
            raise BundleError(
                f"{manifest_path} is bundle format {manifest['format']}, this runtime reads {FORMAT_VERSION}"
            )
        _check_structure(manifest, manifest_path)
        bundle = cls(root=root, manifest=manifest)
        if verify:
            bundle.verify()
        if bundle.rejected:  # runnable for a look, never silently
            log.warning("bundle %s FAILED its accuracy gate (%s): it is evidence, not a model to deploy",
                        root, manifest["gate"].get("metric", "?"))
        return bundle

    @property
    def rejected(self) -> bool:
        """Whether the converter's accuracy gate failed this bundle (kept by it as evidence in <out>.rejected)."""
        gate = self.manifest.get("gate")
        return isinstance(gate, dict) and gate.get("passed") is False

    def verify(self) -> None:
        """Raise BundleError unless every file listed in the manifest exists with its recorded sha256."""
        for name in self.manifest["files"]:
            self.read(name)

    def read(self, name: str) -> bytes:
        """The bytes of one listed file, checked against its sha256: load models from these, not from a path."""
        expected = self.manifest["files"].get(name)
        if expected is None:
            raise BundleError(f"bundle {self.root}: {name} is not listed in the manifest's files")
        file = self.root / name
        if not file.is_file():
            raise BundleError(f"bundle {self.root}: {name} is listed in the manifest but missing")
        data = file.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise BundleError(
                f"bundle {self.root}: {name} does not match its manifest "
                f"(sha256 {actual[:12]}…, expected {expected[:12]}…); refusing a modified or corrupt model"
            )
        return data

    @property
    def task(self) -> str:
        return str(self.manifest["task"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.get("labels", []))

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.manifest.get("preprocessing", {}))

    @property
    def thresholds(self) -> dict[str, Any]:
        return dict(self.manifest.get("thresholds", {}))

    def variants(self, runnable: bool = False) -> list[str]:
        """The bundle's model variants; `runnable`: only those this machine can run (no "edgetpu" without a Coral)."""
        names = list(self.manifest["models"])
        if runnable and "edgetpu" in names and edgetpu_delegate() is None:
            names.remove("edgetpu")
        return names

    def model_info(self, variant: str = "int8") -> dict[str, Any]:
        models = self.manifest["models"]
        if variant not in models:
            raise BundleError(f"bundle {self.root} has no '{variant}' model (it has: {', '.join(models)})")
        return dict(models[variant])

    def model_path(self, variant: str = "int8") -> Path:
        """Where the variant's file is (for messages and benchmarks); load it with `model`, which checks it."""
        return self.root / self.model_info(variant)["file"]

    def model(self, variant: str = "int8", threads: int | None = None) -> Model:
        """The variant's model, built from the bytes whose sha256 was just checked."""
        return Model(self.model_path(variant), threads=threads, content=self.read(self.model_info(variant)["file"]))


def _check_name(name: object, where: str) -> str:
    """A file name inside the bundle folder: relative, forward slashes, no "..", so it cannot point outside."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or ":" in name \
            or any(part in ("", ".", "..") for part in name.split("/")):
        raise BundleError(f"{where}: {name!r} is not a file name inside the bundle folder")
    return name


def _check_structure(manifest: dict[str, Any], where: Path) -> None:
    """Types and names the loader relies on, so a damaged manifest is a BundleError, not a traceback."""
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{where}: 'files' must map each file name to its sha256 (and list at least the model)")
    for name, digest in files.items():
        _check_name(name, f"{where} files")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BundleError(f"{where}: the sha256 of {name} is not 64 hex digits")
    for key, kind in (("preprocessing", dict), ("labels", list), ("thresholds", dict)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise BundleError(f"{where}: '{key}' must be a JSON {'object' if kind is dict else 'array'}")
    models = manifest["models"]
    if not isinstance(models, dict) or not models:
        raise BundleError(f"{where}: 'models' must map each variant (e.g. int8) to its file and facts")
    for variant, info in models.items():
        if not isinstance(info, dict) or "file" not in info:
            raise BundleError(f"{where}: model '{variant}' has no 'file'")
        referenced = [info["file"]]
        if isinstance(info.get("score_normalisation"), dict) and "cohort" in info["score_normalisation"]:
            referenced.append(info["score_normalisation"]["cohort"])
        for name in referenced:
            if _check_name(name, f"{where} model '{variant}'") not in files:
                raise BundleError(f"{where}: model '{variant}' names {name}, which has no sha256 in 'files'")


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` into a bundle folder, hashing every other file that is in it.

    Hashes are taken last, over the files as they are on disk, so the manifest can never
    describe a file that was rewritten after it.
    """
    root = Path(root)
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    for variant, info in manifest.get("models", {}).items():
        if info["file"] not in files:
            raise BundleError(f"manifest names {info['file']} for '{variant}' but it is not in {root}")
    full = {"format": FORMAT_VERSION, **manifest, "files": files}
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    return path
