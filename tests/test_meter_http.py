"""The HTTP/JSON endpoint under bad requests and failing callbacks, through real requests on localhost.

The service behind the endpoint is replaced by plain functions here (no frames, no model): what is tested is
that every request gets an answer. The endpoint with the real service and its SQLite history is tested in
test_meter_mqtt.py.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import sqlite3
from typing import Any, Callable, Iterator

import pytest

from device.meter.config import HttpConfig
from device.meter.http import MAX_BODY, MeterHttp


class FailingHistory:
    """Stands in for History when its SQLite database is locked by another process."""

    def recent(self, limit: int = 100, since: float | None = None, accepted_only: bool = False) -> list:
        raise sqlite3.OperationalError("database is locked")


@pytest.fixture()
def serve() -> Iterator[Callable[..., MeterHttp]]:
    servers: list[MeterHttp] = []

    def start(set_value: Callable[[float], dict], history: Any = None) -> MeterHttp:
        server = MeterHttp(HttpConfig(port=0), lambda: {"value": 1.0, "status": "ok"}, set_value, history).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _raw(port: int, request: bytes) -> bytes:
    """Send a request as bytes and read the answer until the server closes; a hang fails after 5 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("length,status", [("-1", 400), ("x", 400), (str(MAX_BODY + 1), 413),
                                           ("1000000000", 413)])
def test_bad_content_length_is_answered_not_waited_on(serve, length: str, status: int) -> None:
    """`Content-Length: -1` used to become rfile.read(-1), which waits for the client to close: no answer."""
    server = serve(lambda value: {"value": value})
    body = b'{"value": 2}'
    answer = _raw(server.port, b"POST /api/value HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                               b"Content-Length: " + length.encode() + b"\r\n\r\n" + body)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == str(status).encode()
    assert "Content-Length" in json.loads(payload)["error"]


@pytest.mark.parametrize("error", [sqlite3.OperationalError("database is locked"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_failing_set_value_answers_500(serve, error: Exception) -> None:
    """Any exception from the service (not only a bad value) gets a JSON answer instead of a dropped connection."""
    def set_value(value: float) -> dict:
        raise error

    server = serve(set_value)
    status, body = _request(server.port, "POST", "/api/value", b'{"value": 2}')
    assert status == 500 and str(error) in body["error"]
    assert _request(server.port, "GET", "/api/value") == (200, {"value": 1.0, "status": "ok"})  # still serving


def test_value_refused_by_the_service_answers_400(serve) -> None:
    def set_value(value: float) -> dict:
        raise ValueError(f"value must be a finite number, got {value!r}")

    status, body = _request(serve(set_value).port, "POST", "/api/value", b'{"value": NaN}')
    assert status == 400 and "finite" in body["error"]


def test_failing_history_answers_500(serve) -> None:
    server = serve(lambda value: {"value": value}, FailingHistory())
    status, body = _request(server.port, "GET", "/api/history?limit=5")
    assert status == 500 and "database is locked" in body["error"]


def test_an_open_endpoint_without_a_token_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """Bound to every interface with no token, anyone on the network can overwrite the meter's value: say so."""
    with caplog.at_level("WARNING", logger="device.meter"):
        for config in (HttpConfig(port=0), HttpConfig(host="0.0.0.0", port=0, token="s3cret"),
                       HttpConfig(host="0.0.0.0", port=0)):
            MeterHttp(config, lambda: {}, lambda v: {}).start().close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "anyone who can reach 0.0.0.0" in warnings[0] and "token" in warnings[0]
