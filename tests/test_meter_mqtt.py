"""Outputs of the meter service: MQTT with Home Assistant discovery against a REAL mosquitto broker,
and the HTTP/JSON endpoint with its SQLite history through real requests on localhost.

The broker is the `mosquitto` binary, started by the test on a free localhost port (CI installs it,
see .ci/run); the subscriber is a plain paho-mqtt client, as Home Assistant's would be. Frames are
composed from real crops of one meter (see test_meter_reader.py) and read by the real int8 model.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as paho
import pytest
from test_meter_reader import compose_meter, cover_marks, model, pick  # noqa: F401 (fixtures)

from device.meter.compose import distort
from device.meter.config import ConfigError, load_config
from device.meter.history import History
from device.meter.mqtt import MAX_QUEUED, MeterMqtt, discovery_messages
from device.meter.reader import MeterReader
from device.meter.service import MeterService

LABELS = ("0.0", "4.0", "4.9", "9.5", "9.7")  # reads 4499


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_broker(tmp_path: Path, port: int) -> subprocess.Popen:
    binary = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run installs it)")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"mosquitto did not start: {proc.communicate()[0].decode(errors='replace')}")
    return proc


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[int]:
    port = _free_port()
    proc = _start_broker(tmp_path, port)
    yield port
    proc.terminate()
    proc.wait(timeout=10)


class Subscriber:
    """A paho client that records every message and can wait for one matching a condition."""

    def __init__(self, port: int, *topics: str):
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="test-subscriber")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: [c.subscribe(t, qos=1) for t in topics]
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((message.topic, message.payload))
            self.cond.notify_all()

    def wait(self, topic: str, check=lambda payload: True, timeout: float = 10.0) -> bytes:
        with self.cond:
            found = self.cond.wait_for(lambda: next((p for t, p in self.messages if t == topic and check(p)), None),
                                       timeout)
        assert found is not None, f"no matching message on {topic}; got {[t for t, _ in self.messages]}"
        return found

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _state(value=None, status=None):
    def check(payload: bytes) -> bool:
        state = json.loads(payload)
        return (value is None or state["value"] == pytest.approx(value)) and \
            (status is None or state["status"] == status)
    return check


def test_mqtt_discovery_state_and_set_value_command(tmp_path: Path, broker: int, model, pick) -> None:
    extra = f'[mqtt]\nhost = "127.0.0.1"\nport = {broker}\n\n[postprocess]\nstate_file = "state.json"\n'
    reference, config_path = compose_meter(tmp_path, pick(LABELS), extra=extra)
    config = load_config(config_path)
    sub = Subscriber(broker, "homeassistant/#", "meter/composed/#")
    service = MeterService(config, reader=MeterReader(config, model)).start_outputs()
    try:
        discovery = {e: json.loads(sub.wait(f"homeassistant/{c}/meter_composed/{e}/config"))
                     for c, e in (("sensor", "value"), ("sensor", "rate"), ("sensor", "status"),
                                  ("sensor", "error"), ("number", "fallback"))}
        value = discovery["value"]
        assert (value["device_class"], value["unit_of_measurement"], value["state_class"]) == \
            ("energy", "kWh", "total_increasing")
        assert value["state_topic"] == "meter/composed/state" and value["unique_id"] == "meter_composed_value"
        assert value["default_entity_id"] == "sensor.meter_composed_value" and "object_id" not in value
        assert discovery["fallback"]["command_topic"] == "meter/composed/set_value"
        assert discovery["fallback"]["default_entity_id"] == "number.meter_composed_fallback"
        assert len({d["unique_id"] for d in discovery.values()}) == 5
        assert sub.wait("meter/composed/availability") == b"online"

        service.step(distort(reference, seed=1))
        sub.wait("meter/composed/state", _state(4499.0, "initial"))

        service.step(cover_marks(distort(reference, seed=2)))
        refused = json.loads(sub.wait("meter/composed/state", _state(4499.0, "no reading")))
        assert "reference mark not found" in refused["error"]

        sub.client.publish("meter/composed/set_value", "not a number", qos=1)
        sub.client.publish("meter/composed/set_value", json.dumps({"value": 4500.5}), qos=1)
        sub.wait("meter/composed/state", _state(4500.5, "set"))
        assert service.post.prevalue[0] == 4500.5
        assert json.loads((tmp_path / "state.json").read_text())["value"] == 4500.5
    finally:
        service.close()
    sub.wait("meter/composed/availability", lambda p: p == b"offline")
    sub.close()


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post(url: str, body: bytes, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_endpoint_and_sqlite_history(tmp_path: Path, model, pick) -> None:
    extra = ('[http]\nport = 0\ntoken = "s3cret"\n\n[history]\ndatabase = "history.sqlite"\n\n'
             '[postprocess]\nstate_file = "state.json"\n')
    reference, config_path = compose_meter(tmp_path, pick(LABELS), extra=extra)
    config = load_config(config_path)
    service = MeterService(config, reader=MeterReader(config, model)).start_outputs()
    base = f"http://127.0.0.1:{service.http.port}"
    try:
        service.step(distort(reference, seed=1))
        status, latest = _get(f"{base}/api/value")
        assert status == 200 and (latest["value"], latest["status"], latest["unit"]) == (4499.0, "initial", "kWh")
        assert latest["wheels"] and latest["alignment"] > 0.6 and latest["contrast_stretched"] is False

        assert _post(f"{base}/api/value", b'{"value": 5000}')[0] == 401  # no token
        assert _post(f"{base}/api/value", b'{"valu": 1}', "s3cret")[0] == 400
        status, set_state = _post(f"{base}/api/value", b'{"value": 5000}', "s3cret")
        assert status == 200 and (set_state["value"], set_state["status"]) == (5000.0, "set")

        service.step(distort(reference, seed=2))  # 4499 is now below the value set: rejected, logged
        status, latest = _get(f"{base}/api/value")
        assert (latest["value"], latest["raw"], latest["status"]) == (5000.0, 4499.0, "rejected")
        assert latest["error"].startswith("rejected: negative rate")

        status, history = _get(f"{base}/api/history?limit=10")
        rows = history["readings"]
        assert [r["status"] for r in rows] == ["rejected", "set", "initial"]
        assert rows[0]["reason"].startswith("negative rate") and rows[0]["details"]["wheels"]
        assert [r["status"] for r in _get(f"{base}/api/history?accepted=1")[1]["readings"]] == ["set", "initial"]
        assert _get(f"{base}/api/history?limit=x")[0] == 400
        assert _get(f"{base}/nope")[0] == 404
    finally:
        service.close()
    reopened = History(tmp_path / "history.sqlite")  # the history survives the service
    assert [r["raw"] for r in reopened.recent()] == [4499.0, 5000.0, 4499.0]
    reopened.close()


def test_broker_down_at_start_is_retried_not_fatal(tmp_path: Path, model, pick) -> None:
    """The service reads while the broker is down, and publishes once it comes up (paho reconnects)."""
    port = _free_port()
    extra = f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n\n[postprocess]\nstate_file = "state.json"\n'
    reference, config_path = compose_meter(tmp_path, pick(LABELS), extra=extra)
    config = load_config(config_path)
    service = MeterService(config, reader=MeterReader(config, model)).start_outputs()
    proc = None
    try:
        outcome, _ = service.step(distort(reference, seed=1))
        assert (outcome.status, outcome.value) == ("initial", 4499.0)
        proc = _start_broker(tmp_path, port)
        sub = Subscriber(port, "meter/composed/#")
        sub.wait("meter/composed/availability", lambda p: p == b"online", timeout=20)
        service.step(distort(reference, seed=2))
        sub.wait("meter/composed/state", _state(4499.0, "ok"))
        sub.close()
    finally:
        service.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


def _config(folder: Path, name: str = "unit", meter: str = "", extra: str = "") -> Path:
    """A minimal valid meter config (one wheel, one mark) for tests that need no frames and no model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mark.png").write_bytes(b"")  # loading the config only checks that the mark file exists
    path = folder / "meter.toml"
    path.write_text(f'[meter]\nname = "{name}"\nunit = "m³"\ndevice_class = "water"\n{meter}\n\n'
                    '[[alignment.marks]]\nimage = "mark.png"\nx = 0\ny = 0\n\n'
                    '[[digits]]\nx = 0\ny = 0\nw = 8\nh = 8\n\n' + extra, encoding="utf-8")
    return path


