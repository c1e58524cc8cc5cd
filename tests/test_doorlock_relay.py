"""The lock relay (device/doorlock/relay.py) on gpiozero's own MockFactory pins, observed over time.

No relay hardware here: gpiozero's MockFactory records every level change of the pin with a
timestamp, which is what a logic analyser on the GPIO would show.
"""

from __future__ import annotations

import time

import pytest
from gpiozero.pins.mock import MockFactory

from device.doorlock.relay import Relay, RelayError


def levels(pin) -> list[bool]:
    return [s.state for s in pin.states]


@pytest.mark.parametrize("active_high", [True, False])
def test_unlock_energises_for_the_configured_time_then_relocks(active_high: bool) -> None:
    factory = MockFactory()
    relay = Relay(17, active_high=active_high, unlock_s=0.3, pin_factory=factory)
    pin = factory.pin(17)
    locked_level, open_level = (not active_high), active_high
    assert pin.state == locked_level and not relay.unlocked  # locked from the start
    start = time.monotonic()
    relay.unlock()
    assert pin.state == open_level and relay.unlocked
    time.sleep(0.15)
    assert pin.state == open_level
    while relay.unlocked and time.monotonic() - start < 2:
        time.sleep(0.01)
    assert pin.state == locked_level
    assert levels(pin)[-3:] == [locked_level, open_level, locked_level]
    on, off = pin.states[-2].timestamp, pin.states[-1].timestamp
    assert 0.28 <= off - on <= 0.6
    relay.close()


def test_second_unlock_extends_and_lock_is_immediate() -> None:
    factory = MockFactory()
    relay = Relay(5, unlock_s=0.25, pin_factory=factory)
    pin = factory.pin(5)
    relay.unlock()
    time.sleep(0.15)
    relay.unlock()  # someone else recognised while the door is open: keep it open
    time.sleep(0.15)
    assert pin.state is True  # 0.3 s after the first unlock, still open thanks to the second
    relay.lock()
    assert pin.state is False
    time.sleep(0.2)
    assert levels(pin)[1:] == [True, False]  # the cancelled timer did not toggle anything later
    relay.close()


def test_fail_secure_on_exception_and_close() -> None:
    factory = MockFactory()
    pin = factory.pin(22)
    with pytest.raises(RuntimeError):
        with Relay(22, active_high=False, unlock_s=60, pin_factory=factory) as relay:
            relay.unlock()
            assert pin.state is False  # active-low: energised
            raise RuntimeError("crash in the main loop")
    assert pin.states[-1].state is True  # driven back to the locked level before release
    relay.close()  # closing twice is harmless


def test_bad_pin_is_a_clear_error() -> None:
    with pytest.raises(RelayError, match="cannot open relay pin"):
        Relay("GPIO99", pin_factory=MockFactory())


@pytest.mark.parametrize("seconds", [float("inf"), float("nan"), -1.0])
def test_impossible_unlock_time_never_energises_the_relay(seconds: float) -> None:
    """Failure report: unlock_s = inf switched the relay on, then threading.Timer raised OverflowError in its own
    thread, so the relock never came and the door stayed open."""
    factory = MockFactory()
    relay = Relay(17, unlock_s=seconds, pin_factory=factory)
    with pytest.raises(ValueError, match="unlock time"):
        relay.unlock()
    time.sleep(0.1)
    assert levels(factory.pin(17)) == [False] and not relay.unlocked
    relay.close()


def test_relock_that_cannot_be_scheduled_locks_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail-secure: when the relock timer cannot start (no thread to be had), the relay is locked again at once."""
    factory = MockFactory()
    relay = Relay(17, unlock_s=0.3, pin_factory=factory)

    def no_thread(self) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr("threading.Timer.start", no_thread)
    with pytest.raises(RuntimeError, match="new thread"):
        relay.unlock()
    assert levels(factory.pin(17)) == [False, True, False] and not relay.unlocked
    relay.close()
