"""Extractors turn the text of one invoice into an `Invoice`.

Every extractor is async (LLM calls are I/O); the offline `RulesExtractor` simply
never awaits anything.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from invoiceflow.schema import Invoice


class ExtractionError(Exception):
    """Extraction failed. `transient` says whether a retry could succeed."""

    def __init__(self, kind: str, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.transient = transient


@runtime_checkable
class Extractor(Protocol):
    name: str

    async def extract(self, text: str) -> Invoice: ...