def test_discovery_default_entity_id_and_state_class(tmp_path: Path) -> None:
    """`object_id` stops working in Home Assistant 2026.4; `default_entity_id` names the entity instead.
    A bidirectional meter (allow_negative) can go down, which `total_increasing` would count as a reset."""
    config = load_config(_config(tmp_path / "water", extra='[mqtt]\nhost = "broker"\n'))
    messages = discovery_messages(config, config.mqtt)
    assert {topic: payload["default_entity_id"] for topic, payload in messages.items()} == {
        "homeassistant/sensor/meter_unit/value/config": "sensor.meter_unit_value",
        "homeassistant/sensor/meter_unit/rate/config": "sensor.meter_unit_rate",
        "homeassistant/sensor/meter_unit/status/config": "sensor.meter_unit_status",
        "homeassistant/sensor/meter_unit/error/config": "sensor.meter_unit_error",
        "homeassistant/number/meter_unit/fallback/config": "number.meter_unit_fallback",
    }
    assert not any("object_id" in payload for payload in messages.values())
    assert messages["homeassistant/sensor/meter_unit/value/config"]["state_class"] == "total_increasing"

    config = load_config(_config(tmp_path / "solar", extra='[postprocess]\nallow_negative = true\n\n'
                                 '[mqtt]\nhost = "broker"\n'))
    assert config.postprocess.allow_negative
    assert discovery_messages(config, config.mqtt)["homeassistant/sensor/meter_unit/value/config"]["state_class"] \
        == "total"


