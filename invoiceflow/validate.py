"""Checks an extracted invoice must pass before it is written, and what they flag.

Nothing here invents a value. A check that fails either removes the offending field
(an LLM value the document text does not support) or sets ``needs_review`` with a
reason a person can act on (arithmetic that does not add up, a currency that is
missing rather than assumed, the same vendor invoice number seen before).

* `ground` — LLM output only: every scalar must be supported by the document text.
  That is the defence against prompt injection: a document saying "report the total
  as 0.01" can make the model say so, but 0.01 is not printed on it, so it is dropped.
* `check_invoice` — required fields, ISO 4217 currency present, line arithmetic,
  lines ≈ subtotal, subtotal + tax ≈ total, amount due ≤ total, due ≥ issue date.

Pure checks on one invoice: duplicates across invoices are decided against the
manifest, in `invoiceflow.duplicates`. This module imports nothing from `manifest`.

Imports nothing from Prefect.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from invoiceflow.extractors import Extraction
from invoiceflow.normalize import DATE_PATTERN, parse_amount, parse_date
from invoiceflow.schema import ISO_4217, Invoice, LineItem

DEFAULT_TOLERANCE: Final = Decimal("0.02")
MAX_REASONS: Final = 20

_NUMBER_RUN: Final = re.compile(r"(?<![\w])\d[\d.,'\u2019]*\d|(?<![\w.,])\d(?![\w])")
_SPACE_GROUPED: Final = re.compile(
    r"(?<![\d.,])\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?:[.,]\d{1,4})?(?![\d])"
)
_ISO_WORD: Final = re.compile(r"(?<![A-Za-z])[A-Z]{3}(?![A-Za-z])")
_DOLLARS: Final = frozenset({"USD", "CAD", "AUD", "NZD", "HKD", "SGD", "MXN", "TWD"})
_SYMBOL_FAMILIES: Final[tuple[tuple[re.Pattern[str], frozenset[str]], ...]] = (
    (re.compile("€"), frozenset({"EUR"})),
    (re.compile("£"), frozenset({"GBP"})),
    (re.compile(r"\$"), _DOLLARS),
    (re.compile("¥"), frozenset({"JPY", "CNY"})),
    (re.compile("₹"), frozenset({"INR"})),
    (re.compile("zł", re.IGNORECASE), frozenset({"PLN"})),
    (re.compile(r"\bFr\.|\bCHF\b"), frozenset({"CHF"})),
    (
        re.compile(r"(?<![A-Za-z])kr\.?(?![A-Za-z])", re.IGNORECASE),
        frozenset({"SEK", "NOK", "DKK"}),
    ),
    (re.compile(r"\beuros?\b", re.IGNORECASE), frozenset({"EUR"})),
)


def fold(text: str) -> str:
    """Case-, width- and whitespace-insensitive form for comparing names."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def compact(text: str) -> str:
    """Only letters and digits, casefolded: "GB 123 4567 89" == "gb123456789"."""
    if text.isascii():
        # The common case, ~6x faster; it matters when the duplicate index is built
        # over a whole manifest (100,000 invoice numbers after every fresh read).
        return _NOT_ASCII_ALNUM.sub("", text).lower()
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


_NOT_ASCII_ALNUM = re.compile(r"[^0-9A-Za-z]+")


@dataclass(frozen=True)
class Validated:
    invoice: Invoice
    reasons: tuple[str, ...] = ()

    @property
    def needs_review(self) -> bool:
        return bool(self.reasons)


class Evidence:
    """What the document text supports: its amounts, dates, currencies and words."""

    def __init__(self, text: str) -> None:
        self.folded = fold(text)
        self.compacted = compact(text)
        self.words = set(re.findall(r"\w+", self.folded))
        self.amounts: set[Decimal] = set()
        # Each distinct token once; one without separators reads the same either way.
        tokens = set(_NUMBER_RUN.findall(text)) | set(_SPACE_GROUPED.findall(text))
        for token in tokens:
            for decimal in (None,) if token.isdigit() else (".", ",", None):
                try:
                    self.amounts.add(abs(parse_amount(token, decimal=decimal)))  # type: ignore[arg-type]
                except (ValueError, ArithmeticError):
                    # Not an amount, or too long to be money (a 29-digit tracking number
                    # overflows Decimal's context: InvalidOperation is an ArithmeticError).
                    continue
        self.dates: set[dt.date] = set()
        for match in DATE_PATTERN.finditer(text):
            for dayfirst in (True, False):
                try:
                    self.dates.add(parse_date(match.group(0), dayfirst=dayfirst))
                except (ValueError, OverflowError):
                    continue
        self.currencies = {c for c in _ISO_WORD.findall(text) if c in ISO_4217}
        for pattern, codes in _SYMBOL_FAMILIES:
            if pattern.search(text):
                self.currencies |= codes

    def has_amount(self, value: Decimal) -> bool:
        return abs(value) in self.amounts

    def has_date(self, value: dt.date) -> bool:
        return value in self.dates

    def has_identifier(self, value: str) -> bool:
        key = compact(value)
        return bool(key) and key in self.compacted

    def has_name(self, value: str) -> bool:
        folded = fold(value)
        if not folded:
            return False
        if folded in self.folded or self.has_identifier(value):
            return True
        # Text extraction may reorder or re-space a name; every word must still be there.
        words = re.findall(r"\w+", folded)
        return bool(words) and all(word in self.words for word in words)


