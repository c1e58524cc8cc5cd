"""Decision rules (device/doorlock/decide.py) and the audit log (device/doorlock/audit.py).

The rules are tested on given per-frame matches (the recognition itself is tested end to end in
test_doorlock_e2e.py); face crops for the liveness measure are real LFW crops.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.doorlock.audit import AuditLog
from device.doorlock.config import DecisionConfig, LivenessConfig
from device.doorlock.decide import Decider, Decision, Gallery, Match, motion
from device.doorlock.evaluate import Embedded, door_test, threshold_for_far
from device.face import Cohort


@pytest.fixture(scope="module")
def crops(data_dir: Path) -> list[np.ndarray]:
    folder = data_dir / "faces" / "lfw-crop-gray-128" / "Tony_Blair"
    return [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(folder.glob("*.jpg"))[:8]]


def unit(v: list[float]) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_cohort_scores_on_a_hand_checkable_example() -> None:
    # Cohort: the four axis directions in 2-D, top 2 similarities. Any axis probe sees (1, 0) → mean 0.5, sd 0.5.
    cohort = Cohort(np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32), top_k=2)
    mean, sd = cohort.stats(np.array([[1, 0], [0, 1]], np.float32))
    assert mean.tolist() == [0.5, 0.5] and sd.tolist() == [0.5, 0.5]
    scores = cohort.scores(np.array([[1, 0]]), np.array([[1, 0], [0, 1]]))
    # Same direction: (1 - 0.5) / 0.5 from both sides → 1. Orthogonal: (0 - 0.5) / 0.5 → -1.
    np.testing.assert_allclose(scores, [[1.0, -1.0]], atol=1e-6)
    # The file the converter writes and the device reads keeps the directions (int8 rows + one scale).
    again = Cohort.load(io.BytesIO(cohort.to_bytes()), 2)
    np.testing.assert_allclose(again.vectors, cohort.vectors, atol=1e-6)


def test_normalising_gallery_demotes_a_face_that_is_close_to_everyone() -> None:
    """The hub case normalisation exists for: a probe that resembles much of the cohort scores lower than a
    distinctive probe, although its raw distance to the enrolled face is smaller."""
    rng = np.random.default_rng(0)
    cohort_vectors = rng.normal(size=(200, 8)).astype(np.float32)
    hub_direction = unit([1, 1, 1, 1, 1, 1, 1, 1])
    cohort_vectors[:100] = hub_direction + 0.3 * cohort_vectors[:100]  # half the cohort crowds one direction
    cohort = Cohort(cohort_vectors / np.linalg.norm(cohort_vectors, axis=1, keepdims=True), top_k=20)
    ann = unit([1, 1, 1, 1, 0, 0, 0, 0])
    distinctive = unit([1, 1, 1, 1, 0, 0, 0, -0.8])
    hub = unit([1, 1, 1, 1, 0.7, 0.0, 0.0, 0.2])
    gallery = Gallery([("ann", ann)], cohort)
    d, h = gallery.match(distinctive, threshold=1.0), gallery.match(hub, threshold=1.0)
    assert h.distance < d.distance  # raw distance ranks the hub closer to ann …
    assert d.score > h.score  # … the normalised score ranks the distinctive face first
    assert d.score is not None and (d.person == "ann") == (d.score >= 1.0)
    raw = Gallery([("ann", ann)])
    assert raw.match(hub, threshold=0.7).score is None


def test_gallery_refuses_unknown_faces_instead_of_nearest_match() -> None:
    gallery = Gallery([("ann", unit([1, 0, 0])), ("ann", unit([0.9, 0.1, 0])), ("bob", unit([0, 1, 0]))])
    near_ann = gallery.match(unit([0.95, 0.05, 0.05]), threshold=0.3)
    assert near_ann.person == "ann" and near_ann.distance < 0.3
    stranger = gallery.match(unit([0.3, 0.3, 0.9]), threshold=0.3)
    assert stranger.person is None and stranger.nearest in ("ann", "bob") and stranger.distance > 0.3
    assert np.isclose(stranger.distance, min(np.linalg.norm(unit([0.3, 0.3, 0.9]) - v) for v in gallery.vectors))
    assert Gallery([]).match(unit([1, 0, 0]), 1.0).person is None


def test_per_attempt_threshold_refuses_strangers_that_tie_at_the_quota() -> None:
    """threshold_for_far on a hand example: ann enrolled at (1, 0); four stranger photos, two of them the same
    face. A 25% quota admits one attempt; the 2nd and 3rd closest tie, so the line must fall below both, with a
    margin, and only the closest stranger gets in."""
    ann = unit([1, 0])
    strangers = np.stack([unit([0.9, 0.1]), unit([0.6, 0.4]), unit([0.6, 0.4]), unit([0.1, 0.9])])
    data = Embedded([{"ann": (ann[None], ann[None])}], [strangers])
    distances = np.linalg.norm(strangers - ann, axis=1)
    limit = threshold_for_far(data, 0.25)
    assert distances[0] < limit < distances[1] and distances[1] - limit > 1e-4
    assert door_test(data, limit).stranger_accepted == 1
    # A 50% quota has room for two, but the tie enters only as a whole: still one, still with a margin.
    half = threshold_for_far(data, 0.5)
    assert distances[1] - half > 1e-4 and door_test(data, half).stranger_accepted == 1
    assert door_test(data, threshold_for_far(data, 0.75)).stranger_accepted == 3
    assert door_test(data, threshold_for_far(data, 0.0)).stranger_accepted == 0


def decider(**changes) -> Decider:
    return Decider(DecisionConfig(**changes), LivenessConfig(min_motion=1.0))


def feed(d: Decider, people: list[str | None], crops: list[np.ndarray], t0: float = 0.0) -> list[Decision]:
    out = []
    for i, person in enumerate(people):
        result = d.observe(Match(person, person or "ann", 0.5 if person else 1.2), crops[i % len(crops)], t0 + i * 0.1)
        if result:
            out.append(result)
    return out


def test_needs_n_of_m_frames(crops) -> None:
    d = decider(votes_needed=3, window=5)
    assert feed(d, ["ann", None, "ann", None], crops) == []
    (decision,) = feed(d, ["ann"], crops, t0=0.4)
    assert decision.action == "unlock" and decision.person == "ann" and decision.frames == 5


def test_mixed_or_unknown_frames_deny(crops) -> None:
    d = decider(votes_needed=3, window=5)
    (decision,) = feed(d, ["ann", "bob", None, "ann", "bob"], crops)
    assert decision.action == "deny" and decision.person is None and decision.distance == 0.5
    assert "nearest" in decision.reason


def test_cooldown_after_unlock(crops) -> None:
    d = decider(votes_needed=2, window=3, cooldown_s=5.0)
    assert [x.action for x in feed(d, ["ann", "ann"], crops)] == ["unlock"]
    assert d.blocked(1.0) == "cooldown"
    assert feed(d, ["ann"] * 5, crops, t0=1.0) == []  # ignored while the door is open
    assert [x.action for x in feed(d, ["ann", "ann"], crops, t0=6.0)] == ["unlock"]


def test_lockout_after_repeated_refusals(crops) -> None:
    d = decider(votes_needed=2, window=2, max_attempts=3, attempt_window_s=60, lockout_s=100)
    decisions = feed(d, [None] * 6, crops)
    assert [x.action for x in decisions] == ["deny"] * 3
    assert "locked out" in decisions[-1].reason
    assert d.blocked(50) == "lockout"
    assert feed(d, ["ann"] * 4, crops, t0=50) == []  # even an enrolled person waits out the lockout
    assert [x.action for x in feed(d, ["ann", "ann"], crops, t0=101)] == ["unlock"]


def test_attempt_resets_when_face_leaves(crops) -> None:
    d = decider(votes_needed=3, window=5, idle_reset_s=2.0)
    assert feed(d, ["ann", "ann"], crops) == []
    assert feed(d, ["ann", "ann"], crops, t0=10.0) == []  # the earlier two votes expired
    assert feed(d, ["ann"], crops, t0=10.2)[0].action == "unlock"


def test_still_picture_fails_liveness(crops) -> None:
    still = [crops[0]] * 5
    noisy = [np.clip(crops[0].astype(int) + np.random.default_rng(i).integers(-1, 2, crops[0].shape), 0, 255)
             .astype(np.uint8) for i in range(5)]  # sensor noise of a camera filming a printed photo
    assert motion(still) == 0.0 and motion(noisy) < 1.0
    assert motion(crops[:5]) > 10  # different moments of a real face
    d = decider(votes_needed=3, window=3)
    (decision,) = feed(d, ["ann"] * 3, noisy)
    assert decision.action == "not_live" and decision.person == "ann"
    assert not d.blocked(0.5)  # a failed liveness check is a refusal, not an unlock: no cooldown


def test_audit_log_records_decisions_and_caps_snapshots(tmp_path: Path, crops) -> None:
    log = AuditLog(tmp_path / "lock.db", tmp_path / "refused", keep=3)
    frame = cv2.cvtColor(crops[0], cv2.COLOR_GRAY2BGR)
    log.record(Decision("unlock", "ann", 0.42, 5, 3.2, "3 of 5 frames matched"), frame, when=1000.0)
    for i in range(5):
        log.record(Decision("deny", None, 1.1, 5, 2.0, "no enrolled person"), frame, when=2000.0 + i)
    rows = log.recent(10)
    assert len(rows) == 6 and rows[-1].person == "ann" and rows[-1].snapshot is None  # no photo of residents
    assert rows[0].action == "deny" and rows[0].distance == pytest.approx(1.1) and rows[0].frames == 5
    kept = sorted((tmp_path / "refused").glob("*.jpg"))
    assert len(kept) == 3 and str(kept[-1]) == rows[0].snapshot
    assert cv2.imread(rows[0].snapshot).shape == frame.shape
    log.close()


def test_audit_log_keeps_the_deciding_score_and_upgrades_an_old_table(tmp_path: Path) -> None:
    """A log written before scores were recorded gains the column and keeps its rows."""
    database = tmp_path / "old.db"
    old = sqlite3.connect(str(database))
    old.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, person TEXT, "
                "distance REAL, frames INTEGER NOT NULL, motion REAL, action TEXT NOT NULL, reason TEXT NOT NULL, "
                "snapshot TEXT)")
    old.execute("INSERT INTO audit (time, person, distance, frames, motion, action, reason) "
                "VALUES (1.0, 'ann', 0.4, 5, 3.0, 'unlock', 'old row')")
    old.commit()
    old.close()
    log = AuditLog(database)
    log.record(Decision("unlock", "ann", 0.93, 5, 3.0, "3 of 5 frames matched", score=5.2), when=2.0)
    new, previous = log.recent(2)
    assert (new.score, new.distance) == (pytest.approx(5.2), pytest.approx(0.93))
    assert previous.reason == "old row" and previous.score is None
    log.close()
