"""Decision rules (device/doorlock/decide.py) and the audit log (device/doorlock/audit.py).

The rules are tested on given per-frame matches (the recognition itself is tested end to end in
test_doorlock_e2e.py). The liveness measure is tested the way the service feeds it: scene photos made into
camera frames (sensor noise, brightness flicker, a photo moved by hand), through the real Haar detector and
crop of `Recognizer.process` with the shipped bundle; LFW crops stand in for different moments of a live face.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import MODELS

from device.doorlock.audit import AuditLog
from device.doorlock.bench import letterbox
from device.doorlock.config import DecisionConfig, LivenessConfig, parse_config
from device.doorlock.decide import Decider, Decision, Gallery, Match, motion
from device.doorlock.pipeline import Recognizer
from device.doorlock.evaluate import Embedded, door_test, threshold_for_far
from device.face import Cohort


@pytest.fixture(scope="module")
def crops(data_dir: Path) -> list[np.ndarray]:
    folder = data_dir / "faces" / "lfw-crop-gray-128" / "Tony_Blair"
    return [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted(folder.glob("*.jpg"))[:8]]


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    return Recognizer.from_config(parse_config({"model": {"bundle": str(MODELS / "face"), "threads": 1}}))


def camera_crops(recognizer: Recognizer, frames: list[np.ndarray]) -> list[np.ndarray]:
    """The face crops the service would vote with: each frame through detection (with tracking) and the crop."""
    recognizer._last_box = None
    crops = [recognizer.process(f).crop for f in frames]
    assert all(c is not None for c in crops), "a frame gave no usable face"
    return crops


def scene_frame(data_dir: Path, name: str) -> np.ndarray:
    """A scene photo as a 640x480 camera frame."""
    return letterbox(cv2.imread(str(data_dir / "faces" / "scenes" / name)))


def moved(frame: np.ndarray, dx: float, dy: float, scale: float = 1.0, degrees: float = 0.0) -> np.ndarray:
    """The frame of a photo held by hand: shifted, scaled and turned in its own plane."""
    height, width = frame.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, scale)
    matrix[:, 2] += (dx, dy)
    return cv2.warpAffine(frame, matrix, (width, height))


def still_photo_frames(frame: np.ndarray, case: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Five camera frames of a printed photo: `case` is what changes between them."""
    base = frame.astype(np.float64)
    if case == "noise 1":
        frames = [base + rng.normal(0, 1.0, base.shape) for _ in range(5)]
    elif case == "noise 2":
        frames = [base + rng.normal(0, 2.0, base.shape) for _ in range(5)]
    elif case == "flicker":  # auto exposure or a flickering light: +-2 grey levels, no noise
        frames = [base + (2 if i % 2 else -2) for i in range(5)]
    elif case == "gain":  # exposure gain steps of up to 10% and an offset
        frames = [base * (1 + 0.05 * (i % 3)) + 3 * i for i in range(5)]
    else:  # "hand": shifted up to 16 px, scaled up to 12%, turned up to 4 degrees, with sensor noise
        frames = [moved(frame, 4 * i, -3 * i, 1 + 0.03 * i, 1.0 * i) + rng.normal(0, 1.0, base.shape)
                  for i in range(5)]
    return [np.clip(f, 0, 255).astype(np.uint8) for f in frames]


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
    return Decider(DecisionConfig(**changes), LivenessConfig())


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
    (abandoned,) = feed(d, ["ann", "ann"], crops, t0=10.0)  # the earlier two votes expired …
    assert abandoned.action == "abandoned" and abandoned.frames == 2
    assert feed(d, ["ann"], crops, t0=10.2)[0].action == "unlock"  # … and the new attempt started at t0=10


def test_passers_by_glimpsed_for_a_frame_do_not_lock_the_residents_out(crops) -> None:
    """Review finding: five strangers seen for one frame each, 8 s apart, were five abandoned "refusals" and
    locked everybody out for lockout_s, though an attempt shorter than votes_needed can never open the door."""
    d = decider(votes_needed=3, window=5, idle_reset_s=2.0, max_attempts=5, lockout_s=120)
    abandoned = []
    for i in range(5):
        feed(d, [None], crops, t0=8.0 * i)
        abandoned += [x for x in [d.expire(8.0 * i + 2.5)] if x is not None]
    assert [(x.action, x.frames) for x in abandoned] == [("abandoned", 1)] * 5  # still audited by the service
    assert d.blocked(40.0) is None
    assert [x.action for x in feed(d, ["ann"] * 3, crops, t0=41.0)] == ["unlock"]  # the resident gets in


