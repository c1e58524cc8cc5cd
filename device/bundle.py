"""Model bundles: the .tflite files plus a JSON manifest, verified before anything is loaded.

A bundle is the unit that travels from the converter to a device. The manifest says what the
model expects (input shape, dtype, quantisation, preprocessing, labels, thresholds) so the
device never guesses, and it carries the sha256 of every file so that a truncated copy or a
model swapped by hand is refused instead of silently run. The writer lives here, next to the
reader, so the format is defined in one place.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class BundleError(Exception):
    """A bundle is missing, malformed, or does not match its manifest."""


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
            raise BundleError(f"{root} is not a model bundle: {MANIFEST_NAME} not found")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
        for key in ("format", "task", "models", "files"):
            if key not in manifest:
                raise BundleError(f"{manifest_path} has no '{key}' entry; not a bundle manifest")
        if manifest["format"] != FORMAT_VERSION:
            raise BundleError(
                f"{manifest_path} is bundle format {manifest['format']}, this runtime reads {FORMAT_VERSION}"
            )
        bundle = cls(root=root, manifest=manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Raise BundleError unless every file listed in the manifest exists with its recorded sha256."""
        for name, expected in self.manifest["files"].items():
            file = self.root / name
            if not file.is_file():
                raise BundleError(f"bundle {self.root}: {name} is listed in the manifest but missing")
            actual = sha256_file(file)
            if actual != expected:
                raise BundleError(
                    f"bundle {self.root}: {name} does not match its manifest "
                    f"(sha256 {actual[:12]}…, expected {expected[:12]}…); refusing a modified or corrupt model"
                )

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

    def variants(self) -> list[str]:
        return list(self.manifest["models"])

    def model_info(self, variant: str = "int8") -> dict[str, Any]:
        models = self.manifest["models"]
        if variant not in models:
            raise BundleError(f"bundle {self.root} has no '{variant}' model (it has: {', '.join(models)})")
        return dict(models[variant])

    def model_path(self, variant: str = "int8") -> Path:
        return self.root / self.model_info(variant)["file"]


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
