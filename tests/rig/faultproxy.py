"""An HTTP proxy in front of the S3 server that injects the faults a real network and store show.

drkit's S3 client talks to the proxy (``endpoint_url``); the proxy forwards each request to the
moto server and, when a planned fault matches it, answers wrongly instead::

    proxy = S3FaultProxy(server.direct_endpoint_url)
    proxy.plan("503", method="PUT", times=2)        # SlowDown twice, then the real answer
    proxy.plan("truncate", method="GET", times=1)   # the body cut short, connection closed
    proxy.plan("corrupt", method="GET", match="/data/", times=1)  # one byte flipped, length kept
    ... run drkit against proxy.endpoint_url ...
    proxy.assert_all_fired()

Faults: ``500`` (InternalError), ``503`` (SlowDown), ``reset`` (the request is read, then the
connection is reset: the client cannot know whether it was applied — it was not), ``reset-after``
(forwarded and applied, then reset before the reply: a lost reply), ``truncate`` (the headers
promise the whole body, half of it comes, then the connection closes), ``corrupt`` (one byte of
the reply's body flipped, length and headers kept), ``corrupt-request`` (one byte of the
request's body flipped on its way to the store), ``slow`` (the reply waits ``delay`` seconds),
``ignore-range`` (the Range header is dropped: the whole object comes back, as from a store
without ranged reads), ``short`` (a ranged reply holds only the first half of the range, its
Content-Range and Content-Length saying so).
``hold`` keeps the request (not yet forwarded) until `release` is called, at most ``delay``
seconds: a host stopped mid-operation for exactly as long as a test needs; ``release(drop=True)``
resets it instead of forwarding it, as when that host dies with the request in flight.
``rate`` injects a fault into that fraction of the matching requests instead of a fixed count
(with a seeded generator, for the longer campaign).

The proxy checks a request's ``x-amz-checksum-sha256`` against its body and answers 400
BadDigest on a mismatch, as AWS S3 and MinIO do and moto does not (``validate_checksums=False``
behaves like moto: a body damaged on its way is stored).

Runs in daemon threads of the test process, on loopback only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULTS = frozenset(
    {
        "500",
        "503",
        "reset",
        "reset-after",
        "truncate",
        "corrupt",
        "corrupt-request",
        "slow",
        "hold",
        "ignore-range",
        "short",
    }
)
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}


@dataclass
class PlannedFault:
    fault: str
    method: str | None = None
    match: str | None = None  # a substring of the path (the object key, the bucket, a query)
    times: int | None = 1  # None: every matching request (subject to rate)
    rate: float = 1.0
    delay: float = 0.0
    fired: int = 0
    hits: list[str] = field(default_factory=list)

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.match is not None and self.match not in path:
            return False
        return self.times is None or self.fired < self.times


class S3FaultProxy:
    """A proxy on a free loopback port forwarding to ``target`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, target: str, seed: int = 0, validate_checksums: bool = True) -> None:
        parts = urlsplit(target)
        assert parts.hostname is not None and parts.port is not None
        self.target = (parts.hostname, parts.port)
        self.requests = 0
        self.seen: Counter[str] = Counter()  # requests by "METHOD /path" (query left out)
        self.bad_digests = 0  # requests refused because their body did not match its checksum
        self.validate_checksums = validate_checksums
        self._faults: list[PlannedFault] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._drop_held = False
        self._random = random.Random(seed)
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="s3-fault-proxy", daemon=True
        )
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def plan(
        self,
        fault: str,
        *,
        method: str | None = None,
        match: str | None = None,
        times: int | None = 1,
        rate: float = 1.0,
        delay: float = 0.0,
    ) -> PlannedFault:
        assert fault in FAULTS, fault
        planned = PlannedFault(fault, method, match, times, rate, delay)
        with self._lock:
            self._faults.append(planned)
        return planned

    def release(self, *, drop: bool = False) -> None:
        """Let every held request go on (``drop``: reset it instead, never forwarded)."""
        self._drop_held = drop
        self._released.set()

    def clear(self) -> None:
        with self._lock:
            self._faults = []

    def fired(self) -> dict[str, int]:
        with self._lock:
            found: dict[str, int] = {}
            for planned in self._faults:
                found[planned.fault] = found.get(planned.fault, 0) + planned.fired
            return found

    def assert_all_fired(self) -> None:
        with self._lock:
            missing = [f for f in self._faults if f.fired == 0]
        assert not missing, f"planned faults that never fired: {missing}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> S3FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _choose(self, method: str, path: str) -> PlannedFault | None:
        with self._lock:
            self.requests += 1
            self.seen[f"{method} {path.partition('?')[0]}"] += 1
            for planned in self._faults:
                if planned.matches(method, path) and self._random.random() < planned.rate:
                    planned.fired += 1
                    planned.hits.append(f"{method} {path}")
                    return planned
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # the test's output is the assertions, not an access log

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                planned = proxy._choose(self.command, self.path)
                fault = planned.fault if planned else None
                if fault in _ERRORS:
                    self._error(*_ERRORS[fault])
                    return
                if fault == "reset":
                    _reset(self.connection)
                    self.close_connection = True
                    return
                if fault == "slow":
                    assert planned is not None
                    time.sleep(planned.delay)
                if fault == "hold":
                    assert planned is not None
                    proxy._released.wait(planned.delay)
                    if proxy._drop_held:
                        _reset(self.connection)
                        self.close_connection = True
                        return
                if fault == "corrupt-request" and body:
                    at = len(body) // 2
                    body = body[:at] + bytes([body[at] ^ 0x5A]) + body[at + 1 :]
                if proxy.validate_checksums and not _checksum_matches(self.headers, body):
                    proxy.bad_digests += 1
                    self._error(400, "BadDigest", "The SHA256 you specified did not match.")
                    return
                request_headers = self.headers.items()
                if fault == "ignore-range":
                    request_headers = [(n, v) for n, v in request_headers if n.lower() != "range"]
                status, reason, headers, payload = proxy._forward(
                    self.command, self.path, request_headers, body
                )
                if fault == "short" and status == 206 and len(payload) > 1:
                    payload, headers = _shortened(payload, headers)
                if fault == "reset-after":
                    _reset(self.connection)
                    self.close_connection = True
                    return
                if fault == "corrupt" and payload:
                    at = len(payload) // 2
                    payload = payload[:at] + bytes([payload[at] ^ 0x5A]) + payload[at + 1 :]
                self.send_response(status, reason)
                for name, value in headers:
                    self.send_header(name, value)
                if self.command != "HEAD" and not any(
                    n.lower() == "content-length" for n, _ in headers
                ):
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "truncate" and len(payload) > 1:
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    _reset(self.connection)
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            def _error(self, status: int, code: str, message: str) -> None:
                xml = (
                    '<?xml version="1.0" encoding="UTF-8"?>'
                    f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                self.wfile.write(xml)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

            def finish(self) -> None:
                with contextlib.suppress(OSError):  # a connection this proxy reset
                    super().finish()

        return Handler

    def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.target, timeout=60)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_HEADERS:
                    conn.putheader(name, value)
            conn.endheaders(body if body or method in ("PUT", "POST") else None)
            resp = conn.getresponse()
            payload = resp.read()
            kept = [
                (name, value)
                for name, value in resp.getheaders()
                if name.lower() not in _HOP_HEADERS
                and not (name.lower() == "content-length" and method != "HEAD")
            ]
            if method != "HEAD":
                kept.append(("Content-Length", str(len(payload))))
            return resp.status, resp.reason, kept, payload
        finally:
            conn.close()


def _checksum_matches(headers: Any, body: bytes) -> bool:
    sent = headers.get("x-amz-checksum-sha256")
    if not sent or headers.get("x-amz-content-sha256", "").startswith("STREAMING"):
        return True
    return bool(base64.b64encode(hashlib.sha256(body).digest()).decode() == sent)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up on a slow or reset reply: expected here


def _shortened(
    payload: bytes, headers: list[tuple[str, str]]
) -> tuple[bytes, list[tuple[str, str]]]:
    """The first half of a ranged reply, with headers that say so."""
    half = payload[: len(payload) // 2]
    kept = []
    for name, value in headers:
        if name.lower() == "content-length":
            value = str(len(half))
        elif name.lower() == "content-range":
            start = int(value.removeprefix("bytes ").split("-")[0])
            total = value.rpartition("/")[2]
            value = f"bytes {start}-{start + len(half) - 1}/{total}"
        kept.append((name, value))
    return half, kept


def _reset(sock: socket.socket) -> None:
    """Close with RST: the client sees "connection reset by peer", as from a failing balancer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