def test_set_value_callback_exception_keeps_the_client_connected(tmp_path: Path, broker: int) -> None:
    """paho-mqtt 2 re-raises a callback's exception in its network thread, which ends the thread: later
    commands are never read, no pings are sent, and the broker soon publishes the "offline" will."""
    config = load_config(_config(tmp_path, extra=f'[mqtt]\nhost = "127.0.0.1"\nport = {broker}\n'))
    config = replace(config, mqtt=replace(config.mqtt, keepalive=1))  # so that a silent client is dropped soon
    calls: list[float] = []

    def set_value(value: float) -> dict:
        calls.append(value)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        client.publish_state({"value": value, "status": "set", "error": "none"})
        return {}

    sub = Subscriber(broker, "meter/unit/#")
    client = MeterMqtt(config, set_value).start()
    try:
        client.publish_state({"value": 1.0, "status": "ok", "error": "none"})
        sub.wait("meter/unit/state", _state(1.0))
        sub.client.publish("meter/unit/set_value", "2", qos=1)
        failed = json.loads(sub.wait("meter/unit/state", lambda p: "database is locked" in json.loads(p)["error"]))
        assert (failed["value"], failed["status"]) == (1.0, "ok") and failed["error_time"]  # HA's "Last error"
        sub.client.publish("meter/unit/set_value", "3", qos=1)
        sub.wait("meter/unit/state", _state(3.0, "set"))
        # mosquitto 2.0 drops a client that stopped pinging about 5 s after the last packet (keepalive 1 s)
        with sub.cond:
            went_offline = sub.cond.wait_for(lambda: ("meter/unit/availability", b"offline") in sub.messages, 8)
        assert not went_offline and client.client.is_connected()
        client.publish_state({"value": 4.0, "status": "ok", "error": "none"})
        sub.wait("meter/unit/state", _state(4.0))
    finally:
        client.close()
        sub.close()


