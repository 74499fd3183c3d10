"""Masking the secrets a run knows before any text leaves the process.

A provider can echo a credential back: OpenAI's 401 body says "Incorrect API key
provided: <key>", a proxy's 500 page may quote the request, a header may carry it, and
the SDK's exception then holds it in its message and its traceback. Whatever text is
built from such a response (error messages in the manifest and the results, log
records, artifacts, a run's state message) goes through `redact` first.

`SECRETS` is the process-wide `Redactor`: each run registers what it knows (the
extractor's API key, AWS secret keys, webhook URLs) and everything else asks it. A
secret is never dropped once registered, since text built during one run can be
written after it ends; masking a stale secret costs nothing.

This module imports nothing from Prefect: the flow side (`flows/redaction.py`) finds
the secrets in the blocks and installs `RedactingFilter` on the log handlers.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote

MASK: Final = "[REDACTED]"
# Shorter values are not secrets worth masking and would mangle ordinary words
# ("test" is the access key of many local stacks).
MIN_SECRET_CHARS: Final = 8


class Redactor:
    """Knows a set of secrets and masks each of them (and their URL-encoded form) in text."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        """Register secrets; blanks and values under `MIN_SECRET_CHARS` are ignored."""
        wanted = {
            form
            for secret in secrets
            if secret and len(secret.strip()) >= MIN_SECRET_CHARS
            for form in (secret.strip(), quote(secret.strip(), safe=""))
        }
        with self._lock:
            if wanted <= self._secrets:
                return
            self._secrets = self._secrets | wanted
            # Longest first: a secret that contains another is masked whole.
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def __contains__(self, secret: str) -> bool:
        return secret in self._secrets

    def redact(self, text: str) -> str:
        """``text`` with every known secret replaced by `MASK`."""
        pattern = self._pattern
        if pattern is None or not text:
            return text
        return pattern.sub(MASK, text)

    def redact_record(self, record: logging.LogRecord) -> logging.LogRecord:
        """Mask a log record in place: its message, arguments and exception text.

        The message is rendered here (``msg % args``) so a secret in an argument cannot
        slip past, and the traceback is rendered into ``exc_text`` (which every
        `logging.Formatter` prints instead of rendering ``exc_info`` itself).
        """
        if self._pattern is None:
            return record
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return record
        record.msg, record.args = self.redact(message), None
        if record.exc_info and record.exc_info[0] is not None:
            rendered = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text, record.exc_info = self.redact(rendered), None
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return record


class RedactingFilter(logging.Filter):
    """A log filter that masks the secrets of ``redactor`` (default `SECRETS`).

    Installed on handlers, it masks every record the handler emits, whichever logger
    made it; it never drops a record.
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or SECRETS

    def filter(self, record: logging.LogRecord) -> bool:
        self.redactor.redact_record(record)
        return True


SECRETS: Final = Redactor()


def register_secrets(*secrets: str | None) -> None:
    """Add secrets to the process-wide redactor."""
    SECRETS.add(*secrets)


def redact(text: str) -> str:
    """``text`` with every secret registered in this process masked."""
    return SECRETS.redact(text)


__all__ = ["MASK", "SECRETS", "RedactingFilter", "Redactor", "redact", "register_secrets"]
