"""Camera sources behind one small interface: `open_source(spec)` returns a `FrameSource`.

Every source returns frames as **BGR, uint8, shape (H, W, 3)** (OpenCV's order), whatever the
hardware gives, so detectors and models downstream never guess the colour order. A frame that
cannot be used raises `FrameError` (skip it and read again); a camera that cannot be opened or
has gone away raises `CameraError`; a finite source that is exhausted raises `EndOfStream`.
Live cameras (picamera2, USB/V4L2, RTSP/HTTP) are wrapped in `Reconnecting`, which reopens them
with exponential back-off, so a long-running service survives an unplugged cable or a network
camera that reboots instead of crashing.

Spec strings accepted by `open_source`:

- ``picamera2`` or ``picamera2:N`` — Raspberry Pi camera N through picamera2 (imported only here:
  it exists only on Raspberry Pi OS, installed with apt, not pip);
- ``0``, ``1``, … or ``/dev/videoN`` — USB/V4L2 camera through OpenCV;
- ``rtsp://…``, ``rtsps://…``, ``http(s)://…``, ``rtmp://…`` — network stream through OpenCV;
- a folder — every image in it, in name order;
- an image file — that one image;
- any other file — a recorded video, through OpenCV.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from device.images import ImageError, check_image, load_image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"})
URL_PREFIXES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")


class CameraError(Exception):
    """A camera cannot be opened, or it stopped delivering frames (unplugged, stream dropped)."""


class EndOfStream(CameraError):
    """A finite source (video file, image folder, single image) has no more frames."""


class FrameError(Exception):
    """One frame is unusable (empty, wrong type, corrupt file). The source itself is still fine."""


def to_bgr(frame: object, name: str = "frame") -> np.ndarray:
    """Bring any decoded frame to BGR uint8 (H, W, 3), or raise `FrameError` saying what is wrong."""
    if frame is None:
        raise FrameError(f"{name}: no image data")
    try:
        image = check_image(frame, name)  # type: ignore[arg-type]
    except ImageError as exc:
        raise FrameError(str(exc)) from exc
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(image)


class FrameSource:
    """Base of every source: `read()` one BGR frame, `close()` once; usable as a context manager."""

    name: str = "source"

    def read(self) -> np.ndarray:
        """The next frame, BGR uint8 (H, W, 3)."""
        raise NotImplementedError

    def read_latest(self) -> np.ndarray:
        """A frame from now rather than the next one queued: for callers that read seldom (a meter read
        once a minute). Sources without a queue (folders, files, picamera2's 2 buffers) just `read()`."""
        return self.read()

    def close(self) -> None:
        """Release the device or file. Safe to call twice."""

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self):
        """Frames until the source ends; bad frames are skipped, so a folder with one corrupt file still plays."""
        while True:
            try:
                yield self.read()
            except FrameError:
                continue
            except EndOfStream:
                return


class CaptureSource(FrameSource):
    """OpenCV `VideoCapture`: USB/V4L2 cameras, network streams and video files."""

    def __init__(self, target: int | str, size: tuple[int, int] | None = None, live: bool = True):
        self.name = str(target)
        self.live = live
        if isinstance(target, str) and target.startswith("/dev/video"):
            self._cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
        else:
            self._cap = cv2.VideoCapture(target)
        if not self._cap.isOpened():
            self._cap.release()
            raise CameraError(f"{self.name}: cannot open (no such camera, stream unreachable, or not a video)")
        if size and live:
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, size[0])
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, size[1])
        if live:
            # Keep latency low: a door lock must judge the face in front of it now, not seconds ago.
            self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def read(self) -> np.ndarray:
        ok, frame = self._cap.read()
        if not ok:
            if self.live:
                raise CameraError(f"{self.name}: stopped delivering frames")
            raise EndOfStream(f"{self.name}: end of video")
        return to_bgr(frame, self.name)

    def read_latest(self, max_queued: int = 150) -> np.ndarray:
        """Skip the frames the driver or an RTSP demuxer queued since the last read, then read.

        Queued frames come back from `grab()` faster than the camera makes them (decoding included); the
        first grab that takes at least half a frame period had to wait for the camera: a frame taken now.
        BUFFERSIZE=1 already keeps V4L2's queue short, but FFmpeg's network streams ignore it, and a meter
        read once a minute would otherwise report the past. At most `max_queued` frames are dropped.
        """
        if not self.live:
            return self.read()
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        fresh_after_s = 0.5 / (fps if 1.0 <= fps <= 240.0 else 30.0)
        for _ in range(max_queued):
            started = time.monotonic()
            if not self._cap.grab():
                raise CameraError(f"{self.name}: stopped delivering frames")
            if time.monotonic() - started >= fresh_after_s:
                break
        ok, frame = self._cap.retrieve()
        if not ok:
            raise CameraError(f"{self.name}: stopped delivering frames")
        return to_bgr(frame, self.name)

    def close(self) -> None:
        self._cap.release()


class FolderSource(FrameSource):
    """Every image file of a folder in name order — a recorded sequence or a test set."""

    def __init__(self, folder: Path, loop: bool = False):
        self.name = str(folder)
        self.loop = loop
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise CameraError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._next = 0

    def read(self) -> np.ndarray:
        if self._next >= len(self.paths):
            if not self.loop:
                raise EndOfStream(f"{self.name}: all {len(self.paths)} images read")
            self._next = 0
        path = self.paths[self._next]
        self._next += 1
        try:
            return to_bgr(load_image(path), str(path))
        except ImageError as exc:
            raise FrameError(str(exc)) from exc


class ImageSource(FolderSource):
    """One image file: one frame (or the same frame forever with `loop=True`)."""

    def __init__(self, path: Path, loop: bool = False):
        self.name = str(path)
        self.loop = loop
        self.paths = [path]
        self._next = 0


