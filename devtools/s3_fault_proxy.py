"""A loopback HTTP proxy in front of an S3 endpoint (moto) that injects faults.

Point a boto3 client's ``endpoint_url`` at ``proxy.url`` instead of moto's URL. Each
request is, with the configured probabilities (``random.Random(seed)``, one draw per
request, so a sequential run is reproducible):

* answered ``503 SlowDown`` with S3's XML error body, without reaching moto;
* cut off with a TCP reset before it reaches moto (``reset_before``): nothing happened;
* forwarded to moto and then cut off with a TCP reset instead of the answer
  (``reset_after``): the request took effect but the client never heard. For a
  conditional PUT this is the nasty case, because botocore's retry then meets its own
  write and gets 412;
* otherwise forwarded, and the answer relayed.

botocore's ``standard`` retry mode treats the 503 SlowDown as throttling and the reset
as a connection error, and retries both.

Conditional PUTs (``If-Match`` / ``If-None-Match``) to one key are serialized through
the proxy. Real S3 checks and writes atomically; moto does not (its check-then-write
races), so without this the tests would measure moto's race, not ours.

``add_rule(predicate, fault, times=n)`` injects a fault into the next ``n`` matching
requests (-1: all of them), e.g. every GET of one key, to outlast botocore's retries.

``hold(predicate)`` parks matching requests before they are forwarded until the
returned gate is opened: a writer stalled in flight, e.g. one whose lease expires
while its manifest PUT is on the wire.

Counting: ``stats()`` returns ``requests``, ``forwarded``, ``slowdown``,
``reset_before``, ``reset_after``, ``held``, ``by_method`` (``"PUT"`` -> n) and
``by_status`` (moto's answers to forwarded requests, ``"412"`` -> n).
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

# Headers that describe one hop, not the message; never relayed as they are.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    "<RequestId>{request_id}</RequestId></Error>"
)


@dataclass(frozen=True)
class ProxiedRequest:
    """What a `hold` predicate gets to look at."""

    method: str
    path: str
    """URL path, percent-decoded: ``/bucket/key``."""
    headers: dict[str, str]
    """Header names lower-cased."""

    @property
    def conditional_put(self) -> bool:
        """A conditional write (`If-Match` or `If-None-Match`): a manifest commit."""
        return self.method == "PUT" and (
            "if-match" in self.headers or "if-none-match" in self.headers
        )


@dataclass
class Gate:
    """Requests matching `predicate` wait here until `open()`; `arrived` is set when one does."""

    predicate: Callable[[ProxiedRequest], bool]
    times: int = 1
    arrived: threading.Event = field(default_factory=threading.Event)
    _opened: threading.Event = field(default_factory=threading.Event)

    def open(self) -> None:
        self._opened.set()

    def wait_open(self, timeout_s: float) -> bool:
        return self._opened.wait(timeout_s)


@dataclass
class FaultRule:
    """Inject `fault` into the next `times` requests matching `predicate` (-1: forever)."""

    predicate: Callable[[ProxiedRequest], bool]
    fault: str
    times: int = 1

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {self.fault!r}")


FAULTS = ("slowdown", "reset_before", "reset_after")


@dataclass
class FaultConfig:
    slowdown_rate: float = 0.0
    reset_before_rate: float = 0.0
    reset_after_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (self.slowdown_rate, self.reset_before_rate, self.reset_after_rate)
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0:
            raise ValueError(f"fault rates must be within 0..1 and sum to at most 1: {rates}")


class S3FaultProxy:
    """The proxy server; use it as a context manager or call `start`/`stop`."""

    def __init__(
        self,
        upstream: str,
        *,
        slowdown_rate: float = 0.0,
        reset_before_rate: float = 0.0,
        reset_after_rate: float = 0.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        hold_timeout_s: float = 120.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port
        self.hold_timeout_s = hold_timeout_s
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._gates: list[Gate] = []
        self._rules: list[FaultRule] = []
        self._counts: Counter[str] = Counter()
        self._by_method: Counter[str] = Counter()
        self._by_status: Counter[str] = Counter()
        self.configure(
            slowdown_rate=slowdown_rate,
            reset_before_rate=reset_before_rate,
            reset_after_rate=reset_after_rate,
            seed=seed,
        )
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- control -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def configure(
        self,
        *,
        slowdown_rate: float = 0.0,
        reset_before_rate: float = 0.0,
        reset_after_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        """Replace the fault rates (all zero: a transparent proxy) and reseed."""
        config = FaultConfig(slowdown_rate, reset_before_rate, reset_after_rate, seed)
        with self._lock:
            self.config = config
            self._rng = random.Random(seed)

    def add_rule(
        self, predicate: Callable[[ProxiedRequest], bool], fault: str, *, times: int = 1
    ) -> FaultRule:
        """Scripted faults; a live matching rule wins over the random draw."""
        rule = FaultRule(predicate, fault, times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def hold(self, predicate: Callable[[ProxiedRequest], bool], *, times: int = 1) -> Gate:
        """Park the next `times` requests matching `predicate` until the gate opens."""
        gate = Gate(predicate, times)
        with self._lock:
            self._gates.append(gate)
        return gate

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self._counts["requests"],
                "forwarded": self._counts["forwarded"],
                "slowdown": self._counts["slowdown"],
                "reset_before": self._counts["reset_before"],
                "reset_after": self._counts["reset_after"],
                "held": self._counts["held"],
                "by_method": dict(self._by_method),
                "by_status": dict(self._by_status),
            }

    def faults_injected(self) -> int:
        s = self.stats()
        return int(s["slowdown"] + s["reset_before"] + s["reset_after"])

    def reset_stats(self) -> None:
        with self._lock:
            self._counts.clear()
            self._by_method.clear()
            self._by_status.clear()

    def start(self) -> S3FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="s3-fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            for gate in self._gates:
                gate.open()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request path ------------------------------------------------------------------

    def _decide(self, request: ProxiedRequest) -> tuple[str, Gate | None]:
        """One fault draw per request (under the lock, so the sequence is the seed's)."""
        with self._lock:
            self._counts["requests"] += 1
            self._by_method[request.method] += 1
            gate = next((g for g in self._gates if g.times > 0 and g.predicate(request)), None)
            if gate is not None:
                gate.times -= 1
                self._counts["held"] += 1
            c = self.config
            # One draw per request even when a rule fires, so rules don't shift the
            # random sequence of the others.
            draw = self._rng.random()
            rule = next((r for r in self._rules if r.times != 0 and r.predicate(request)), None)
            if rule is not None:
                rule.times -= 1 if rule.times > 0 else 0
                fault = rule.fault
            elif draw < c.slowdown_rate:
                fault = "slowdown"
            elif draw < c.slowdown_rate + c.reset_before_rate:
                fault = "reset_before"
            elif draw < c.slowdown_rate + c.reset_before_rate + c.reset_after_rate:
                fault = "reset_after"
            else:
                fault = ""
            if fault:
                self._counts[fault] += 1
            return fault, gate

    def _key_lock(self, request: ProxiedRequest) -> contextlib.AbstractContextManager[Any]:
        if not request.conditional_put:
            return contextlib.nullcontext()
        with self._lock:
            return self._key_locks.setdefault(request.path, threading.Lock())

    def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, resp.reason, resp.getheaders(), payload
        finally:
            conn.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in separate writes; without NODELAY each
                # answer waits ~40 ms for the client's delayed ACK.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a request log per S3 call would drown the test output

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                # SO_LINGER 0 makes close() send RST instead of FIN: a reset connection.
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                self.close_connection = True

            def _handle(self) -> None:
                body = self._read_body()
                headers = [
                    (k, v)
                    for k, v in self.headers.items()
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"
                ]
                request = ProxiedRequest(
                    self.command,
                    unquote(urlsplit(self.path).path),
                    {k.lower(): v for k, v in headers},
                )
                fault, gate = proxy._decide(request)
                if gate is not None:
                    gate.arrived.set()
                    gate.wait_open(proxy.hold_timeout_s)
                if fault == "reset_before":
                    self._reset()
                    return
                if fault == "slowdown":
                    payload = SLOWDOWN_BODY.format(request_id=uuid.uuid4().hex).encode()
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                with proxy._key_lock(request):
                    status, reason, resp_headers, payload = proxy._forward(
                        self.command, self.path, headers, body
                    )
                with proxy._lock:
                    proxy._counts["forwarded"] += 1
                    proxy._by_status[str(status)] += 1
                if fault == "reset_after":
                    self._reset()
                    return
                self.send_response(status, reason)
                has_length = False
                for name, value in resp_headers:
                    lower = name.lower()
                    if lower in _HOP_BY_HOP or lower in ("server", "date"):
                        continue
                    has_length = has_length or lower == "content-length"
                    self.send_header(name, value)
                if not has_length:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD" and payload:
                    self.wfile.write(payload)

            def do_GET(self) -> None:
                self._handle()

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

            def finish(self) -> None:
                # After a deliberate reset the socket is gone; flushing it would raise.
                with contextlib.suppress(OSError, ValueError):
                    super().finish()

        return Handler


@contextlib.contextmanager
def running_s3_fault_proxy(upstream: str, **kwargs: Any) -> Iterator[S3FaultProxy]:
    """`S3FaultProxy(upstream, **kwargs)` for the duration of the ``with`` block."""
    proxy = S3FaultProxy(upstream, **kwargs)
    with proxy:
        yield proxy
