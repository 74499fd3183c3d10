"""A failed run notifies through the configured notification block; nothing secret travels.

The webhook receiver is a loopback HTTP server in this process; the block is Prefect's
own Custom Webhook block, saved on the session's server as `invoiceflow deploy
--webhook-url` would save it.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from invoiceflow import stack
from invoiceflow.storage import S3Store, make_s3_client

pytestmark = [pytest.mark.ops, pytest.mark.usefixtures("local_stack")]


class WebhookReceiver:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "json": json.loads(body)}
                )
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/invoiceflow"


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.fixture
def s3(local_stack: stack.StackInfo) -> S3Store:
    client = make_s3_client(
        endpoint_url=local_stack.s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x"
    )
    return S3Store(client, local_stack.bucket)


async def save_webhook_block(url: str) -> str:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    name = f"hook-{uuid.uuid4().hex[:8]}"
    await CustomWebhookNotificationBlock(
        name="invoiceflow",
        url=url,
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save(name)
    return f"custom-webhook/{name}"


async def run_flow(**params: Any) -> None:
    from flows.params import ProcessInvoicesParams
    from flows.process_invoices import process_invoices

    await process_invoices(ProcessInvoicesParams(**params))


async def test_failed_run_notifies_the_webhook(
    s3: S3Store, webhook: WebhookReceiver, unique_prefix: str
) -> None:
    from flows.summary import InvoicesFailed
    from invoiceflow.samples import generate_corpus

    (stem, pdf, _), *_ = generate_corpus(1, seed=31)
    s3.put(f"{unique_prefix}{stem}.pdf", pdf, content_type="application/pdf")
    broken = f"{unique_prefix}scan.pdf"
    s3.put(broken, b"not a PDF at all", content_type="application/pdf")
    block = await save_webhook_block(webhook.url)

    with pytest.raises(InvoicesFailed):
        await run_flow(
            source_prefix=unique_prefix,
            manifest_key=f"manifests/{unique_prefix.rstrip('/')}.json",
            results_prefix=f"results/{unique_prefix}",
            commit_interval_s=0.2,
            failure_notification_block=block,
        )

    (request,) = webhook.requests
    assert request["path"] == "/hooks/invoiceflow"
    message = request["json"]
    assert message["subject"].startswith("invoiceflow: run ")
    assert message["subject"].endswith(" Failed")
    assert f"Source prefix: {unique_prefix}" in message["body"]
    assert "1 of 2 invoices failed" in message["body"]
    assert broken in message["body"]
    assert "/runs/flow-run/" in message["body"]
    # The S3 credentials block holds this secret; it must never reach a notification.
    assert "invoiceflow-local" not in json.dumps(request)


async def test_no_block_saved_means_no_notification_and_the_real_error(
    webhook: WebhookReceiver, unique_prefix: str
) -> None:
    from flows.lock import ManifestLockError

    with pytest.raises(ManifestLockError):
        await run_flow(
            source_prefix=unique_prefix,
            manifest_lock=f"missing-{uuid.uuid4().hex[:6]}",
            failure_notification_block=f"custom-webhook/never-saved-{uuid.uuid4().hex[:6]}",
        )
    assert webhook.requests == []


async def test_failure_before_any_invoice_also_notifies(
    webhook: WebhookReceiver, unique_prefix: str
) -> None:
    from flows.lock import ManifestLockError

    block = await save_webhook_block(webhook.url)
    with pytest.raises(ManifestLockError):
        await run_flow(
            source_prefix=unique_prefix,
            manifest_lock=f"missing-{uuid.uuid4().hex[:6]}",
            failure_notification_block=block,
        )
    (request,) = webhook.requests
    assert "does not exist" in request["json"]["body"]
