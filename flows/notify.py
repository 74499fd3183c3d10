"""Tell someone when a run fails: an `on_failure` hook that sends through a notification block.

Which block is a run parameter (`failure_notification_block`, "type-slug/name"), so any
Prefect notification block works: `custom-webhook/...` for a plain webhook,
`slack-webhook/...`, `microsoft-teams-webhook/...`, `pager-duty-webhook/...`. The default
names a Custom Webhook block that `invoiceflow deploy --webhook-url URL` saves; while no
such block exists the hook logs that nobody was told and does nothing else. Editing the
block in the UI takes effect at the next failure, without redeploying.

The message carries the run's name, state message (counts and the first failure's
reason, from `flows/summary.py`), source prefix and UI link; never parameters or blocks,
so no secret can travel.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.client.schemas.objects import FlowRun, State
from prefect.logging.loggers import flow_run_logger
from prefect.settings import PREFECT_UI_URL
from pydantic import ValidationError

from flows.params import ProcessInvoicesParams

DEFAULT_WEBHOOK_BLOCK = "invoiceflow-on-failure"
DEFAULT_NOTIFICATION_BLOCK = f"custom-webhook/{DEFAULT_WEBHOOK_BLOCK}"


def failure_message(flow_run: FlowRun, state: State, params: ProcessInvoicesParams) -> str:
    lines = [
        f"Flow run {flow_run.name!r} of process-invoices ended {state.name}.",
        f"Source prefix: {params.source_prefix}",
        f"Reason: {state.message or 'no message'}",
    ]
    if ui := PREFECT_UI_URL.value():
        lines.append(f"Run: {ui}/runs/flow-run/{flow_run.id}")
    lines.append(
        "Failed invoices stay in the manifest; Retry the run (or run reprocess-failed) "
        "once the cause is fixed. Invoices already done are not sent to the LLM again."
    )
    return "\n".join(lines)


async def notify_failure(flow: Any, flow_run: FlowRun, state: State) -> None:
    """`on_failure` hook of process-invoices. Prefect logs (and swallows) what it raises."""
    logger = flow_run_logger(flow_run, flow)
    try:
        params = ProcessInvoicesParams.model_validate(flow_run.parameters.get("params") or {})
    except ValidationError:
        # The run failed on its parameters; the block is then the default one.
        params = ProcessInvoicesParams()
    slug = params.failure_notification_block
    if not slug:
        return
    try:
        block = await Block.aload(slug)
    except ValueError:
        logger.info("no notification block %r is saved, so nobody was notified", slug)
        return
    if not isinstance(block, NotificationBlock):
        logger.error("block %r is a %s, not a notification block", slug, type(block).__name__)
        return
    subject = f"invoiceflow: run {flow_run.name} {state.name}"
    body = failure_message(flow_run, state, params)
    anotify = getattr(block, "anotify", None)
    await (anotify(body, subject) if anotify is not None else block.notify(body, subject))
    logger.info("failure notification sent through %r", slug)