class Picamera2Source(FrameSource):
    """Raspberry Pi camera through picamera2, imported only when asked for.

    picamera2's "RGB888" format is laid out B, G, R in memory (its naming follows libcamera/DRM),
    which is exactly OpenCV's BGR, so frames need no conversion.
    """

    def __init__(self, camera: int = 0, size: tuple[int, int] | None = None):
        self.name = f"picamera2:{camera}"
        try:
            from picamera2 import Picamera2  # only exists on Raspberry Pi OS
        except ImportError as exc:
            raise CameraError(
                "picamera2 is not importable: install it on Raspberry Pi OS with `sudo apt install "
                "python3-picamera2` and create the venv with --system-site-packages") from exc
        try:
            self._cam = Picamera2(camera)
            config = self._cam.create_video_configuration(
                main={"format": "RGB888", "size": tuple(size or (640, 480))}, buffer_count=2)
            self._cam.configure(config)
            self._cam.start()
        except Exception as exc:  # picamera2 raises RuntimeError/IndexError/OSError depending on the fault
            raise CameraError(f"{self.name}: cannot start camera: {exc}") from exc

    def read(self) -> np.ndarray:
        try:
            frame = self._cam.capture_array("main")
        except Exception as exc:
            raise CameraError(f"{self.name}: capture failed: {exc}") from exc
        return to_bgr(frame, self.name)

    def close(self) -> None:
        try:
            self._cam.stop()
            self._cam.close()
        except Exception:  # closing a camera that already vanished must not mask the original error
            pass


class Reconnecting(FrameSource):
    """Reopens a live source with exponential back-off when it fails, instead of giving up.

    `read()` never blocks for longer than one back-off step: if the camera is still gone it raises
    `CameraError`, so the caller (a service loop) can log it, check for shutdown and call again.
    The delay doubles from `initial_delay` up to `max_delay` and resets after a good frame.
    """

    def __init__(self, opener: Callable[[], FrameSource], name: str,
                 initial_delay: float = 0.5, max_delay: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, connect: bool = True):
        self.name = name
        self._opener = opener
        self._initial = initial_delay
        self._max = max_delay
        self._sleep = sleep
        self._delay = 0.0
        self._source: FrameSource | None = None
        self.reconnects = 0
        if connect:  # fail fast at start-up: a wrong spec should be reported, not retried
            self._source = opener()

    def read(self) -> np.ndarray:
        return self._read(latest=False)

    def read_latest(self) -> np.ndarray:
        return self._read(latest=True)

    def _read(self, latest: bool) -> np.ndarray:
        if self._source is None:
            self._sleep(self._delay)
            try:
                self._source = self._opener()
            except CameraError:
                self._delay = min(self._max, self._delay * 2)
                raise
            self.reconnects += 1
        try:
            frame = self._source.read_latest() if latest else self._source.read()
        except CameraError:
            self._drop()
            raise
        self._delay = 0.0
        return frame

    def _drop(self) -> None:
        if self._source is not None:
            self._source.close()
        self._source = None
        self._delay = max(self._initial, self._delay)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None


def open_source(spec: str, size: tuple[int, int] | None = (640, 480), loop: bool = False,
                reconnect: bool = True, sleep: Callable[[float], None] = time.sleep,
                wait_for_camera: bool = False) -> FrameSource:
    """Open a frame source from a spec string (see the module docstring for the forms).

    `size` is the resolution requested from cameras (files keep theirs); `loop` replays finite
    sources; `reconnect` wraps live cameras in `Reconnecting`, which waits with `sleep` (a service
    passes its stop event's `wait` so a shutdown is not delayed by a back-off). A live camera is
    opened at once (a wrong spec fails here) unless `wait_for_camera`: then its first read opens it,
    and a camera that is not there yet (a USB camera enumerating late after a power cut, a network
    camera still booting) raises CameraError from `read` like a lost one, to be retried. Files and
    folders are always opened at once.
    """
    spec = spec.strip()
    if not spec:
        raise CameraError("empty camera spec; use e.g. 'picamera2', '0', '/dev/video0', a URL, a video, a folder or an image")
    opener: Callable[[], FrameSource]
    if spec == "picamera2" or spec.startswith("picamera2:"):
        index = spec.partition(":")[2] or "0"
        if not index.isdigit():
            raise CameraError(f"{spec!r}: expected picamera2 or picamera2:N with N a camera number")
        opener = lambda: Picamera2Source(int(index), size)  # noqa: E731
    elif spec.isdigit():
        opener = lambda: CaptureSource(int(spec), size)  # noqa: E731
    elif spec.startswith("/dev/video") or spec.lower().startswith(URL_PREFIXES):
        opener = lambda: CaptureSource(spec, size)  # noqa: E731
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            return FolderSource(path, loop=loop)
        if not path.is_file():
            raise CameraError(f"{spec}: no such file, folder or camera")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageSource(path, loop=loop)
        return _VideoFile(path, loop)
    return Reconnecting(opener, spec, sleep=sleep, connect=not wait_for_camera) if reconnect else opener()


class _VideoFile(FrameSource):
    """A recorded video, optionally replayed from the start when it ends."""

    def __init__(self, path: Path, loop: bool):
        self.name = str(path)
        self._path = path
        self._loop = loop
        self._capture = CaptureSource(str(path), live=False)

    def read(self) -> np.ndarray:
        try:
            return self._capture.read()
        except EndOfStream:
            if not self._loop:
                raise
            self._capture.close()
            self._capture = CaptureSource(str(self._path), live=False)
            return self._capture.read()

    def close(self) -> None:
        self._capture.close()