def test_abandoned_attempts_are_audited_refusals_and_lock_out(crops) -> None:
    """Failure report: a stranger who stepped away after 4 frames (before the 5-frame window completed) was
    silently forgotten after idle_reset_s: 1000 tries in 42 minutes, no audit row, no lockout."""
    d = decider(votes_needed=3, window=5, idle_reset_s=2.0, max_attempts=5, lockout_s=120)
    t, decisions = 0.0, []
    for _ in range(5):
        decisions += feed(d, [None] * 4, crops, t0=t)
        t += 2.5  # the face is gone for longer than idle_reset_s
        decisions += [x for x in [d.expire(t)] if x is not None]  # what the service does on every frame
    assert [x.action for x in decisions] == ["abandoned"] * 5
    assert "face left after 4 frame(s)" in decisions[0].reason and "locked out" in decisions[-1].reason
    assert d.blocked(t + 1) == "lockout"
    assert d.expire(t + 100) is None  # nothing left to abandon


def test_still_picture_fails_liveness(crops) -> None:
    """Decider level: identical crops (a frozen feed) are not_live, and the refusal starts no cooldown."""
    d = decider(votes_needed=3, window=3)
    (decision,) = feed(d, ["ann"] * 3, [crops[0]])
    assert decision.action == "not_live" and decision.person == "ann" and decision.motion < 0.01
    assert not d.blocked(0.5)  # a failed liveness check is a refusal, not an unlock: no cooldown


@pytest.mark.parametrize("case", ["noise 1", "noise 2", "flicker", "gain", "hand"])
@pytest.mark.parametrize("photo", ["obama.jpg", "obama2.jpg", "lin-manuel-miranda.png"])
def test_still_photo_in_front_of_the_camera_is_not_live(recognizer: Recognizer, data_dir: Path, photo: str,
                                                        case: str) -> None:
    """Failure report: a printed photo on a stand unlocked the door, because the Haar box jitters by a few px
    between frames with 1 grey level of sensor noise (or a +-2 brightness flicker), and the unaligned crops then
    differed by ~12.7 grey levels against min_motion 1.0. Also a photo moved by hand in its own plane."""
    frames = still_photo_frames(scene_frame(data_dir, photo), case, np.random.default_rng(1))
    score = motion(camera_crops(recognizer, frames))
    assert score < 0.6 * LivenessConfig().min_motion, score  # measured at most 1.12 (session 6): under the default 2.0


