"""The door lock end to end on real photographs with the door lock's default face bundle (models/face-resnet, int8).

People are enrolled from the scene photos in the shared data set (Obama: two photos, Biden: one;
neither is an LFW person), then the pipeline — detection, crop, embedding, threshold, voting, liveness,
relay, audit — runs over photos of them and of strangers. Each attempt is an image folder played as the
camera: there is no camera here, and a folder of photos of one person stands in for the frames of a person in
front of the door.

The scene photos hold two genuinely new photos of Obama (obama3.jpg, and two_people.jpg from the same sitting, which
liveness rightly takes for one still picture), so the attempt that opens the door is obama3.jpg followed by a copy of
the enrolled obama.jpg, and obama3.jpg and two_people.jpg must each be recognised on their own. Until session 7 the
student embedder (models/face) did not recognise them (normalised score ~1.5 against 4.55) and these tests were strict
xfails; the ported dlib network (models/face-resnet) scores them ~10.4 against its 5.02, strangers -4.4 to -13.5. Tests of
mechanics that need an unlock use the enrolled photos or copies of them (MECHANICS_ATTEMPT).
The relay is gpiozero's MockFactory pin, observed over time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import MODELS, REPO, run_cli
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from device.camera import CaptureSource, EndOfStream, FolderSource, FrameSource, Reconnecting
from device.doorlock.bench import letterbox
from device.doorlock.audit import AuditLog
from device.doorlock.config import Config, parse_config
from device.doorlock.enroll import EnrollError, FaceDB, enroll_images, face_from_image
from device.doorlock.pipeline import Recognizer
from device.doorlock.relay import Relay
from device.doorlock.service import DoorLock, run_service

BUNDLE = MODELS / "face-resnet"
ENROLL = {"Barack Obama": ["obama.jpg", "obama2.jpg"], "Joe Biden": ["biden.jpg"]}
# Photos of him that are not enrolled: obama3.jpg and two_people.jpg are new (one sitting), obama-480p.jpg and
# obama_small.jpg are copies of the enrolled obama.jpg (downscaled, cropped).
NEW_OBAMA = ["obama3.jpg", "two_people.jpg"]
OBAMA_ATTEMPT = ["obama3.jpg", "obama-480p.jpg"]
# For tests of the mechanics after an unlock (relay, crash, signals), not of recognition: a copy of the enrolled
# obama.jpg and the enrolled obama2.jpg itself. Two different photos, so they pass liveness as a moving face would.
MECHANICS_ATTEMPT = ["obama-480p.jpg", "obama2.jpg"]
STRANGERS = ["alex-lacamoire.png", "lin-manuel-miranda.png", "astronaut.png"]


@pytest.fixture(scope="module", autouse=True)
def bundle_present() -> None:
    if not (BUNDLE / "manifest.json").is_file():
        pytest.fail(f"{BUNDLE} missing: these tests need the real face bundle (make quantize-face-resnet)")


def make_config(tmp_path: Path, **sections: dict) -> Config:
    base = {"model": {"bundle": str(BUNDLE), "threads": 2},
            "decision": {"votes_needed": 2, "window": 3, "cooldown_s": 0.0},
            "relay": {"unlock_s": 0.3},
            "storage": {"database": str(tmp_path / "lock.db"), "snapshots": str(tmp_path / "refused")}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return parse_config(base)


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    return Recognizer.from_config(make_config(Path("/tmp")))


def scenes(data_dir: Path, names: list[str]) -> list[Path]:
    return [data_dir / "faces" / "scenes" / n for n in names]


def enroll_all(db: FaceDB, recognizer: Recognizer, data_dir: Path) -> None:
    for name, photos in ENROLL.items():
        added, errors = enroll_images(db, recognizer, name, scenes(data_dir, photos))
        assert (added, errors) == (len(photos), [])


def attempt_folder(tmp_path: Path, data_dir: Path, name: str, photos: list[str]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for i, path in enumerate(scenes(data_dir, photos)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.imread(str(path)))
    return folder


def test_enrollment_and_its_refusals(tmp_path: Path, data_dir: Path, recognizer: Recognizer) -> None:
    db = FaceDB(tmp_path / "lock.db")
    enroll_all(db, recognizer, data_dir)
    assert [(p.name, p.embeddings) for p in db.people(recognizer.model_sha256)] == [("Barack Obama", 2), ("Joe Biden", 1)]
    two = cv2.imread(str(data_dir / "faces" / "scenes" / "two_people.jpg"))
    with pytest.raises(EnrollError, match="2 faces"):
        face_from_image(recognizer, two, "two_people.jpg")
    with pytest.raises(EnrollError, match="no face"):
        face_from_image(recognizer, cv2.imread(str(scenes(data_dir, ["obama_partial_face.jpg"])[0])), "partial")
    obama = cv2.imread(str(scenes(data_dir, ["obama.jpg"])[0]))
    with pytest.raises(EnrollError, match="blurred"):
        face_from_image(recognizer, cv2.GaussianBlur(obama, (0, 0), 8), "blurred")
    junk = tmp_path / "junk.jpg"
    junk.write_text("not a photo")
    added, errors = enroll_images(db, recognizer, "Barack Obama", [junk, scenes(data_dir, ["two_people.jpg"])[0]])
    assert added == 0 and "junk.jpg" in errors[0] and "2 faces" in errors[1]
    with pytest.raises(EnrollError, match="invalid name"):
        enroll_images(db, recognizer, "  ", [junk])
    assert db.remove("Joe Biden") == 1
    with pytest.raises(EnrollError, match="nobody called"):
        db.remove("Joe Biden")
    db.close()


class Clock:
    """Service time: 0.1 s per frame (10 frames/s), and a jump between attempts (the person walked away)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.1
        return self.now