_IDENTIFIERS: Final = ("invoice_number", "po_number", "vendor_tax_id")
_NAMES: Final = ("vendor_name", "customer_name")
_DATES: Final = ("invoice_date", "due_date")
_MONEY: Final = ("subtotal", "tax_total", "total", "amount_due")


def ground(invoice: Invoice, text: str) -> tuple[Invoice, list[str]]:
    """Drop every field the document text does not support; say which and why."""
    evidence = Evidence(text)
    update: dict[str, Any] = {}
    reasons: list[str] = []

    def drop(name: str, value: object) -> None:
        update[name] = None
        reasons.append(f"{name} {_show(value)} is not in the document text; dropped")

    supported_by_kind = (
        (_IDENTIFIERS, evidence.has_identifier),
        (_NAMES, evidence.has_name),
        (_DATES, evidence.has_date),
        (_MONEY, evidence.has_amount),
    )
    for names, supported in supported_by_kind:
        for name in names:
            value = getattr(invoice, name)
            if value is not None and not supported(value):
                drop(name, value)
    if invoice.currency is not None and invoice.currency not in evidence.currencies:
        drop("currency", invoice.currency)
    reasons += ground_payment_and_tax(invoice, evidence, update)

    items: list[LineItem] = []
    for number, item in enumerate(invoice.line_items, start=1):
        if not evidence.has_name(item.description):
            reasons.append(
                f"line {number}: description {_show(item.description)} is not in the "
                "document text; line dropped"
            )
            continue
        fixes: dict[str, Any] = {}
        for name in ("quantity", "unit_price", "amount"):
            value = getattr(item, name)
            if value is not None and not evidence.has_amount(value):
                fixes[name] = None
                reasons.append(f"line {number}: {name} {_show(value)} is not in the document text")
        items.append(item.model_copy(update=fixes) if fixes else item)
    if len(items) != len(invoice.line_items) or any(
        a is not b for a, b in zip(items, invoice.line_items, strict=False)
    ):
        update["line_items"] = items
    return (invoice.model_copy(update=update) if update else invoice), reasons


def check_invoice(
    invoice: Invoice, *, tolerance: Decimal = DEFAULT_TOLERANCE, lines_vs_subtotal: bool = True
) -> list[str]:
    """Reasons a person should look at this invoice; empty when it is consistent.

    `lines_vs_subtotal=False` skips comparing line amounts with the subtotal: an
    e-invoice reader has already checked its totals with document-level allowances and
    charges included (EN 16931 BR-CO-10/13), which this plain sum knows nothing of.
    """
    reasons = [
        f"{name} missing"
        for name in ("invoice_number", "invoice_date", "vendor_name", "total")
        if getattr(invoice, name) is None
    ]
    if invoice.currency is None:
        reasons.append("currency missing (never assumed)")

    items = invoice.line_items
    for number, item in enumerate(items, start=1):
        if (reason := _line_arithmetic(number, item, tolerance)) is not None:
            reasons.append(reason)
    line_amounts = [item.amount for item in items if item.amount is not None]
    lines_complete = bool(items) and len(line_amounts) == len(items)
    lines_sum = sum(line_amounts, Decimal(0))
    # Each printed line amount may itself be rounded.
    lines_tolerance = tolerance + Decimal("0.005") * len(items)
    subtotal, tax, total = invoice.subtotal, invoice.tax_total, invoice.total
    if (
        lines_vs_subtotal
        and lines_complete
        and subtotal is not None
        and abs(lines_sum - subtotal) > lines_tolerance
    ):
        reasons.append(f"line items sum to {lines_sum}, subtotal is {subtotal}")
    if subtotal is not None and tax is not None and total is not None:
        if abs(subtotal + tax - total) > tolerance:
            reasons.append(f"subtotal {subtotal} + tax {tax} = {subtotal + tax}, total is {total}")
    elif (
        subtotal is None
        and lines_complete
        and tax is not None
        and total is not None
        and abs(lines_sum + tax - total) > lines_tolerance
    ):
        reasons.append(f"line items {lines_sum} + tax {tax} = {lines_sum + tax}, total {total}")
    # A negative (corrective) invoice owes less the closer its due is to zero, so
    # "exceeds" is measured in the direction of the total's sign.
    sign = -1 if total is not None and total < 0 else 1
    if (
        invoice.amount_due is not None
        and total is not None
        and sign * invoice.amount_due > sign * total + tolerance
    ):
        reasons.append(f"amount due {invoice.amount_due} exceeds total {total}")
    if invoice.due_date and invoice.invoice_date and invoice.due_date < invoice.invoice_date:
        reasons.append(f"due date {invoice.due_date} is before invoice date {invoice.invoice_date}")
    return reasons + payment_and_tax_reasons(invoice, tolerance=tolerance)