def test_states_are_not_queued_while_the_broker_is_unreachable(tmp_path: Path) -> None:
    """A long outage must not pile up states (memory) and replay them all on reconnect: only the latest is
    sent, after discovery and "online", and paho's queue for the QoS 1 messages is bounded."""
    port = _free_port()
    config = load_config(_config(tmp_path, extra=f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'))
    client = MeterMqtt(config, lambda value: {})
    assert client.client.max_queued_messages == MAX_QUEUED
    for i in range(100):  # readings taken while the broker cannot be reached
        client.publish_state({"value": float(i), "status": "ok", "error": "none"})
    proc = _start_broker(tmp_path, port)
    sub = Subscriber(port, "homeassistant/#", "meter/unit/#")  # subscribed before the meter connects
    client.start()
    try:
        sub.wait("meter/unit/availability", lambda p: p == b"online")
        sub.wait("homeassistant/sensor/meter_unit/value/config")
        sub.wait("meter/unit/state", _state(99.0))
        time.sleep(0.5)
        with sub.cond:
            assert [json.loads(p)["value"] for t, p in sub.messages if t == "meter/unit/state"] == [99.0]
    finally:
        client.close()
        sub.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_latest_state_is_sent_again_after_a_broker_restart(tmp_path: Path) -> None:
    """A broker restarted without persistence has lost the retained state: the reconnect restores the latest."""
    port = _free_port()
    config = load_config(_config(tmp_path, extra=f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'))
    proc = _start_broker(tmp_path, port)
    client = MeterMqtt(config, lambda value: {}).start()
    try:
        deadline = time.monotonic() + 10
        while not client.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        client.publish_state({"value": 1.0, "status": "ok", "error": "none"})
        proc.terminate()
        proc.wait(timeout=10)
        while client.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        for value in (2.0, 3.0):  # read during the outage
            client.publish_state({"value": value, "status": "ok", "error": "none"})
        proc = _start_broker(tmp_path, port)
        sub = Subscriber(port, "meter/unit/#")
        sub.wait("meter/unit/availability", lambda p: p == b"online", timeout=20)
        sub.wait("meter/unit/state", _state(3.0))
        time.sleep(0.5)
        with sub.cond:
            assert [json.loads(p)["value"] for t, p in sub.messages if t == "meter/unit/state"] == [3.0]
        sub.close()
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("name", ["küche", "zähler", "m²", "wasser zähler", "gas/1", ""])
def test_meter_name_must_be_ascii(tmp_path: Path, name: str) -> None:
    """Home Assistant's discovery topic only matches [a-zA-Z0-9_-]+: other names would be silently ignored.
    (Config tests live in test_meter_reader.py; these are here beside the MQTT output they protect.)"""
    with pytest.raises(ConfigError, match="meter.name must be letters, digits, '-' or '_', ASCII only"):
        load_config(_config(tmp_path, name=name))


def test_meter_name_ascii_letters_digits_dash_underscore(tmp_path: Path) -> None:
    assert load_config(_config(tmp_path, name="Gas_2-b")).name == "Gas_2-b"


@pytest.mark.parametrize("size", ["[true, 480]", "[640, false]", "[640]", "[0, 480]", "[640.0, 480]"])
def test_capture_size_must_be_two_positive_integers(tmp_path: Path, size: str) -> None:
    """`true` is an int to Python (bool subclasses int), so it has to be refused explicitly."""
    with pytest.raises(ConfigError, match="capture.size must be"):
        load_config(_config(tmp_path, extra=f"[capture]\nsize = {size}\n"))
    assert load_config(_config(tmp_path, extra="[capture]\nsize = [640, 480]\n")).capture_size == (640, 480)