def run_attempt(lock: DoorLock, clock: Clock, folder: Path) -> list:
    clock.now += 60
    lock.source = FolderSource(folder)
    decisions = []
    while True:
        try:
            decision = lock.step()
        except EndOfStream:  # the attempt's photos are used up
            return decisions
        if decision:
            decisions.append(decision)


def test_unlocks_only_for_enrolled_people(tmp_path: Path, data_dir: Path, recognizer: Recognizer) -> None:
    config = make_config(tmp_path)
    db = FaceDB(config.storage.database)
    enroll_all(db, recognizer, data_dir)
    factory = MockFactory()
    relay = Relay(17, unlock_s=0.3, pin_factory=factory)
    pin = factory.pin(17)
    audit = AuditLog(config.storage.database, config.storage.snapshots)
    folders = [attempt_folder(tmp_path, data_dir, name, photos) for name, photos in
               (("strangers", STRANGERS), ("printed", ["obama3.jpg"] * 2), ("obama", OBAMA_ATTEMPT))]
    clock = Clock()
    lock = DoorLock(config, recognizer, db, audit, relay, FolderSource(folders[0]), clock=clock)

    strangers = run_attempt(lock, clock, folders[0])
    assert [d.action for d in strangers] == ["deny"] and pin.state is False
    still = run_attempt(lock, clock, folders[1])  # the same photo held still in front of the camera
    assert [(d.action, d.person) for d in still] == [("not_live", "Barack Obama")] and pin.state is False
    for photo in scenes(data_dir, NEW_OBAMA):  # recognised from a photo that is no copy of an enrolled one
        match = recognizer.process(cv2.imread(str(photo)), lock.gallery, lock.threshold).match
        assert match is not None and match.person == "Barack Obama" and match.score >= lock.threshold, photo.name
    genuine = run_attempt(lock, clock, folders[2])
    assert [(d.action, d.person) for d in genuine] == [("unlock", "Barack Obama")]
    assert lock.gallery.cohort is not None  # a named threshold and a bundle with a cohort: normalised scores
    assert genuine[0].score >= lock.threshold
    assert pin.state is True
    time.sleep(0.5)
    assert pin.state is False  # relocked by itself after unlock_s
    assert [s.state for s in pin.states] == [False, True, False]

    rows = audit.recent()
    assert [(r.action, r.person) for r in rows] == [("unlock", "Barack Obama"), ("not_live", "Barack Obama"),
                                                    ("deny", None)]
    assert rows[-1].frames == 3 and rows[-1].score < lock.threshold and rows[0].score >= lock.threshold
    assert rows[0].snapshot is None and Path(rows[-1].snapshot).is_file()  # photos of refusals only
    relay.close()
    db.close()


