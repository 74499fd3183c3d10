"""The invoice schema every extractor must produce (pydantic, Decimal money).

Imports nothing from Prefect.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# ISO 4217 active currency codes (the list e-invoice code lists use). Kept explicit so a
# typo ("EUR0", "US$") is a validation error instead of a silently wrong currency, while
# a real e-invoice in, say, BAM or XOF is not refused.
_ISO_4217_CODES = """
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD
BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP
DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HRK HTG HUF IDR ILS
INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD
MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR
PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS
SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW
UZS VED VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWG ZWL
"""
ISO_4217 = frozenset(_ISO_4217_CODES.split())

Money = Annotated[Decimal, Field(max_digits=18, decimal_places=4)]
# Unit prices may legitimately carry more decimals than money (EN 16931 puts no limit
# on BT-146, e.g. 0.123456 EUR per kWh); rounding them would change what was agreed.
UnitPrice = Annotated[Decimal, Field(max_digits=28, decimal_places=10)]
# A tax rate in percent, e.g. 19 or 7.7.
Percent = Annotated[Decimal, Field(max_digits=9, decimal_places=4)]
DocumentType = Literal["invoice", "credit_note"]


class LineItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str
    quantity: Decimal | None = None
    unit_price: UnitPrice | None = None
    amount: Money | None = None


class TaxBreakdown(BaseModel):
    """One VAT rate's share of the invoice (EN 16931 BG-23 "VAT breakdown")."""

    model_config = ConfigDict(extra="forbid")

    # None for categories without a rate (e.g. "not subject to VAT").
    rate: Percent | None = None
    taxable_amount: Money | None = None
    tax_amount: Money | None = None


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
    # Fields the big invoice APIs share. All optional, so results written before they
    # existed stay readable.
    document_type: DocumentType | None = Field(
        default=None,
        description="credit_note for a credit note (UBL CreditNote, CII type 381); "
        "amounts keep the sign the document states",
    )
    customer_tax_id: str | None = None
    payment_terms: str | None = None
    iban: str | None = Field(default=None, description="payee IBAN, as printed")
    bic: str | None = None
    tax_breakdown: list[TaxBreakdown] = Field(default_factory=list)
    vendor_address: str | None = None
    customer_address: str | None = None
    service_period_start: dt.date | None = None
    service_period_end: dt.date | None = None

    @field_validator("currency")
    @classmethod
    def _iso_currency(cls, value: str | None) -> str | None:
        if value is None:
            return None
        code = value.strip().upper()
        if code not in ISO_4217:
            # Cut short: the message becomes a failure reason in the manifest.
            raise ValueError(f"currency {value[:20]!r} is not an ISO 4217 code")
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
        tax_line = {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "rate": nullable("string", description="percent, e.g. '19'"),
                "taxable_amount": money,
                "tax_amount": money,
            },
            "required": ["rate", "taxable_amount", "tax_amount"],
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
            "document_type": {
                "type": ["string", "null"],
                "enum": ["invoice", "credit_note", None],
                "description": "credit_note only when the document says it is a credit note",
            },
            "customer_tax_id": nullable("string"),
            "payment_terms": nullable("string"),
            "iban": nullable("string"),
            "bic": nullable("string"),
            "tax_breakdown": {"type": "array", "items": tax_line},
            "vendor_address": nullable("string"),
            "customer_address": nullable("string"),
            "service_period_start": date,
            "service_period_end": date,
        }
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": props,
            "required": list(props),
        }


ExtractionSource = Literal["llm", "rules", "einvoice"]
# How the document was read: its text layer, OCR of page images, page images sent to a
# vision model, or its e-invoice XML.
ReadAs = Literal["text", "ocr", "vision", "einvoice"]


class Usage(BaseModel):
    """Tokens one extraction used, as the provider reported them (all calls summed)."""

    model_config = ConfigDict(frozen=True)

    # All prompt tokens, cached ones included (OpenAI's convention).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Of prompt_tokens: read from the provider's prompt cache (billed at the cached price)
    # and written to it (Bedrock's cacheWriteInputTokens, billed at the cache-write price).
    cached_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
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
    read_as: ReadAs | None = None
    usage: Usage | None = None
    # Cost from the provider block's price table; None when the model has no price.
    cost: Decimal | None = None
    cost_currency: str | None = None
    needs_review: bool = False
    review_reasons: list[str] = Field(default_factory=list)
    truncation: Truncation | None = None
    duplicate_of: str | None = None
