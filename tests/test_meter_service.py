"""The meter service keeps running through what a Pi in a cellar meets: storage trouble, a camera that is
not there yet, a set_value that arrives while a frame is being checked.

Frames are composed from real crops (see test_meter_reader.py); the history is a real SQLite file locked by a
second connection, as a backup job or Home Assistant's SQL sensor would lock it; the missing camera is a V4L2
device node that does not exist on this machine.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from test_meter_reader import compose_meter, model, pick  # noqa: F401 (fixtures)

from device.camera import CameraError, open_source
from device.meter.compose import distort
from device.meter.config import load_config
from device.meter.reader import MeterReader
from device.meter.service import MeterService

LABELS = ("0.0", "4.0", "4.9", "9.5", "9.7")  # reads 4499
NOW = time.time()  # the history keeps a year: older timestamps would be purged on insert
EXTRA = '[history]\ndatabase = "h.sqlite"\n\n[postprocess]\nstate_file = "state.json"\n'


@pytest.fixture()
def service(tmp_path: Path, pick, model) -> tuple[MeterService, object]:  # noqa: F811 (fixtures)
    reference, config_path = compose_meter(tmp_path, pick(LABELS), extra=EXTRA)
    config = load_config(config_path)
    meter = MeterService(config, MeterReader(config, model))
    yield meter, reference
    meter.close()


def test_a_locked_history_database_is_reported_not_fatal(tmp_path: Path, service) -> None:
    meter, reference = service
    assert meter.step(distort(reference, seed=0), timestamp=NOW)[0].status == "initial"
    locker = sqlite3.connect(tmp_path / "h.sqlite", timeout=0)
    locker.execute("BEGIN EXCLUSIVE")  # a backup holds the database
    outcome, _ = meter.step(distort(reference, seed=1), timestamp=NOW + 60)
    state = meter.latest()
    assert (outcome.status, state["value"], state["status"]) == ("ok", 4499.0, "ok")
    assert state["error"].startswith("history:") and "locked" in state["error"]
    locker.rollback()
    locker.close()
    meter.step(distort(reference, seed=2), timestamp=NOW + 120)
    assert [r["status"] for r in meter.history.recent()] == ["ok", "initial"]  # the locked one is lost, logged


def test_a_camera_missing_at_start_is_retried_not_fatal(service) -> None:
    """A USB camera that enumerates after the service starts: every interval records 'no reading' with the
    camera's error, and the service keeps going (before, `meter run` exited at once with code 2)."""
    meter, _ = service
    with pytest.raises(CameraError):  # what one-shot commands still do: fail at once
        open_source("/dev/video97")
    stop = threading.Event()
    seen = []

    def report(outcome, reading) -> None:
        seen.append((outcome.status, outcome.reason, reading))
        if len(seen) == 3:
            stop.set()

    frames = meter.run("/dev/video97", 0.0, stop, report=report)
    assert frames == 0 and len(seen) == 3
    assert all(status == "no reading" and reason.startswith("camera:") and reading is None
               for status, reason, reading in seen)
    assert meter.latest()["status"] == "no reading"
    with pytest.raises(CameraError, match="no such file"):  # a wrong file or folder is still an error at once
        meter.run("/no/such/folder", 0.0, stop)


def test_an_error_inside_a_reading_is_recorded_and_the_loop_goes_on(tmp_path: Path, service, monkeypatch) -> None:
    meter, reference = service
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    for seed in range(3):
        cv2.imwrite(str(frames / f"{seed}.png"), distort(reference, seed=seed))
    calls = []
    real_read = meter.reader.read

    def flaky_read(frame):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated bug")
        return real_read(frame)

    monkeypatch.setattr(meter.reader, "read", flaky_read)
    outcomes = []
    assert meter.run(str(frames), 0.0, report=lambda o, r: outcomes.append(o)) == 3
    assert [o.status for o in outcomes] == ["initial", "no reading", "ok"]
    assert outcomes[1].reason == "internal error: RuntimeError: simulated bug"


def test_set_value_waits_for_the_frame_being_checked(service, monkeypatch) -> None:
    """A value set over MQTT/HTTP while a frame is between its check and its publication must win: the
    frame's older outcome may not overwrite it."""
    meter, reference = service
    meter.step(distort(reference, seed=0), timestamp=NOW)
    checked, release = threading.Event(), threading.Event()
    real_process = meter.post.process

    def slow_process(*args, **kwargs):
        outcome = real_process(*args, **kwargs)
        checked.set()
        release.wait(5)
        return outcome

    monkeypatch.setattr(meter.post, "process", slow_process)
    reader = threading.Thread(target=meter.step, args=(distort(reference, seed=1),), kwargs={"timestamp": NOW + 60})
    reader.start()
    assert checked.wait(5)
    setter = threading.Thread(target=meter.set_value, args=(5000.0,))
    setter.start()
    setter.join(0.3)
    assert setter.is_alive()  # waits for the frame's turn to end
    release.set()
    reader.join(5)
    setter.join(5)
    assert (meter.latest()["value"], meter.latest()["status"]) == (5000.0, "set")
    assert meter.post.prevalue[0] == 5000.0


def test_a_clock_jumping_years_ahead_does_not_purge_the_history(tmp_path: Path, service, monkeypatch) -> None:
    """Purging by age trusted the wall clock: one reading stamped years ahead deleted the whole history."""
    meter, reference = service
    for i in range(3):
        meter.step(distort(reference, seed=i), timestamp=NOW + 60 * i)
    assert meter.history.keep_rows == int(365 * 86400 / 60)  # the readings a year holds at the 60 s interval
    jump = NOW + 5 * 365 * 86400
    monkeypatch.setattr(time, "time", lambda: jump)  # the clock the purge reads
    meter.step(distort(reference, seed=3), timestamp=jump)
    assert len(meter.history.recent()) == 4
    from device.meter.history import History
    from device.meter.postprocess import Outcome

    small = History(tmp_path / "small.sqlite", keep_days=1, keep_rows=2)  # what still goes: beyond the newest rows
    for t in (NOW, NOW + 1, NOW + 2, jump):
        small.add(Outcome(timestamp=t, raw=1.0, value=1.0, accepted=True, status="ok"))
    assert [r["time"] for r in small.recent()] == [jump, NOW + 2]
    small.close()