def test_reembed_after_model_change(tmp_path: Path, data_dir: Path, recognizer: Recognizer) -> None:
    db = FaceDB(tmp_path / "lock.db")
    enroll_all(db, recognizer, data_dir)
    float_model = Recognizer.from_config(make_config(tmp_path, model={"variant": "float"}))
    assert float_model.model_sha256 != recognizer.model_sha256
    assert db.entries(float_model.model_sha256) == []  # never mixes embeddings of two models
    assert db.people(float_model.model_sha256)[0].stale == 2
    assert db.reembed(float_model) == 3
    gallery = float_model.gallery(db.entries(float_model.model_sha256), "far_0.1pct")
    frame = cv2.imread(str(scenes(data_dir, ["obama3.jpg"])[0]))
    match = float_model.process(frame, gallery, float_model.threshold("far_0.1pct")).match
    assert match.person == "Barack Obama"
    db.close()


def test_service_relocks_when_it_crashes(tmp_path: Path, data_dir: Path, recognizer: Recognizer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after an unlock with a 30 s unlock time: the relay must be locked when run_service exits.

    The frames are the enrolled photos (MECHANICS_ATTEMPT): this tests the relay, not recognition."""
    config = make_config(tmp_path, relay={"unlock_s": 30.0},
                         camera={"source": str(attempt_folder(tmp_path, data_dir, "obama", MECHANICS_ATTEMPT))})
    db = FaceDB(config.storage.database)
    enroll_all(db, recognizer, data_dir)
    db.close()

    class CrashAtEnd(FolderSource):
        def read(self) -> np.ndarray:
            if self._next >= len(self.paths):
                raise RuntimeError("simulated crash after the unlock")
            return super().read()

    monkeypatch.setattr("device.doorlock.service.open_source", lambda spec, **kw: CrashAtEnd(Path(spec)))
    factory = MockFactory()
    monkeypatch.setattr(Device, "pin_factory", factory)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_service(config)
    assert [s.state for s in factory.pin(17).states] == [False, True, False]


def run_until_first_decision(env: dict[str, str], signum: signal.Signals = signal.SIGTERM) -> list[dict]:
    """`doorlock run` as a service: wait for its first decision, stop it with `signum`, return its JSON events."""
    proc = subprocess.Popen([sys.executable, "-m", "device.doorlock", "run"], cwd=REPO, text=True,
                            stderr=subprocess.PIPE, env={**os.environ, **env})
    events = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stderr.readline()
        if line.startswith("{"):  # LiteRT itself prints one plain "INFO: Created … delegate" line
            events.append(json.loads(line))
            if events[-1]["event"] == "decision":
                break
    proc.send_signal(signum)
    _, rest = proc.communicate(timeout=20)
    assert proc.returncode == 0, rest[-2000:]
    return events + [json.loads(line) for line in rest.splitlines() if line.startswith("{")]


def test_cli_enroll_list_run_and_sigterm(tmp_path: Path, data_dir: Path) -> None:
    """The `doorlock` command as a user runs it: enroll, list, run on a replayed folder, stop with SIGTERM.

    The replayed frames are the enrolled photos (MECHANICS_ATTEMPT): the unlock shows the command works, not that
    the embedder recognises a new photo."""
    folder = attempt_folder(tmp_path, data_dir, "door", MECHANICS_ATTEMPT)
    config = tmp_path / "lock.toml"
    config.write_text(f'[camera]\nsource = "{folder}"\nloop = true\n[model]\nbundle = "{BUNDLE}"\nthreads = 1\n'
                      f'[relay]\nmock = true\nunlock_s = 0.2\n[decision]\nvotes_needed = 2\nwindow = 3\n'
                      f'[storage]\ndatabase = "lock.db"\n')
    env = {"DOORLOCK_CONFIG": str(config)}
    enrolled = run_cli("-m", "device.doorlock", "enroll", "Barack Obama",
                       *map(str, scenes(data_dir, ENROLL["Barack Obama"])), env=env)
    assert enrolled.returncode == 0 and "2 face(s) enrolled" in enrolled.stdout
    refused = run_cli("-m", "device.doorlock", "enroll", "Nobody", str(scenes(data_dir, ["two_people.jpg"])[0]), env=env)
    assert refused.returncode == 1 and "2 faces found" in refused.stderr and "Traceback" not in refused.stderr
    listed = run_cli("-m", "device.doorlock", "list", env=env)
    assert listed.stdout.strip() == "Barack Obama: 2 embedding(s)"

    events = run_until_first_decision(env)
    names = [e["event"] for e in events]
    assert names[:2] == ["gallery_loaded", "started"] and names[-2:] == ["stopping", "stopped"]
    decision = next(e for e in events if e["event"] == "decision")
    assert decision["action"] == "unlock" and decision["person"] == "Barack Obama"
    assert events[-1]["relay"] == "locked" and events[-2]["signal"] == "SIGTERM"
    audit = run_cli("-m", "device.doorlock", "audit", "--json", env=env)
    assert json.loads(audit.stdout.splitlines()[-1])["action"] == "unlock"


def test_service_survives_bad_frames_and_camera_loss(tmp_path: Path, data_dir: Path, recognizer: Recognizer) -> None:
    """A corrupt frame is skipped with a log line; a camera that vanishes (here: an OpenCV capture of a
    recorded video whose device file is removed, then put back) is reported once and reopened."""
    config = make_config(tmp_path)
    db = FaceDB(config.storage.database)
    enroll_all(db, recognizer, data_dir)
    folder = attempt_folder(tmp_path, data_dir, "obama", OBAMA_ATTEMPT[:1])
    (folder / "001.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    factory = MockFactory()
    relay = Relay(17, unlock_s=0.3, pin_factory=factory)
    audit = AuditLog(config.storage.database)
    lock = DoorLock(config, recognizer, db, audit, relay, FolderSource(folder), clock=Clock())
    with events() as lines:
        assert lock.step() is None  # obama3: one vote
        assert lock.step() is None and "bad_frame" in lines[-1]

        video = tmp_path / "video0.avi"
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
        writer.write(np.zeros((480, 640, 3), np.uint8))
        writer.release()
        lock.source = Reconnecting(lambda: CaptureSource(str(video), live=True), "video0", sleep=lambda s: None)
        assert lock.step() is None  # the one frame (no face)
        saved = video.read_bytes()
        video.unlink()
        for _ in range(3):
            assert lock.step() is None
        assert sum("camera_lost" in line for line in lines) == 1 and lock.camera_down
        video.write_bytes(saved)
        lock.step()
        assert "camera_back" in lines[-1] and not lock.camera_down
    assert factory.pin(17).state is False
    relay.close()
    db.close()


def test_a_failing_snapshot_keeps_the_audit_row_and_the_door(tmp_path: Path, data_dir: Path,
                                                             recognizer: Recognizer) -> None:
    """Failure report: when the refused attempt's JPEG could not be written (here: the snapshot folder replaced
    by a file, as on a pulled USB stick) the audit row was lost with it. Now the row is stored with no snapshot,
    the failure is logged as snapshot_failed, and the next frames are still read."""
    config = make_config(tmp_path)
    db = FaceDB(config.storage.database)
    enroll_all(db, recognizer, data_dir)
    folder = attempt_folder(tmp_path, data_dir, "strangers", STRANGERS * 2)
    factory = MockFactory()
    relay = Relay(17, unlock_s=0.3, pin_factory=factory)
    audit = AuditLog(config.storage.database, config.storage.snapshots)
    config.storage.snapshots.rmdir()
    config.storage.snapshots.write_text("not a folder any more")
    lock = DoorLock(config, recognizer, db, audit, relay, FolderSource(folder), clock=Clock())
    with events() as lines:
        decisions = [d for d in (lock.step() for _ in range(len(STRANGERS) * 2)) if d is not None]
    assert decisions and all(d.action != "unlock" for d in decisions)
    assert sum("snapshot_failed" in line for line in lines) == len(decisions), lines
    assert not any("audit_failed" in line for line in lines)
    rows = audit.recent()
    assert [r.action for r in rows] == [d.action for d in reversed(decisions)]
    assert all(r.snapshot is None for r in rows) and factory.pin(17).state is False
    relay.close()
    db.close()


class _Capture(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def events() -> Iterator[list[str]]:
    """The names of the door lock's log events while the block runs (at INFO, whatever the level was)."""
    lines: list[str] = []
    handler, logger = _Capture(lines), logging.getLogger("doorlock")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_enroll_from_camera(tmp_path: Path, data_dir: Path) -> None:
    """`doorlock enroll --camera` with a recorded video of one person as the camera.

    Frames: obama.jpg, obama2.jpg and a lower-resolution copy of the first (obama-480p.jpg). obama3.jpg is
    not used: letterboxed to 640x480 its face is under the 80 px minimum, so it is no usable frame.
    """
    video = tmp_path / "obama.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for path in scenes(data_dir, ["obama.jpg", "obama2.jpg", "obama-480p.jpg"]):
        writer.write(letterbox(cv2.imread(str(path))))
    writer.release()
    config = tmp_path / "lock.toml"
    config.write_text(f'[model]\nbundle = "{BUNDLE}"\n[storage]\ndatabase = "lock.db"\n')
    env = {"DOORLOCK_CONFIG": str(config)}
    result = run_cli("-m", "device.doorlock", "enroll", "Barack Obama", "--camera", str(video), "--count", "3",
                     "--interval", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert "3 face(s) enrolled" in result.stdout
    short = run_cli("-m", "device.doorlock", "enroll", "Someone", "--camera", str(video), "--count", "5",
                    "--interval", "0", env=env)
    assert short.returncode == 2 and "ended after 3 usable photo(s)" in short.stderr


def test_enroll_from_camera_skips_someone_else_walking_by(tmp_path: Path, data_dir: Path) -> None:
    """A stranger's face between the resident's frames is not enrolled under the resident's name.

    The resident's frames are obama.jpg, obama2.jpg and obama-480p.jpg (a downscaled copy of obama.jpg)."""
    video = tmp_path / "door.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for path in scenes(data_dir, ["obama.jpg", "alex-lacamoire.png", "obama2.jpg", "obama-480p.jpg"]):
        writer.write(letterbox(cv2.imread(str(path))))
    writer.release()
    config = tmp_path / "lock.toml"
    config.write_text(f'[model]\nbundle = "{BUNDLE}"\n[storage]\ndatabase = "lock.db"\n')
    result = run_cli("-m", "device.doorlock", "enroll", "Barack Obama", "--camera", str(video), "--count", "3",
                     "--interval", "0", env={"DOORLOCK_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("skipped a frame: a different face") == 1 and "3 face(s) enrolled" in result.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_service_stops_cleanly_on_sigterm_with_the_relay_locked(tmp_path: Path, data_dir: Path,
                                                                signum: signal.Signals) -> None:
    """`doorlock run` on a replayed folder of strangers: SIGTERM ends it with exit 0, logged, relay locked.

    Failure report for SIGHUP (a closed ssh terminal, `kill -HUP`): it killed Python without the graceful stop.
    Independent of how well the embedder recognises people (Obama is enrolled, only strangers come).
    """
    folder = attempt_folder(tmp_path, data_dir, "door", STRANGERS)
    config = tmp_path / "lock.toml"
    config.write_text(f'[camera]\nsource = "{folder}"\nloop = true\n[model]\nbundle = "{BUNDLE}"\nthreads = 1\n'
                      f'[relay]\nmock = true\n[storage]\ndatabase = "lock.db"\n')
    env = {"DOORLOCK_CONFIG": str(config)}
    enrolled = run_cli("-m", "device.doorlock", "enroll", "Barack Obama",
                       *map(str, scenes(data_dir, ENROLL["Barack Obama"])), env=env)
    assert enrolled.returncode == 0, enrolled.stderr
    events = run_until_first_decision(env, signum)
    assert [e["event"] for e in events][-2:] == ["stopping", "stopped"]
    assert events[-2]["signal"] == signum.name and events[-1]["relay"] == "locked"
    decisions = [e for e in events if e["event"] == "decision"]
    assert decisions and all(d["action"] != "unlock" and d["distance"] < 10 for d in decisions)


class NoisyStill(FrameSource):
    """A camera filming a printed photo on a stand: the same 640x480 picture plus sensor noise (sigma 1)."""

    name = "printed photo"

    def __init__(self, picture: np.ndarray, seed: int = 7) -> None:
        self.picture = picture.astype(np.float64)
        self.rng = np.random.default_rng(seed)

    def read(self) -> np.ndarray:
        return np.clip(self.picture + self.rng.normal(0, 1.0, self.picture.shape), 0, 255).astype(np.uint8)


def test_printed_photo_of_a_resident_does_not_open_the_door(tmp_path: Path, data_dir: Path,
                                                            recognizer: Recognizer) -> None:
    """Failure report: the enrolled obama.jpg on a stand in front of the camera (1 grey level of sensor noise)
    unlocked the door with the default config: Haar box jitter made the crops differ by ~12.7 > min_motion 1.0."""
    config = make_config(tmp_path, decision={"votes_needed": 3, "window": 5})
    db = FaceDB(config.storage.database)
    enroll_all(db, recognizer, data_dir)
    factory = MockFactory()
    relay = Relay(17, unlock_s=0.3, pin_factory=factory)
    audit = AuditLog(config.storage.database)
    picture = letterbox(cv2.imread(str(scenes(data_dir, ["obama.jpg"])[0])))
    lock = DoorLock(config, recognizer, db, audit, relay, NoisyStill(picture), clock=Clock())
    decisions = [d for d in (lock.step() for _ in range(5)) if d is not None]
    assert [(d.action, d.person) for d in decisions] == [("not_live", "Barack Obama")]
    assert decisions[0].motion < config.liveness.min_motion
    assert [s.state for s in factory.pin(17).states] == [False]  # never energised
    relay.close()
    db.close()


class ScriptedSource(FrameSource):
    """Given frames, one per read, then the end of the stream."""

    name = "scripted"

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames = list(frames)

    def read(self) -> np.ndarray:
        if not self.frames:
            raise EndOfStream("no more frames")
        return self.frames.pop(0)


def test_removing_the_last_person_during_an_attempt(tmp_path: Path, data_dir: Path, recognizer: Recognizer) -> None:
    """Failure report: `doorlock remove` of the last resident while a stranger stood at the door: the votes scored
    against the old gallery (with scores) met the empty gallery's (without) and max() raised TypeError."""
    config = make_config(tmp_path, decision={"votes_needed": 3, "window": 5})
    db = FaceDB(config.storage.database)
    added, _ = enroll_images(db, recognizer, "Barack Obama", scenes(data_dir, ENROLL["Barack Obama"]))
    assert added == 2
    strangers = [letterbox(cv2.imread(str(p))) for p in scenes(data_dir, STRANGERS[:2])] * 4
    factory = MockFactory()
    relay = Relay(17, unlock_s=0.3, pin_factory=factory)
    lock = DoorLock(config, recognizer, db, AuditLog(config.storage.database), relay, ScriptedSource(strangers),
                    clock=Clock())
    assert [lock.step(), lock.step()] == [None, None]  # two votes against the gallery with Obama
    other = FaceDB(config.storage.database)  # `doorlock remove "Barack Obama"` at the console
    other.remove("Barack Obama")
    other.close()
    lock.check_gallery()  # what run() does every GALLERY_CHECK_S
    assert len(lock.gallery) == 0
    decisions = [d for d in (lock.step() for _ in range(5)) if d is not None]
    assert [(d.action, d.frames) for d in decisions] == [("deny", 5)]  # a fresh attempt of 5 frames, no crash
    relay.close()
    db.close()


def test_recognition_continues_after_a_resolution_change(tmp_path: Path, data_dir: Path,
                                                         recognizer: Recognizer) -> None:
    """Failure report: a camera that came back at a smaller resolution left the tracked face box outside the new
    frames; every frame then failed as bad_frame until the service was restarted.

    The frames are the enrolled obama.jpg (a wide copy with a border, then a 640x480 copy), so a match is certain:
    this tests tracking, not recognition."""
    config = make_config(tmp_path)
    db = FaceDB(config.storage.database)
    enroll_all(db, recognizer, data_dir)
    photo = cv2.imread(str(scenes(data_dir, ["obama.jpg"])[0]))
    wide = cv2.copyMakeBorder(photo, 0, 0, 600, 0, cv2.BORDER_CONSTANT)  # face in the right part, 1737 px wide
    small = letterbox(photo)
    factory = MockFactory()
    relay = Relay(17, unlock_s=0.3, pin_factory=factory)
    lock = DoorLock(config, recognizer, db, AuditLog(config.storage.database), relay,
                    ScriptedSource([wide] + [small] * 3), clock=Clock())
    with events() as lines:
        decisions = [d for d in (lock.step() for _ in range(4)) if d is not None]
    assert not any("bad_frame" in line for line in lines), lines
    # Two attempts (2 of 3 votes each): the second one only from frames after the change. Copies of one photo: not live.
    assert [(d.action, d.person) for d in decisions] == [("not_live", "Barack Obama")] * 2
    relay.close()
    db.close()


def test_a_locked_database_keeps_the_old_gallery_and_the_door(tmp_path: Path, data_dir: Path,
                                                              recognizer: Recognizer) -> None:
    """Failure report: an admin's sqlite3 shell (or a backup) holding the database longer than SQLite's 5 s timeout
    made the gallery check raise OperationalError out of run(): the service died. Now the check is logged and
    the old gallery kept; a decision taken meanwhile is logged as audit_failed and still stands."""
    config = make_config(tmp_path)
    db = FaceDB(config.storage.database)
    enroll_all(db, recognizer, data_dir)
    relay = Relay(17, unlock_s=0.3, pin_factory=MockFactory())
    strangers = [letterbox(cv2.imread(str(p))) for p in scenes(data_dir, STRANGERS)]
    lock = DoorLock(config, recognizer, db, AuditLog(config.storage.database), relay, ScriptedSource(strangers),
                    clock=Clock())
    other = sqlite3.connect(str(config.storage.database), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with events() as lines:
            lock.check_gallery()
            decisions = [d for d in (lock.step() for _ in strangers) if d is not None]
    finally:
        other.execute("COMMIT")
        other.close()
    assert lines == ["gallery_check_failed", "audit_failed", "decision"]
    assert lock.gallery.people == ["Barack Obama", "Joe Biden"] and [d.action for d in decisions] == ["deny"]
    relay.close()
    db.close()


def test_a_stranger_who_walks_away_is_audited(tmp_path: Path, data_dir: Path, recognizer: Recognizer) -> None:
    """Failure report: a stranger seen for fewer frames than the window who then stepped out of view left no
    trace: after idle_reset_s the votes were silently dropped, no audit row, no count towards the lockout."""
    config = make_config(tmp_path, decision={"votes_needed": 3, "window": 5, "max_attempts": 1})
    db = FaceDB(config.storage.database)
    enroll_all(db, recognizer, data_dir)
    stranger = letterbox(cv2.imread(str(scenes(data_dir, ["alex-lacamoire.png"])[0])))
    empty_street = np.full_like(stranger, 90)
    audit = AuditLog(config.storage.database, config.storage.snapshots)
    relay = Relay(17, unlock_s=0.3, pin_factory=MockFactory())
    clock = Clock()  # 0.1 s per frame: 25 frames without a face are 2.5 s > idle_reset_s 2.0
    lock = DoorLock(config, recognizer, db, audit, relay, ScriptedSource([stranger] * 3 + [empty_street] * 25),
                    clock=clock)
    decisions = [d for d in (lock.step() for _ in range(28)) if d is not None]
    assert [(d.action, d.frames) for d in decisions] == [("abandoned", 3)]
    (row,) = audit.recent()
    assert row.action == "abandoned" and "face left after 3 frame(s)" in row.reason and row.snapshot is None
    assert lock.decider.blocked(clock.now) == "lockout"  # max_attempts = 1: the abandoned attempt counted
    relay.close()
    db.close()


def test_the_frame_that_ends_an_abandoned_attempt_still_counts(tmp_path: Path, data_dir: Path,
                                                             recognizer: Recognizer) -> None:
    """Review finding: the frame on which an earlier attempt was found abandoned was thrown away, so a resident
    coming back was let in a frame late (and a one-frame arrival was lost). Liveness off: copies of the
    enrolment photo, as in the other mechanics tests."""
    config = make_config(tmp_path, liveness={"enabled": False})
    db = FaceDB(config.storage.database)
    enroll_all(db, recognizer, data_dir)
    resident = letterbox(cv2.imread(str(scenes(data_dir, [MECHANICS_ATTEMPT[0]])[0])))
    relay = Relay(17, unlock_s=0.3, pin_factory=MockFactory())
    clock = Clock()
    lock = DoorLock(config, recognizer, db, AuditLog(config.storage.database), relay,
                    ScriptedSource([resident] * 3), clock=clock)
    first = lock.step()
    clock.now += 3.0  # no frame for 3 s (> idle_reset_s 2.0): the camera stalled, or the resident stepped away
    actions = [first] + [lock.step(), lock.step()]
    # the returning frame ends the one-frame attempt (abandoned, not counted: 1 < votes_needed) and starts the
    # next one, which the following frame completes: votes_needed is 2
    assert [None if d is None else d.action for d in actions] == [None, "abandoned", "unlock"]
    assert relay.unlocked
    relay.close()
    db.close()


def test_the_looser_bundle_threshold_is_logged_as_a_warning(tmp_path: Path, data_dir: Path,
                                                            recognizer: Recognizer) -> None:
    """far_0.1pct is allowed (it admitted 7.8% of strangers per attempt in the README's test), but never silently."""
    config = make_config(tmp_path, decision={"threshold": "far_0.1pct"})
    db = FaceDB(config.storage.database)
    enroll_all(db, recognizer, data_dir)
    relay = Relay(17, unlock_s=0.3, pin_factory=MockFactory())
    lock = DoorLock(config, recognizer, db, AuditLog(config.storage.database), relay, ScriptedSource([]),
                    clock=Clock())
    with events() as lines:
        lock.run()  # ends at once: the source has no frames
    assert "threshold_loose" in lines
    relay.close()
    db.close()
