"""Extractors turn the text of one invoice into an `Invoice`.

Every extractor is async (LLM calls are I/O); the offline `RulesExtractor` simply
never awaits anything. Extractors that know more than the fields (tokens used, cost,
what the page/character budget cut, which model answered) also offer
``extract_document``, returning an `Extraction`; the pipeline prefers it. Its
``images`` are PNG pages for a vision model (OpenAI ``image_url`` data URLs, Bedrock
``image`` blocks); extractors that read only text ignore them.

Imports nothing from Prefect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol, runtime_checkable

from invoiceflow.redact import redact
from invoiceflow.schema import ExtractionSource, Invoice, Truncation, Usage

__all__ = [
    "DocumentExtractor",
    "Extraction",
    "ExtractionError",
    "ExtractionSource",
    "Extractor",
    "Truncation",
    "Usage",
]


class ExtractionError(Exception):
    """Extraction failed. `transient` says whether a retry could succeed.

    ``attempts`` counts the HTTP requests spent on the invoice (SDK retries and the
    repair attempt included), ``usage`` the tokens they were billed and ``cost`` their
    price (None without a price), so a failure still shows what it cost.

    The message is redacted (`invoiceflow.redact`) as it is made: providers echo keys
    in error bodies, and this text goes to the manifest, the results and the logs.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        transient: bool,
        attempts: int = 0,
        usage: Usage | None = None,
        cost: Decimal | None = None,
    ) -> None:
        super().__init__(redact(message))
        self.kind = kind
        self.transient = transient
        self.attempts = attempts
        self.usage = usage or Usage()
        self.cost = cost


@dataclass(frozen=True)
class Extraction:
    """One extracted invoice plus what it took to get it."""

    invoice: Invoice
    source: ExtractionSource
    extractor: str
    model: str | None = None
    usage: Usage = field(default_factory=Usage)
    cost: Decimal | None = None
    cost_currency: str | None = None
    # HTTP requests made: 1 on a clean call, more with SDK retries or a repair.
    attempts: int = 0
    repaired: bool = False
    truncation: Truncation | None = None
    einvoice_format: str | None = None
    # Problems found while normalizing the raw answer (e.g. an ambiguous "$").
    notes: tuple[str, ...] = ()


@runtime_checkable
class Extractor(Protocol):
    name: str

    async def extract(self, text: str) -> Invoice: ...


@runtime_checkable
class DocumentExtractor(Protocol):
    name: str

    async def extract(self, text: str) -> Invoice: ...

    async def extract_document(
        self,
        text: str,
        *,
        pages: int | None = None,
        invoice_key: str | None = None,
        images: Sequence[bytes] = (),
    ) -> Extraction: ...