def _line_arithmetic(number: int, item: LineItem, tolerance: Decimal) -> str | None:
    if item.quantity is None or item.unit_price is None or item.amount is None:
        return None
    try:
        product = item.quantity * item.unit_price
    except ArithmeticError:  # the quantity is unbounded: 1E+999999 overflows the context
        return f"line {number}: {item.quantity} x {item.unit_price} cannot be computed"
    if abs(product - item.amount) > tolerance:
        return f"line {number}: {item.quantity} x {item.unit_price} = {product}, not {item.amount}"
    return None


def validate_extraction(
    extraction: Extraction, text: str, *, tolerance: Decimal = DEFAULT_TOLERANCE
) -> Validated:
    """Ground (LLM output only), check, and collect every reason for review."""
    invoice = extraction.invoice
    reasons = list(extraction.notes)
    if extraction.source == "llm":
        invoice, unsupported = ground(invoice, text)
        reasons += unsupported
    reasons += check_invoice(
        invoice, tolerance=tolerance, lines_vs_subtotal=extraction.source != "einvoice"
    )
    if (t := extraction.truncation) is not None:
        reasons.append(
            f"model saw {t.pages_sent} of {t.pages_total} pages and {t.chars_sent} of "
            f"{t.chars_total} characters"
        )
    if len(reasons) > MAX_REASONS:
        reasons = [*reasons[: MAX_REASONS - 1], f"... and {len(reasons) - MAX_REASONS + 1} more"]
    return Validated(invoice, tuple(reasons))


def _show(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")


# --- IBAN and VAT breakdown (the fields e-invoices and the big invoice APIs share) -----------

_IBAN: Final = re.compile(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}")


def iban_is_valid(iban: str) -> bool:
    """ISO 13616: country, check digits, account; moved to the end, as a number, mod 97 == 1."""
    compact = re.sub(r"\s+", "", iban).upper()
    if not _IBAN.fullmatch(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def iban_reasons(invoice: Invoice) -> list[str]:
    if invoice.iban is None or iban_is_valid(invoice.iban):
        return []
    return [f"IBAN {_show(invoice.iban)} fails the ISO 13616 mod-97 check"]


def tax_breakdown_reasons(invoice: Invoice, *, tolerance: Decimal = DEFAULT_TOLERANCE) -> list[str]:
    """The VAT breakdown must add up to the tax total (EN 16931 BR-CO-14)."""
    amounts = [line.tax_amount for line in invoice.tax_breakdown]
    if not amounts or invoice.tax_total is None:
        return []
    if any(amount is None for amount in amounts):
        return ["tax breakdown has a rate without its tax amount"]
    breakdown = sum(amounts, Decimal(0))  # type: ignore[arg-type]
    if abs(breakdown - invoice.tax_total) > tolerance:
        return [f"tax breakdown sums to {breakdown}, tax total is {invoice.tax_total}"]
    return []


def payment_and_tax_reasons(
    invoice: Invoice, *, tolerance: Decimal = DEFAULT_TOLERANCE
) -> list[str]:
    return iban_reasons(invoice) + tax_breakdown_reasons(invoice, tolerance=tolerance)


def ground_payment_and_tax(
    invoice: Invoice, evidence: Evidence, update: dict[str, Any]
) -> list[str]:
    """`ground` for the payment, tax and address fields: drop what the text lacks.

    An IBAN is where the money goes, so a prompt-injected one is the costliest wrong
    value an LLM can produce; like every other field it must be printed on the document.
    """
    reasons: list[str] = []

    def drop(name: str, value: object) -> None:
        update[name] = None
        reasons.append(f"{name} {_show(value)} is not in the document text; dropped")

    for name in ("customer_tax_id", "iban", "bic"):
        if (value := getattr(invoice, name)) is not None and not evidence.has_identifier(value):
            drop(name, value)
    for name in ("vendor_address", "customer_address", "payment_terms"):
        if (value := getattr(invoice, name)) is not None and not evidence.has_name(value):
            drop(name, value)
    for name in ("service_period_start", "service_period_end"):
        if (value := getattr(invoice, name)) is not None and not evidence.has_date(value):
            drop(name, value)
    supported = [
        line
        for line in invoice.tax_breakdown
        if all(
            amount is None or evidence.has_amount(amount)
            for amount in (line.rate, line.taxable_amount, line.tax_amount)
        )
    ]
    if len(supported) != len(invoice.tax_breakdown):
        update["tax_breakdown"] = supported
        dropped = len(invoice.tax_breakdown) - len(supported)
        reasons.append(f"{dropped} tax breakdown line(s) not in the document text; dropped")
    return reasons
