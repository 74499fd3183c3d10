"""Real local parts for the tests: moto's S3 server, a Prefect server, the LLM server.

Ports and the Prefect home are chosen here, at import, before anything imports Prefect,
so every Prefect client in this process talks to the session's own server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from invoiceflow import stack

STATE_DIR = Path(tempfile.mkdtemp(prefix="invoiceflow-test-"))
PREFECT_PORT = stack.free_port()
S3_PORT = stack.free_port()
_info = stack.StackInfo(str(STATE_DIR), PREFECT_PORT, S3_PORT, 0, 0, "invoiceflow-test")
os.environ.update(_info.env())
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
# The server logs why it answered 503 (a SQLite lock), for the failure reports below.
os.environ["PREFECT_SERVER_LOG_RETRYABLE_ERRORS"] = "true"
SERVER_LOG = STATE_DIR / "logs" / "prefect-server.log"
SERVER_LOG_LINES = 40


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A failed test on the session's stack reports the end of the Prefect server's log.

    The stack's state dir is deleted at the end of the session, and CI shows only what
    pytest prints.
    """
    report = yield
    on_stack = "local_stack" in getattr(item, "fixturenames", ())
    if report.failed and on_stack and SERVER_LOG.exists():
        tail = SERVER_LOG.read_text(errors="replace").splitlines()[-SERVER_LOG_LINES:]
        report.sections.append(("Prefect server log, last lines", "\n".join(tail)))
    return report


@pytest.fixture(scope="session")
def local_stack() -> Iterator[stack.StackInfo]:
    """Prefect server + S3 + bucket + manifest lock + blocks, for the whole session."""
    info, _ = stack.up(
        STATE_DIR,
        prefect_port=PREFECT_PORT,
        s3_port=S3_PORT,
        bucket="invoiceflow-test",
        die_with_caller=True,  # a killed test run leaks no servers
    )
    try:
        from flows.provision import provision_local

        asyncio.run(provision_local(bucket=info.bucket, endpoint_url=info.s3_endpoint, samples=0))
        yield info
    finally:
        # Flush queued run logs while the server is still there to take them.
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
        stack.down(STATE_DIR)
        shutil.rmtree(STATE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server of its own, for tests that need S3 but not Prefect."""
    port = stack.free_port()
    proc = subprocess.Popen(
        [stack._bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        stack._wait_healthy(url, proc.pid, Path("/dev/null"), 30)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_store(s3_endpoint: str):
    """A fresh bucket on the session's moto server."""
    from invoiceflow.storage import S3Store, make_s3_client

    client = make_s3_client(
        endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test"
    )
    store = S3Store(client, f"test-{uuid.uuid4().hex[:12]}")
    store.ensure_bucket()
    return store


@pytest.fixture
def unique_prefix() -> str:
    return f"run-{uuid.uuid4().hex[:8]}/"
