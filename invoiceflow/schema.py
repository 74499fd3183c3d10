"""The invoice schema every extractor must produce (pydantic, Decimal money)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# ISO 4217 codes we accept. Kept explicit so a typo ("EUR0", "US$") is a validation
# error instead of a silently wrong currency.
_ISO_4217_CODES = """
AED ARS AUD BGN BRL CAD CHF CLP CNY COP CZK DKK EGP EUR GBP HKD HUF IDR ILS INR ISK JPY
KES KRW MAD MXN MYR NGN NOK NZD PEN PHP PKR PLN QAR RON RSD RUB SAR SEK SGD THB TRY TWD
UAH USD VND ZAR
"""
ISO_4217 = frozenset(_ISO_4217_CODES.split())

Money = Annotated[Decimal, Field(max_digits=18, decimal_places=4)]


class LineItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str
    quantity: Decimal | None = None
    unit_price: Money | None = None
    amount: Money | None = None


class Invoice(BaseModel):
    """Structured fields of one invoice. Absent fields are None, never guessed."""

    model_config = ConfigDict(extra="forbid")

    invoice_number: str | None = None
    invoice_date: dt.date | None = None
    due_date: dt.date | None = None
    vendor_name: str | None = None
    vendor_tax_id: str | None = None
    customer_name: str | None = None
    po_number: str | None = None
    currency: str | None = Field(default=None, description="ISO 4217 code, e.g. EUR")
    subtotal: Money | None = None
    tax_total: Money | None = None
    total: Money | None = None
    amount_due: Money | None = None
    line_items: list[LineItem] = Field(default_factory=list)

    @field_validator("currency")
    @classmethod
    def _iso_currency(cls, value: str | None) -> str | None:
        if value is None:
            return None
        code = value.strip().upper()
        if code not in ISO_4217:
            raise ValueError(f"currency {value!r} is not an ISO 4217 code")
        return code

    @classmethod
    def llm_json_schema(cls) -> dict[str, Any]:
        """A JSON schema suitable for OpenAI structured output (strict mode).

        Strict mode wants every property required (nullable instead of optional) and
        no additionalProperties; money travels as strings so no precision is lost.
        """

        def nullable(t: str, **extra: Any) -> dict[str, Any]:
            return {"type": [t, "null"], **extra}

        money = nullable("string", description="decimal number, '.' as separator")
        date = nullable("string", description="ISO date YYYY-MM-DD")
        line_item = {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "description": {"type": "string"},
                "quantity": money,
                "unit_price": money,
                "amount": money,
            },
            "required": ["description", "quantity", "unit_price", "amount"],
        }
        props: dict[str, Any] = {
            "invoice_number": nullable("string"),
            "invoice_date": date,
            "due_date": date,
            "vendor_name": nullable("string"),
            "vendor_tax_id": nullable("string"),
            "customer_name": nullable("string"),
            "po_number": nullable("string"),
            "currency": nullable("string", description="ISO 4217 code"),
            "subtotal": money,
            "tax_total": money,
            "total": money,
            "amount_due": money,
            "line_items": {"type": "array", "items": line_item},
        }
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": props,
            "required": list(props),
        }


ExtractionSource = Literal["llm", "rules", "einvoice"]


class Usage(BaseModel):
    """Tokens one extraction used, as the provider reported them (all calls summed)."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class Truncation(BaseModel):
    """What part of the document the model saw, when the page/character budget cut it."""

    model_config = ConfigDict(frozen=True)

    pages_total: int
    pages_sent: int
    chars_total: int
    chars_sent: int


class ExtractionResult(BaseModel):
    """What is written to results/<invoice>.json."""

    source_key: str
    source_etag: str
    extractor: str
    pages: int
    invoice: Invoice
    extracted_at: dt.datetime
    # Where the fields came from: an LLM, the offline rules, or embedded e-invoice XML.
    source: ExtractionSource | None = None
    model: str | None = None
    einvoice_format: str | None = None
    usage: Usage | None = None
    # Cost from the provider block's price table; None when the model has no price.
    cost: Decimal | None = None
    cost_currency: str | None = None
    needs_review: bool = False
    review_reasons: list[str] = Field(default_factory=list)
    truncation: Truncation | None = None
    duplicate_of: str | None = None
