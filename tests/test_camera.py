"""Camera sources (device/camera.py) without camera hardware.

No camera is attached to the build machines, so live capture is exercised through the same OpenCV
`VideoCapture` path on a video file recorded here from the real scene photos, and picamera2 only
through its absence (it imports on Raspberry Pi OS only). "Camera loss" is a capture that stops
delivering frames or whose device file disappears, which is what OpenCV reports for an unplugged
USB camera or a dropped stream.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.camera import (CameraError, CaptureSource, EndOfStream, FrameError, Reconnecting, open_source,
                           to_bgr)


def scene_frames(data_dir: Path, count: int = 6) -> list[np.ndarray]:
    """Real photos letterboxed to 640x480 BGR: the frames a 640x480 camera would give."""
    frames = []
    for path in sorted((data_dir / "faces" / "scenes").glob("*.jpg"))[:count]:
        image = cv2.imread(str(path))
        scale = min(640 / image.shape[1], 480 / image.shape[0])
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        frame = np.zeros((480, 640, 3), np.uint8)
        frame[:small.shape[0], :small.shape[1]] = small
        frames.append(frame)
    return frames


@pytest.fixture()
def video(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "door.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for frame in scene_frames(data_dir):
        writer.write(frame)
    writer.release()
    return path


def test_video_file_gives_bgr_frames_then_ends(video: Path, data_dir: Path) -> None:
    expected = scene_frames(data_dir)
    with open_source(str(video)) as source:
        frames = list(source)
    assert len(frames) == len(expected)
    assert all(f.shape == (480, 640, 3) and f.dtype == np.uint8 for f in frames)
    # MJPG is lossy, but the colour order must be preserved: channel means match the BGR originals.
    for got, want in zip(frames, expected):
        assert np.abs(got.reshape(-1, 3).mean(0) - want.reshape(-1, 3).mean(0)).max() < 3


def test_video_file_loops_when_asked(video: Path) -> None:
    with open_source(str(video), loop=True) as source:
        frames = [source.read() for _ in range(15)]
    assert len(frames) == 15


def test_image_folder_skips_corrupt_file_and_converts_grey(tmp_path: Path, data_dir: Path) -> None:
    frames = scene_frames(data_dir, 2)
    cv2.imwrite(str(tmp_path / "a.png"), frames[0])
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg at all")
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(frames[1], cv2.COLOR_BGR2GRAY))
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_source(str(tmp_path))
    assert np.array_equal(source.read(), frames[0])
    with pytest.raises(FrameError, match="b.jpg"):
        source.read()
    grey = source.read()
    assert grey.shape == (480, 640, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    with pytest.raises(EndOfStream):
        source.read()
    assert len(list(open_source(str(tmp_path)))) == 2  # iteration skips the bad file


def test_single_image(data_dir: Path) -> None:
    path = data_dir / "faces" / "scenes" / "obama.jpg"
    with open_source(str(path)) as source:
        frame = source.read()
        with pytest.raises(EndOfStream):
            source.read()
    assert np.array_equal(frame, cv2.imread(str(path)))


@pytest.mark.parametrize("spec, message", [
    ("", "empty camera spec"),
    ("/no/such/place.mp4", "no such file"),
    ("picamera2:x", "picamera2:N"),
])
def test_bad_specs_raise_camera_error(spec: str, message: str) -> None:
    with pytest.raises(CameraError, match=message):
        open_source(spec)


def test_empty_folder_and_non_video_file(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="no image files"):
        open_source(str(tmp_path))
    junk = tmp_path / "clip.mp4"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CameraError, match="cannot open"):
        open_source(str(junk))


@pytest.mark.skipif(importlib.util.find_spec("picamera2") is not None, reason="picamera2 present (a Pi)")
def test_picamera2_missing_is_a_clear_error() -> None:
    with pytest.raises(CameraError, match="python3-picamera2"):
        open_source("picamera2")


def test_bad_frames_raise_frame_error() -> None:
    with pytest.raises(FrameError):
        to_bgr(None)
    with pytest.raises(FrameError):
        to_bgr(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(FrameError):
        to_bgr(np.zeros((4, 4, 3), np.float32))
    assert to_bgr(np.full((4, 4), 7, np.uint8)).shape == (4, 4, 3)
    assert to_bgr(np.full((4, 4, 4), 7, np.uint8)).shape == (4, 4, 3)
    assert to_bgr(np.full((4, 4, 3), 0xFF00, np.uint16)).max() == 0xFF


def test_lost_camera_reconnects_with_back_off(video: Path, tmp_path: Path) -> None:
    """A capture opened as a live camera stops at the end of the recording, like an unplugged camera;
    while its device file is gone reopening fails; when it is back the source delivers frames again."""
    device = tmp_path / "video0.avi"
    shutil.copy(video, device)
    delays: list[float] = []
    source = Reconnecting(lambda: CaptureSource(str(device), live=True), "video0", sleep=delays.append)
    frames = 0
    while True:
        try:
            source.read()
            frames += 1
        except CameraError:
            break
    assert frames == 6
    device.unlink()  # the camera is gone
    for _ in range(4):
        with pytest.raises(CameraError, match="cannot open"):
            source.read()
    assert delays == [0.5, 1.0, 2.0, 4.0]  # exponential back-off between attempts
    shutil.copy(video, device)  # plugged back in
    assert source.read().shape == (480, 640, 3)
    assert delays[-1] == 8.0 and source.reconnects == 1
    source.read()
    assert len(delays) == 5  # no waiting while frames flow
    source.close()


class _Paced:
    """The recorded capture with a camera's timing: `queued` frames are waiting in the driver's queue
    (a grab returns at once), after that each grab waits for the next exposure, like a live camera."""

    def __init__(self, capture: cv2.VideoCapture, queued: int, frame_s: float = 0.3):
        self.capture, self.queued, self.frame_s = capture, queued, frame_s

    def grab(self) -> bool:
        if self.queued > 0:
            self.queued -= 1
        else:
            time.sleep(self.frame_s)
        return self.capture.grab()

    def retrieve(self):
        return self.capture.retrieve()

    def get(self, prop: int) -> float:
        return self.capture.get(prop)  # the recording's 10 fps: a grab over 50 ms waited for the camera

    def read(self):
        return self.capture.read()

    def release(self) -> None:
        self.capture.release()


def _closest(frame: np.ndarray, expected: list[np.ndarray]) -> int:
    return int(np.argmin([np.abs(frame.astype(int) - e.astype(int)).mean() for e in expected]))


def test_read_latest_skips_frames_queued_since_the_last_read(video: Path, data_dir: Path) -> None:
    """A meter read once a minute must see the meter now: queued frames are dropped, the fresh one returned."""
    expected = scene_frames(data_dir)
    source = CaptureSource(str(video), live=True)
    source._cap = _Paced(source._cap, queued=2)
    assert _closest(source.read_latest(), expected) == 2  # frames 0 and 1 were stale
    assert _closest(source.read(), expected) == 3  # plain reads are unchanged
    source._cap.queued = 10  # more queued than we are willing to drain: stop after max_queued
    assert _closest(source.read_latest(max_queued=1), expected) == 4
    source.close()
    with open_source(str(video)) as recording:  # a recording is not live: nothing is skipped
        assert _closest(recording.read_latest(), expected) == 0


def test_reconnecting_source_passes_read_latest_through(video: Path, data_dir: Path) -> None:
    """The meter service reads through `Reconnecting`; its read_latest must reach the capture's."""
    expected = scene_frames(data_dir)

    def opener() -> CaptureSource:
        source = CaptureSource(str(video), live=True)
        source._cap = _Paced(source._cap, queued=3)
        return source

    live = Reconnecting(opener, "video0", sleep=lambda s: None)
    assert _closest(live.read_latest(), expected) == 3
    live.close()
