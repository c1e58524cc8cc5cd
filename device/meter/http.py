"""A small HTTP/JSON endpoint: latest value, history, and setting the fallback value at run time.

Standard library only (http.server in a daemon thread): it serves a handful of requests a minute
on a Raspberry Pi, so a web framework would only add installs.

    GET  /api/value                      latest reading and published value
    GET  /api/history?limit=100&since=T&accepted=1   stored readings, newest first (T: Unix time)
    POST /api/value   {"value": 123.456}  replace the last good value (Bearer token if configured)

Every request gets a JSON answer: 400/413 for a bad request, 500 with the error when the service fails.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from device.meter.config import HttpConfig
from device.meter.history import History

log = logging.getLogger("device.meter")
MAX_BODY = 64 * 1024  # a set_value body is a few bytes; anything longer is refused, not read
ENDPOINTS = {"GET /api/value": "latest reading", "GET /api/history": "stored readings (limit, since, accepted)",
             "POST /api/value": 'set the fallback value: {"value": <number>}'}


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    # a client that sends less than its Content-Length (or nothing) would otherwise hold a thread forever
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http: " + format, *args)

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _failed(self, what: str, exc: Exception) -> None:
        """Answer 500 when the service fails (a locked history database, a full disk): without an answer the
        client sees only a dropped connection, and the cause would be nowhere."""
        log.error("HTTP %s %s: %s failed", self.command, self.path, what, exc_info=exc)
        self._send(500, {"error": f"{what} failed: {type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        url = urlsplit(self.path)
        if url.path == "/api/value":
            try:
                latest = self.server.latest()
            except Exception as exc:
                return self._failed("reading the latest value", exc)
            return self._send(200, latest)
        if url.path == "/api/history":
            if self.server.history is None:
                return self._send(404, {"error": "history is not enabled in the config ([history])"})
            query = parse_qs(url.query)
            try:
                limit = int(query.get("limit", ["100"])[0])
                since = float(query["since"][0]) if "since" in query else None
            except ValueError:
                return self._send(400, {"error": "limit must be an integer and since a Unix time"})
            accepted = query.get("accepted", ["0"])[0] in ("1", "true", "yes")
            try:
                rows = self.server.history.recent(max(1, min(limit, 10000)), since, accepted)
            except Exception as exc:
                return self._failed("reading the history", exc)
            return self._send(200, {"readings": rows})
        if url.path in ("/", "/api"):
            return self._send(200, {"endpoints": ENDPOINTS})
        return self._send(404, {"error": f"no such endpoint {url.path}", "endpoints": ENDPOINTS})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if urlsplit(self.path).path != "/api/value":
            return self._send(404, {"error": f"no such endpoint {self.path}", "endpoints": ENDPOINTS})
        token = self.server.config.token
        if token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
            return self._send(401, {"error": "missing or wrong 'Authorization: Bearer <token>'"})
        # checked before reading: rfile.read(-1) would read until the client closes, so never answer
        header = self.headers.get("Content-Length", "0")
        try:
            length = int(header)
        except ValueError:
            length = -1
        if length < 0:
            return self._send(400, {"error": f"Content-Length must be a number of bytes, got {header!r}"})
        if length > MAX_BODY:
            return self._send(413, {"error": f"Content-Length {length} is over the limit of {MAX_BODY} bytes"})
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            value = float(body["value"])
        except (ValueError, KeyError, TypeError) as exc:
            return self._send(400, {"error": f'expected a JSON body {{"value": <number>}}: {exc}'})
        try:
            outcome = self.server.set_value(value)
        except ValueError as exc:  # refused by the service, e.g. not a finite number
            return self._send(400, {"error": str(exc)})
        except Exception as exc:
            return self._failed("setting the value", exc)
        return self._send(200, outcome)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    config: HttpConfig
    latest: Callable[[], dict]
    history: History | None
    set_value: Callable[[float], dict]


class MeterHttp:
    """The endpoint, serving in a background thread until `close()`. Port 0 picks a free port (`.port`)."""

    def __init__(self, config: HttpConfig, latest: Callable[[], dict], set_value: Callable[[float], dict],
                 history: History | None = None):
        self.server = _Server((config.host, config.port), _Handler)
        self.server.config = config
        self.server.latest = latest
        self.server.set_value = set_value
        self.server.history = history
        self.thread = threading.Thread(target=self.server.serve_forever, name="meter-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> "MeterHttp":
        self.thread.start()
        host = self.server.server_address[0]
        log.info("HTTP endpoint on http://%s:%d/api/value", host, self.port)
        if not self.server.config.token and not ipaddress.ip_address(host).is_loopback:
            log.warning("HTTP: anyone who can reach %s:%d can set the meter's value (POST /api/value); set "
                        "[http] token, or host = \"127.0.0.1\"", host, self.port)
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
