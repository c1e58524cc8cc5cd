"""Enrolled people in SQLite: several embeddings per person, each with its face crop and model hash.

The crop is stored next to each embedding (a 128x128 grey PNG, ~10 KB) so that when the face
model is replaced the gallery can be re-embedded from the stored crops without asking everyone to
stand in front of the door again. Each embedding records the sha256 of the model that produced it;
embeddings from another model are never compared with the running one (their distances would be
meaningless), they are re-embedded first.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from device.detect import blur_score
from device.doorlock.pipeline import Recognizer
from device.face import CROP_SIZE, resize_gray
from device.images import ImageError, load_image, to_gray

SCHEMA = """
CREATE TABLE IF NOT EXISTS people (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    person_id INTEGER NOT NULL REFERENCES people(id) ON DELETE CASCADE,
    model_sha256 TEXT NOT NULL,
    vector BLOB NOT NULL,
    crop BLOB NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class EnrollError(Exception):
    """An enrollment request cannot be carried out (bad name, no usable face, unknown person)."""


@dataclass(frozen=True)
class Person:
    name: str
    embeddings: int
    stale: int  # embeddings made by another model than the running one


class FaceDB:
    """The gallery on disk. Names are case-sensitive and must be non-empty printable text."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(SCHEMA)
        self._db.commit()

    def add(self, name: str, embedding: np.ndarray, crop: np.ndarray, model_sha256: str, source: str) -> None:
        """Store one embedding (and its crop) for `name`, creating the person if new."""
        name = check_name(name)
        ok, png = cv2.imencode(".png", crop)
        if not ok:
            raise EnrollError(f"{source}: cannot encode the face crop")
        now = time.time()
        self._db.execute("INSERT OR IGNORE INTO people (name, created) VALUES (?, ?)", (name, now))
        (person_id,) = self._db.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
        self._db.execute(
            "INSERT INTO embeddings (person_id, model_sha256, vector, crop, source, created) VALUES (?, ?, ?, ?, ?, ?)",
            (person_id, model_sha256, np.asarray(embedding, np.float32).tobytes(), png.tobytes(), source, now))
        self._db.commit()

    def people(self, model_sha256: str | None = None) -> list[Person]:
        """Everyone enrolled, with how many embeddings each has (and how many are from another model)."""
        rows = self._db.execute(
            "SELECT p.name, COUNT(e.id), SUM(CASE WHEN e.model_sha256 != ? THEN 1 ELSE 0 END) "
            "FROM people p LEFT JOIN embeddings e ON e.person_id = p.id GROUP BY p.id ORDER BY p.name",
            (model_sha256 or "",)).fetchall()
        return [Person(name, count, int(stale or 0) if model_sha256 else 0) for name, count, stale in rows]

    def remove(self, name: str) -> int:
        """Delete a person and all their embeddings; returns how many embeddings went."""
        row = self._db.execute("SELECT id FROM people WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise EnrollError(f"nobody called {name!r} is enrolled")
        (count,) = self._db.execute("SELECT COUNT(*) FROM embeddings WHERE person_id = ?", row).fetchone()
        self._db.execute("DELETE FROM embeddings WHERE person_id = ?", row)
        self._db.execute("DELETE FROM people WHERE id = ?", row)
        self._db.commit()
        return int(count)

    def entries(self, model_sha256: str) -> list[tuple[str, np.ndarray]]:
        """(name, embedding) of every enrollment made by the model with this hash."""
        rows = self._db.execute(
            "SELECT p.name, e.vector FROM embeddings e JOIN people p ON p.id = e.person_id "
            "WHERE e.model_sha256 = ? ORDER BY e.id", (model_sha256,)).fetchall()
        return [(name, np.frombuffer(blob, np.float32).copy()) for name, blob in rows]

    def stale_count(self, model_sha256: str) -> int:
        (n,) = self._db.execute("SELECT COUNT(*) FROM embeddings WHERE model_sha256 != ?", (model_sha256,)).fetchone()
        return int(n)

    def reembed(self, recognizer: Recognizer) -> int:
        """Recompute every embedding not made by the running model from its stored crop; returns how many."""
        rows = self._db.execute("SELECT id, crop FROM embeddings WHERE model_sha256 != ?",
                                (recognizer.model_sha256,)).fetchall()
        for row_id, png in rows:
            crop = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
            vector = recognizer.embedder.embed(crop)
            self._db.execute("UPDATE embeddings SET vector = ?, model_sha256 = ? WHERE id = ?",
                             (vector.astype(np.float32).tobytes(), recognizer.model_sha256, row_id))
        self._db.commit()
        return len(rows)

    def version(self) -> tuple[int, int]:
        """Changes when embeddings are added or removed (e.g. by `doorlock enroll` beside the service).

        Not SQLite's `data_version`: the audit log shares the file and commits on every decision.
        """
        count, last = self._db.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM embeddings").fetchone()
        return int(count), int(last)

    def close(self) -> None:
        self._db.close()


def check_name(name: str) -> str:
    """A person's name as stored: stripped, non-empty, printable, at most 100 characters."""
    name = name.strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise EnrollError(f"invalid name {name!r}: use 1-100 printable characters")
    return name


def face_from_image(recognizer: Recognizer, image: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The one usable face of an enrollment photo → (crop, embedding), or a clear `EnrollError`.

    Enrollment is stricter than recognition: a photo with no face, several comparable faces, or a
    face too blurred is refused instead of guessed, because a wrong gallery entry lets the wrong
    person in later. A much smaller second face (someone far behind) is tolerated.
    """
    faces = recognizer.detector.detect(image)
    if not faces:
        raise EnrollError(f"{source}: no face found (at least {recognizer.detector.min_face} px, frontal)")
    if len(faces) > 1 and faces[1].size >= 0.6 * faces[0].size:
        raise EnrollError(f"{source}: {len(faces)} faces found; enroll with photos of one person only")
    face = faces[0]
    sharpness = blur_score(image, face.box)
    if sharpness < recognizer.min_blur:
        raise EnrollError(f"{source}: face too blurred (sharpness {sharpness:.0f} < {recognizer.min_blur:.0f})")
    return recognizer.embed_face(image, face)


def face_from_crop(recognizer: Recognizer, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An image that is already a face crop framed like the embedder's training data (e.g. an LFW crop)."""
    crop = resize_gray(to_gray(image), CROP_SIZE)
    return crop, recognizer.embedder.embed(crop)


def enroll_images(db: FaceDB, recognizer: Recognizer, name: str, paths: list[Path],
                  aligned: bool = False) -> tuple[int, list[str]]:
    """Enroll `name` from photo files; returns (embeddings added, error message per refused photo).

    `aligned` means the files are already face crops in the embedder's framing, so detection is skipped.
    """
    check_name(name)
    added, errors = 0, []
    for path in paths:
        try:
            image = load_image(path)
            crop, vector = face_from_crop(recognizer, image) if aligned else face_from_image(recognizer, image, str(path))
        except (EnrollError, ImageError) as exc:
            errors.append(str(exc))
            continue
        db.add(name, vector, crop, recognizer.model_sha256, str(path))
        added += 1
    return added, errors
