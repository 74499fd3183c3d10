"""`flows/leases.py`: lease requests that Prefect's server answers 503 are asked again
at once, not after the Prefect client's 2 s backoff (a real loopback HTTP server plays
the API: it answers 503 as often as told, then 200)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from flows.leases import AskAgainWhenBusy


class BusyServer:
    """Answers the first `busy` POSTs 503 (as Prefect does on "database is locked"),
    the rest 200; records every body it received."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.bodies: list[bytes] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.bodies.append(body)
                status = 503 if len(server.bodies) <= server.busy else 200
                payload = json.dumps({"attempt": len(server.bodies)}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def busy_server(request: pytest.FixtureRequest) -> Iterator[BusyServer]:
    server = BusyServer(request.param)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.mark.parametrize("busy_server", [3], indirect=True)
async def test_a_503_is_asked_again_with_the_same_body(busy_server: BusyServer) -> None:
    transport = AskAgainWhenBusy(httpx.AsyncHTTPTransport())
    async with httpx.AsyncClient(transport=transport, base_url=busy_server.url) as client:
        response = await client.post(
            "/v2/concurrency_limits/increment-with-lease", json={"slots": 4}
        )
    assert response.status_code == 200
    assert response.json() == {"attempt": 4}
    assert [json.loads(body) for body in busy_server.bodies] == [{"slots": 4}] * 4


@pytest.mark.parametrize("busy_server", [1000], indirect=True)
async def test_a_server_that_stays_busy_gets_its_503_through(busy_server: BusyServer) -> None:
    """After `within_s` the 503 reaches the caller (Prefect's client, which backs off)."""
    transport = AskAgainWhenBusy(httpx.AsyncHTTPTransport(), within_s=0.3)
    async with httpx.AsyncClient(transport=transport, base_url=busy_server.url) as client:
        response = await client.post("/v2/concurrency_limits/increment-with-lease", json={})
    assert response.status_code == 503
    assert 2 <= len(busy_server.bodies) < 30
