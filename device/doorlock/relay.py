"""The lock relay through gpiozero, fail-secure: locked at start, after every unlock, and on every exit.

"Locked" is the relay's inactive state. The relock is a timer thread, so the door locks again on
time even if the main loop is stuck waiting on a camera; an unlock time the timer cannot wait is refused
before the relay is switched on. `close()` (also run by the context manager, after the service's stop on
SIGTERM, SIGINT or SIGHUP, and by atexit) drives the pin to the locked level before
releasing it; the systemd unit additionally runs `doorlock relock` after the service stops for any
reason, including a crash or SIGKILL where no Python code runs. Wire the lock so that an
unpowered relay means locked (see README), then a dead Pi or a power cut is also locked.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

from gpiozero import BadPinFactory, OutputDevice, PinFactoryFallback


class RelayError(Exception):
    """The GPIO pin cannot be opened (wrong number, in use, no GPIO on this machine)."""


class Relay:
    """One relay on a GPIO pin: `unlock()` energises it for `unlock_s` seconds, then it relocks itself."""

    def __init__(self, pin: int | str, active_high: bool = True, unlock_s: float = 3.0,
                 pin_factory: Any = None):
        self.unlock_s = unlock_s
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        try:
            with warnings.catch_warnings():  # one clear error below instead of a warning per library tried
                warnings.simplefilter("ignore", PinFactoryFallback)
                self._device = OutputDevice(pin, active_high=active_high, initial_value=False,
                                            pin_factory=pin_factory)
        except Exception as exc:  # gpiozero raises many types: PinInvalidPin, BadPinFactory, GPIOPinInUse…
            hint = ("; no GPIO library found: on Raspberry Pi OS `sudo apt install python3-lgpio` (venv with "
                    "--system-site-packages), or set [relay] mock = true for a dry run"
                    if isinstance(exc, BadPinFactory) else "")
            raise RelayError(f"cannot open relay pin {pin!r}: {type(exc).__name__}: {exc}{hint}") from exc

    @property
    def unlocked(self) -> bool:
        """True while the relay is energised (door unlocked)."""
        return bool(self._device.value)

    def unlock(self, seconds: float | None = None) -> None:
        """Energise the relay; relock after `seconds` (default `unlock_s`). A second unlock extends the time.

        Fail-secure: a time the relock timer cannot wait (inf overflows inside the timer thread, after the relay
        is on; nan relocks at once) is refused before the relay is touched, and if the timer cannot be started
        (no thread to be had) the relay is locked again at once and the error raised.
        """
        delay = self.unlock_s if seconds is None else seconds
        if not (math.isfinite(delay) and 0 < delay <= threading.TIMEOUT_MAX):
            raise ValueError(f"unlock time {delay} s must be a finite number of seconds > 0")
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._device.on()
            try:
                self._timer = threading.Timer(delay, self.lock)
                self._timer.daemon = True
                self._timer.start()
            except BaseException:
                self._timer = None
                self._device.off()
                raise

    def lock(self) -> None:
        """De-energise the relay now."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._device.closed:
                self._device.off()

    def close(self) -> None:
        """Lock, then release the pin. Safe to call more than once."""
        self.lock()
        self._device.close()

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mock_factory() -> Any:
    """gpiozero's own mock pins: a dry run of the lock on a machine without GPIO (and the tests)."""
    from gpiozero.pins.mock import MockFactory

    return MockFactory()
