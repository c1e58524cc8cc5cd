"""MQTT output with Home Assistant discovery, and the `set_value` command topic.

Home Assistant finds the meter by itself through retained discovery messages
(`<discovery_prefix>/<component>/meter_<name>/<entity>/config`): the value (device class and
unit, `total_increasing` so it can go on the energy dashboard, or `total` for a meter that may
count down), the rate per minute, the status of the last reading, and the last error — plus a
`number` entity that sets the fallback value from the Home Assistant UI. All sensors read one
retained JSON state message, so a reading is one publish and HA never shows a value from one
reading next to a status from another.

Only the latest state matters (it is retained), so states are sent at QoS 0 and never queued: one
that cannot be sent now is kept, and the latest is sent on every (re)connect, after discovery and
"online". A long outage costs no memory and replays no stale readings into Home Assistant; at QoS 1,
paho would queue every state and, on reconnect, resend the old ones after the newest, leaving a stale
value retained. QoS 0 can only lose a state when the connection drops, and the reconnect sends the
latest one again.

Topics (base = `mqtt.base_topic`, default `meter/<name>`):
    <base>/state          {"value", "raw", "rate", "status", "error", "timestamp", ...} (retained)
    <base>/availability   online / offline (retained; offline is the broker's last will)
    <base>/set_value      command: a number, or {"value": <number>}
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from typing import Any, Callable

import paho.mqtt.client as paho

from device.meter.config import MeterConfig, MqttConfig

log = logging.getLogger("device.meter")
# QoS 1 messages (discovery, availability) paho may hold unacknowledged; about six are sent per connect.
# The bound keeps a connection that keeps failing before the broker acknowledges anything from growing memory.
MAX_QUEUED = 32


def topics(config: MqttConfig) -> dict[str, str]:
    base = config.base_topic
    return {"state": f"{base}/state", "availability": f"{base}/availability", "command": f"{base}/set_value"}


def discovery_messages(meter: MeterConfig, config: MqttConfig) -> dict[str, dict[str, Any]]:
    """Topic → Home Assistant discovery payload for every entity of this meter."""
    t = topics(config)
    node = f"meter_{meter.name}"
    device = {"identifiers": [f"edge_vision_{node}"], "name": f"Meter {meter.name}",
              "manufacturer": "edge-vision", "model": "camera meter reader"}
    common = {"state_topic": t["state"], "availability_topic": t["availability"], "device": device}
    device_class = None if meter.device_class == "none" else meter.device_class
    entities: dict[str, tuple[str, dict[str, Any]]] = {
        "value": ("sensor", {"name": "Value", "value_template": "{{ value_json.value }}",
                             "unit_of_measurement": meter.unit or None, "device_class": device_class,
                             # a bidirectional meter goes down too: `total_increasing` would count that
                             # as a meter reset and add the whole value again in the energy statistics
                             "state_class": "total" if meter.postprocess.allow_negative else "total_increasing",
                             "suggested_display_precision": meter.reading.decimals + meter.reading.extended_resolution,
                             "json_attributes_topic": t["state"],
                             "json_attributes_template": "{{ {'raw': value_json.raw, 'timestamp': value_json.timestamp,"
                                                         " 'alignment': value_json.alignment} | tojson }}"}),
        "rate": ("sensor", {"name": "Rate", "value_template": "{{ value_json.rate }}",
                            "unit_of_measurement": f"{meter.unit}/min" if meter.unit else None,
                            "state_class": "measurement", "icon": "mdi:speedometer"}),
        "status": ("sensor", {"name": "Status", "value_template": "{{ value_json.status }}",
                              "entity_category": "diagnostic", "icon": "mdi:list-status"}),
        "error": ("sensor", {"name": "Last error", "value_template": "{{ value_json.error }}",
                             "entity_category": "diagnostic", "icon": "mdi:alert-circle-outline"}),
        "fallback": ("number", {"name": "Set value", "value_template": "{{ value_json.value }}",
                                "command_topic": t["command"], "min": 0, "max": 1e9,
                                "step": max(meter.resolution, 0.001),  # Home Assistant's smallest step
                                "mode": "box", "unit_of_measurement": meter.unit or None,
                                "entity_category": "config", "icon": "mdi:counter"}),
    }
    out = {}
    for key, (component, payload) in entities.items():
        # default_entity_id replaces object_id (deprecated in Home Assistant 2025.10, ignored from 2026.4)
        body = {**payload, **common, "unique_id": f"{node}_{key}", "default_entity_id": f"{component}.{node}_{key}"}
        topic = f"{config.discovery_prefix}/{component}/{node}/{key}/config"
        out[topic] = {k: v for k, v in body.items() if v is not None}
    return out


def parse_command(payload: bytes) -> float:
    """A set_value payload: a bare number or {"value": number}. Raises ValueError otherwise."""
    text = payload.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a number or JSON: {text[:40]!r}") from exc
    value = data.get("value") if isinstance(data, dict) else data
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'expected a number or {{"value": <number>}}, got {text[:40]!r}')
    return float(value)


class MeterMqtt:
    """Connection to the broker (reconnects by itself), discovery on every connect, state publishing.

    paho-mqtt 2 re-raises an exception from a callback in its network thread, which ends that thread: no
    more pings, reads or reconnects, while publish() still seems to work. So no exception may leave a
    callback (they catch everything), and `suppress_exceptions` is the second line of defence, logged
    through the `device.meter.paho` logger.
    """

    def __init__(self, meter: MeterConfig, set_value: Callable[[float], dict]):
        if meter.mqtt is None:
            raise ValueError("the config has no [mqtt] section")
        self.meter = meter
        self.config = meter.mqtt
        self.topics = topics(self.config)
        self.set_value = set_value
        self._state: str | None = None  # the latest state as sent, re-sent on every connect
        self._state_lock = threading.Lock()  # a state from the service never overtaken by an older one
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.config.client_id)
        if self.config.username:
            self.client.username_pw_set(self.config.username, self.config.password)
        self.client.will_set(self.topics["availability"], "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=120)
        self.client.max_queued_messages_set(MAX_QUEUED)
        self.client.suppress_exceptions = True
        self.client.enable_logger(logging.getLogger("device.meter.paho"))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def start(self) -> "MeterMqtt":
        """Connect in the background; a broker that is down now is retried, never fatal."""
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive)
        self.client.loop_start()
        return self

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("MQTT broker %s:%d refused the connection: %s", self.config.host, self.config.port, reason)
            return
        try:
            log.info("MQTT connected to %s:%d", self.config.host, self.config.port)
            for topic, payload in discovery_messages(self.meter, self.config).items():
                client.publish(topic, json.dumps(payload), qos=1, retain=True)
            client.publish(self.topics["availability"], "online", qos=1, retain=True)
            client.subscribe(self.topics["command"], qos=1)
            with self._state_lock:
                if self._state is not None:
                    client.publish(self.topics["state"], self._state, qos=0, retain=True)
        except Exception:
            log.exception("MQTT: announcing the meter to the broker failed")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT disconnected (%s); reconnecting", reason)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            value = parse_command(message.payload)
            self.set_value(value)
            log.info("MQTT %s: value set to %g", message.topic, value)
        except ValueError as exc:
            log.warning("MQTT %s: ignored command: %s", message.topic, exc)
            self._publish_error(f"set_value ignored: {exc}")
        except Exception as exc:  # e.g. the history database is locked, the disk is full
            log.exception("MQTT %s: setting the value failed", message.topic)
            self._publish_error(f"set_value failed: {type(exc).__name__}: {exc}")

    def _publish_error(self, error: str) -> None:
        """Show a failed command in Home Assistant's "Last error" sensor: the latest state with this error.

        The user typed the value in Home Assistant, so that is where the answer has to appear; a log line on
        the device would go unseen. The next reading's state replaces it.
        """
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._state_lock:  # merged and sent under one lock, so a newer reading is never overwritten
            if self._state is not None:
                self._keep_and_send(json.dumps({**json.loads(self._state), "error": error, "error_time": now}))

    def publish_state(self, state: dict[str, Any]) -> None:
        """Send a state now if connected; otherwise keep it, and the next connect sends it (see the module doc)."""
        payload = json.dumps(state)
        with self._state_lock:
            self._keep_and_send(payload)

    def _keep_and_send(self, payload: str) -> None:
        """Make `payload` the latest state and send it if connected. The caller holds `_state_lock`."""
        self._state = payload
        if self.client.is_connected():
            self.client.publish(self.topics["state"], payload, qos=0, retain=True)

    def close(self) -> None:
        """Say offline (the will is only sent on an unexpected drop), then disconnect."""
        info = self.client.publish(self.topics["availability"], "offline", qos=1, retain=True)
        if self.client.is_connected():
            info.wait_for_publish(timeout=2)
        self.client.disconnect()
        self.client.loop_stop()