@pytest.mark.parametrize("blur", ["motion 5", "motion 9", "defocus 1.0", "defocus 1.5"])
@pytest.mark.parametrize("photo", ["obama.jpg", "obama2.jpg"])
def test_one_blurred_frame_of_a_still_photo_is_not_live(recognizer: Recognizer, data_dir: Path, photo: str,
                                                        blur: str) -> None:
    """Review finding: a still photo flicked sideways in one frame (motion blur) or slightly out of focus there
    measured 3-5 grey levels, because blur is a change no affine warp undoes. The crops are now brought to the
    same sharpness and compared more coarsely; a blur of 13 px or more can still pass (README)."""
    rng = np.random.default_rng(2)
    frame = scene_frame(data_dir, photo)
    kind, size = blur.split()
    if kind == "motion":
        kernel = np.zeros((int(size), int(size)), np.float32)
        kernel[int(size) // 2, :] = 1 / int(size)
        odd = cv2.filter2D(frame, -1, kernel)
    else:
        odd = cv2.GaussianBlur(frame, (0, 0), float(size))
    frames = [np.clip(f + rng.normal(0, 1.0, f.shape), 0, 255).astype(np.uint8) for f in (frame, frame, odd)]
    recognizer._last_box = None
    crops = [recognizer.process(f).crop for f in frames]
    if crops[2] is None:  # obama2 at defocus 1.5: the blur check refuses that frame before it can vote
        assert recognizer.process(odd).skipped.startswith("blurred")
        return
    assert motion(crops) < LivenessConfig().min_motion


def lfw_frame(data_dir: Path, person: str, index: int) -> np.ndarray:
    """An LFW crop of `person` as a 640x480 camera frame: enlarged to a 200 px face, the edges extended around it."""
    path = sorted((data_dir / "faces" / "lfw-crop-gray-128" / person).glob("*.jpg"))[index]
    face = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (200, 200), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(cv2.copyMakeBorder(face, 140, 140, 220, 220, cv2.BORDER_REPLICATE), cv2.COLOR_GRAY2BGR)


@pytest.mark.parametrize("source", ["scenes obama.jpg / obama2.jpg", "LFW Tony_Blair 1-3", "LFW Colin_Powell 1-3"])
def test_two_real_photos_of_one_person_pass_liveness(recognizer: Recognizer, data_dir: Path, source: str) -> None:
    """The live side of the calibration: different photos of one person (other pose, expression and light) as
    camera frames change by far more than min_motion after alignment. No video of a live face is available here,
    so this bounds what a live face does between frames from above; it is not a measurement of one."""
    if source.startswith("scenes"):
        first, second = scene_frame(data_dir, "obama.jpg"), scene_frame(data_dir, "obama2.jpg")
        frames = [first, second, first]
    else:
        frames = [lfw_frame(data_dir, source.split()[1], i) for i in range(3)]
    score = motion(camera_crops(recognizer, frames))
    assert score > 5 * LivenessConfig().min_motion, score


def test_lfw_photos_of_one_person_pass_liveness(crops) -> None:
    """Different moments of one face (LFW crops of Tony Blair) are live for the aligned measure too."""
    assert motion(crops[:5]) > 5 * LivenessConfig().min_motion


def test_still_photo_cannot_borrow_motion_from_another_face(recognizer: Recognizer, data_dir: Path) -> None:
    """Failure report: motion was averaged over every frame of the window, so 2 frames of the attacker's own face
    followed by 3 frames of a still photo of the resident passed liveness and unlocked."""
    rng = np.random.default_rng(3)
    own = camera_crops(recognizer, still_photo_frames(scene_frame(data_dir, "lin-manuel-miranda.png"), "noise 1", rng))
    photo = camera_crops(recognizer, still_photo_frames(scene_frame(data_dir, "obama.jpg"), "noise 1", rng))
    d = decider(votes_needed=3, window=5)
    steps = [(None, own[0]), (None, own[1]), ("ann", photo[0]), ("ann", photo[1]), ("ann", photo[2])]
    decisions = [d.observe(Match(p, "ann", 0.4 if p else 1.3), crop, i * 0.1) for i, (p, crop) in enumerate(steps)]
    assert decisions[:4] == [None] * 4
    assert decisions[4].action == "not_live" and decisions[4].motion < LivenessConfig().min_motion
    assert motion(own[:2] + photo[:3]) > LivenessConfig().min_motion  # what the window as a whole would have given


def test_votes_from_an_emptied_gallery_do_not_crash_the_decision(crops) -> None:
    """Failure report: frames scored against a normalising gallery, then `doorlock remove` of the last resident:
    the empty gallery's matches have no score, and max() over None and float raised TypeError in the service."""
    d = decider(votes_needed=3, window=5)
    frames = [Match(None, "ann", 1.2, 0.8), Match(None, "ann", 1.2, 0.9)] + [Match(None, None, float("inf"))] * 3
    decisions = [d.observe(m, crops[i], i * 0.1) for i, m in enumerate(frames)]
    assert decisions[-1].action == "deny" and "nearest: ann" in decisions[-1].reason
    assert decisions[-1].score == pytest.approx(0.9)


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


def test_snapshots_are_named_and_pruned_by_audit_id_not_the_clock(tmp_path: Path, crops) -> None:
    """Failure report: snapshots were named by wall-clock time, so after a Pi without a real-time clock had run a
    year ahead, every new snapshot sorted oldest and was deleted at once; two refusals in one millisecond shared a
    file."""
    log = AuditLog(tmp_path / "lock.db", tmp_path / "refused", keep=3)
    frame = cv2.cvtColor(crops[0], cv2.COLOR_GRAY2BGR)
    ahead = [log.record(Decision("deny", None, 1.1, 5, 2.0, "clock ahead"), frame, when=4e9 + i) for i in range(3)]
    today = [log.record(Decision("deny", None, 1.1, 5, 2.0, f"today {i}"), frame, when=1e9) for i in range(3)]
    assert all(Path(r.snapshot).is_file() for r in today) and not any(Path(r.snapshot).exists() for r in ahead)
    assert len({r.snapshot for r in today}) == 3  # same time, three files
    assert [r.snapshot for r in log.recent(3)] == [r.snapshot for r in reversed(today)]
    # the pruned rows stay, without a path to a file that is gone (they pointed at deleted JPEGs)
    assert [r.snapshot for r in log.recent(6)[3:]] == [None] * 3
    log.close()


def test_audit_row_is_kept_when_the_snapshot_cannot_be_written(tmp_path: Path, crops) -> None:
    """Failure report: a snapshot folder that became unwritable (USB stick pulled, folder replaced) raised before
    the INSERT, so the refused attempt left no audit row at all."""
    log = AuditLog(tmp_path / "lock.db", tmp_path / "refused")
    (tmp_path / "refused").rmdir()
    (tmp_path / "refused").write_text("not a folder any more")
    row = log.record(Decision("deny", None, 1.1, 5, 20.0, "stranger"), cv2.cvtColor(crops[0], cv2.COLOR_GRAY2BGR))
    assert row.snapshot is None
    (stored,) = log.recent()
    assert (stored.action, stored.reason, stored.snapshot) == ("deny", "stranger", None)
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
