"""Prefect side of secret redaction: find the run's secrets in its blocks and mask them
in every log handler.

`invoiceflow.redact` holds the redactor (and `ExtractionError` already masks its
message with it); this module knows where the secrets live in Prefect blocks and
where Prefect's log records leave the process (its API log handler, its console
handler, and whatever else hangs on the root logger), and installs
`RedactingFilter` there. The flow calls `install_run_redaction` once, with the blocks
it loaded, before any provider call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.types import SecretDict
from pydantic import BaseModel, SecretBytes, SecretStr

from invoiceflow.redact import SECRETS, RedactingFilter, register_secrets

log = logging.getLogger(__name__)

# Plain-str fields that hold secrets anyway (prefect-aws keeps aws_session_token as str).
_SECRET_FIELD_WORDS = ("token", "secret", "password", "api_key")


def secrets_of(value: Any, *, url_is_secret: bool = False) -> Iterator[str]:
    """Every secret value inside a block (nested blocks and models included).

    SecretStr / SecretBytes / SecretDict values, plain-str fields whose name says
    secret, and for notification blocks the URL itself: a webhook URL is its own
    credential (Slack, Teams and most custom webhooks authenticate by the path).
    """
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, SecretBytes):
        yield value.get_secret_value().decode(errors="replace")
    elif isinstance(value, SecretDict):
        yield from _strings(value.get_secret_value())
    elif isinstance(value, BaseModel):
        url_is_secret = url_is_secret or isinstance(value, NotificationBlock)
        for name in type(value).model_fields:
            field = getattr(value, name, None)
            if isinstance(field, str):
                if any(word in name for word in _SECRET_FIELD_WORDS) or (
                    url_is_secret and "url" in name
                ):
                    yield field
            else:
                yield from secrets_of(field, url_is_secret=url_is_secret)
    elif isinstance(value, dict):
        for item in value.values():
            yield from secrets_of(item, url_is_secret=url_is_secret)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def install_log_redaction() -> None:
    """Put `RedactingFilter` on every handler of every logger (idempotent).

    Filters on handlers, not loggers: a logger's filter sees only records made on that
    logger, while a handler's sees every record it emits (the SDKs' debug logs that
    propagate to the root logger included).
    """
    for handler in _all_handlers():
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(SECRETS))


def _all_handlers() -> Iterable[logging.Handler]:
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    seen: set[int] = set()
    for logger in loggers:
        for handler in logger.handlers:
            if id(handler) not in seen:
                seen.add(id(handler))
                yield handler


def install_run_redaction(*blocks: Block | None) -> None:
    """Register every secret of ``blocks`` and mask them in all log output from now on."""
    register_secrets(*(s for block in blocks if block is not None for s in secrets_of(block)))
    install_log_redaction()


async def redact_run_secrets(*blocks: Block | None, notify: str | None = None) -> None:
    """`install_run_redaction` for a run's blocks plus its failure-notification block
    (``type-slug/name``), whose URL is a credential too; call it once the blocks are loaded."""
    notification: Block | None = None
    if notify:
        with contextlib.suppress(ValueError):  # not saved: nothing to leak
            notification = await Block.aload(notify)
    install_run_redaction(*blocks, notification)


__all__ = [
    "install_log_redaction",
    "install_run_redaction",
    "redact_run_secrets",
    "secrets_of",
]
