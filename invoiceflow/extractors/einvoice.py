"""The e-invoice fast path: read the invoice's XML instead of asking anyone.

An e-invoice arrives bare (an XRechnung or Peppol ``.xml``) or embedded in a PDF/A-3
(Factur-X, ZUGFeRD 1.0 and 2.x, XRechnung hybrids). The XML is the legally binding
invoice, so its values are taken exactly: Decimal amounts as written, ISO dates, the
currency code as stated. No model, no heuristics, no cost.

* `read_einvoice_xml` reads a bare XML file or raises `EInvoiceError` with a kind:
  ``unsupported_document`` (not an invoice syntax we read; the root element is named),
  ``einvoice_invalid`` (not well-formed, forbidden XML constructs, an unreadable value,
  a missing header field) or ``too_large``. One that disagrees with its own arithmetic
  is still read, with the disagreements as review notes: there is no other text to
  fall back to, and a person must look.
* `read_embedded` reads a PDF's attachment. One that is invalid or disagrees with
  itself is not used: the caller reads the visible text instead and carries the
  returned notes as review reasons. Never a wrong value, never silent.

Parsing uses defusedxml (no entity declarations, no external references) on input no
larger than `MAX_XML_BYTES`; attachments are size-checked before they are inflated
(`einvoice_attachments`).

Imports nothing from Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal
from xml.etree import ElementTree
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException
from pydantic import ValidationError

from invoiceflow.extractors import Extraction
from invoiceflow.extractors.einvoice_attachments import (
    KNOWN_FILENAMES,
    AttachmentTooLarge,
    EmbeddedFile,
    xml_attachments,
)
from invoiceflow.extractors.einvoice_syntax import (
    CII_D16B,
    ZUGFERD_1,
    CiiReader,
    StatedFigures,
    SyntaxRead,
    SyntaxReadError,
    UblReader,
    text_at,
)
from invoiceflow.schema import Invoice

log = logging.getLogger(__name__)

__all__ = [
    "KNOWN_FILENAMES",
    "MAX_XML_BYTES",
    "MAX_XML_ELEMENTS",
    "EInvoiceError",
    "EmbeddedFile",
    "EmbeddedRead",
    "embedded_xml_files",
    "inconsistencies",
    "parse_einvoice_xml",
    "read_einvoice",
    "read_einvoice_xml",
    "read_embedded",
]

NAME = "einvoice"
# Real e-invoices are kilobytes; XRechnung may carry base64 attachments inside, hence
# megabytes, not more.
MAX_XML_BYTES: Final = 10_000_000
# A 2,000-line invoice has ~80,000 elements; the bound keeps a parse under ~1 s.
MAX_XML_ELEMENTS: Final = 200_000
# EN 16931 amounts have two decimals; a sum of rounded values may be a cent off.
TOLERANCE: Final = Decimal("0.01")

CII_NS: Final = "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100"
ZUGFERD_1_NS: Final = "urn:ferd:CrossIndustryDocument:invoice:1p0"
UBL_INVOICE_NS: Final = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
UBL_CREDIT_NOTE_NS: Final = "urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2"
# Business documents that are not invoices, named so the refusal says what they are.
_NOT_INVOICES: Final = {
    "{urn:un:unece:uncefact:data:SCRDMCCBDACIOMessageStructure:100}"
    "SCRDMCCBDACIOMessageStructure": "an Order-X order",
    "{urn:oasis:names:specification:ubl:schema:xsd:Order-2}Order": "a UBL order",
    "{urn:oasis:names:specification:ubl:schema:xsd:OrderResponse-2}OrderResponse": (
        "a UBL order response"
    ),
    "{urn:oasis:names:specification:ubl:schema:xsd:DespatchAdvice-2}DespatchAdvice": (
        "a UBL despatch advice"
    ),
}
_REQUIRED: Final = ("invoice_number", "invoice_date", "currency", "total")
# Longest header text accepted, by field ("" for the rest): identifiers and names are
# short; payment terms and addresses may be a paragraph.
_MAX_TEXT: Final = {
    "": 1_000,
    "payment_terms": 4_000,
    "vendor_address": 2_000,
    "customer_address": 2_000,
}

EInvoiceErrorKind = Literal["unsupported_document", "einvoice_invalid", "too_large"]


class EInvoiceError(ValueError):
    """The XML is not an e-invoice we read exactly; ``kind`` says why (permanent)."""

    def __init__(self, message: str, *, kind: EInvoiceErrorKind = "einvoice_invalid") -> None:
        super().__init__(message)
        self.kind: EInvoiceErrorKind = kind

    def __reduce__(self) -> tuple[object, ...]:
        # Crosses process boundaries (the document worker pool) with its kind intact.
        return (_rebuild_error, (str(self), self.kind))


def _rebuild_error(message: str, kind: EInvoiceErrorKind) -> EInvoiceError:
    return EInvoiceError(message, kind=kind)


# --- bare XML ---------------------------------------------------------------------------------


def read_einvoice_xml(xml_bytes: bytes, name: str = "") -> Extraction:
    """The invoice a bare e-invoice XML states, exactly. Raises `EInvoiceError`."""
    read = _read_parsed(_parse(xml_bytes), name)
    return read.extraction(read.disagreements + read.notes)


def parse_einvoice_xml(data: bytes, *, filename: str = "") -> tuple[Invoice, str]:
    """(invoice, format) from e-invoice XML, e.g. (…, "factur-x"). Raises `EInvoiceError`."""
    read = _read_parsed(_parse(data), filename)
    return read.invoice, read.fmt


@dataclass(frozen=True)
class _Read:
    invoice: Invoice
    fmt: str
    # Totals that disagree with each other: an embedded XML like this is not used.
    disagreements: tuple[str, ...]
    # Optional values left out because they could not be read exactly.
    notes: tuple[str, ...]

    def extraction(self, notes: tuple[str, ...]) -> Extraction:
        return Extraction(
            invoice=self.invoice,
            source="einvoice",
            extractor=NAME,
            einvoice_format=self.fmt,
            notes=notes,
        )


def _read_parsed(root: Element, name: str) -> _Read:
    read, fmt = _read_root(root, name)
    missing = [field for field in _REQUIRED if getattr(read.invoice, field) is None]
    if missing:
        raise EInvoiceError(f"{fmt} XML states no {', '.join(missing)}")
    for field, value in read.invoice:
        limit = _MAX_TEXT.get(field, _MAX_TEXT[""])
        if isinstance(value, str) and len(value) > limit:
            # Header values travel into the manifest and every table: a megabyte
            # "invoice number" is an attack on those, not an invoice.
            raise EInvoiceError(f"{field} is {len(value)} characters long (limit {limit})")
    return _Read(read.invoice, fmt, tuple(inconsistencies(read.stated)), read.notes)


def _parse(data: bytes) -> Element:
    if len(data) > MAX_XML_BYTES:
        raise EInvoiceError(
            f"XML is {len(data)} bytes, over the {MAX_XML_BYTES} byte limit", kind="too_large"
        )
    parser = SafeET.XMLParser(target=_BoundedTreeBuilder(MAX_XML_ELEMENTS))
    try:
        parser.feed(_without_leading_space(data))
        return parser.close()
    except _TooManyElements as exc:
        raise EInvoiceError(
            f"XML has more than {MAX_XML_ELEMENTS} elements", kind="too_large"
        ) from exc
    except DefusedXmlException as exc:
        raise EInvoiceError(f"XML uses forbidden constructs: {exc!r}") from exc
    except (SafeET.ParseError, ValueError, LookupError) as exc:
        # LookupError: the declaration names an encoding Python does not know.
        raise EInvoiceError(f"not well-formed XML: {exc}") from exc


def _without_leading_space(data: bytes) -> bytes:
    """Blank lines before ``<?xml`` (common in exported files) are not an error worth
    refusing an invoice for; expat would reject them."""
    body = data.removeprefix(b"\xef\xbb\xbf")
    stripped = body.lstrip(b" \t\r\n")
    return stripped if stripped is not body and stripped.startswith(b"<") else data


class _TooManyElements(Exception):
    pass


class _BoundedTreeBuilder(ElementTree.TreeBuilder):
    """Stops the parse at the element bound.

    defusedxml's parser runs its callbacks in Python: 10 MB of ``<a/>`` took 16 s and
    195 MB to build; real e-invoices have a few thousand elements.
    """

    def __init__(self, max_elements: int) -> None:
        super().__init__()
        self.left = max_elements

    def start(self, tag: str, attrs: dict[str, str]) -> Element:
        self.left -= 1
        if self.left < 0:
            raise _TooManyElements
        return super().start(tag, attrs)


def _read_root(root: Element, filename: str) -> tuple[SyntaxRead, str]:
    try:
        if root.tag == f"{{{CII_NS}}}CrossIndustryInvoice":
            return CiiReader(root, CII_D16B).read(), _cii_format(root, filename)
        if root.tag == f"{{{ZUGFERD_1_NS}}}CrossIndustryDocument":
            return CiiReader(root, ZUGFERD_1).read(), "zugferd-1"
        if root.tag in (f"{{{UBL_INVOICE_NS}}}Invoice", f"{{{UBL_CREDIT_NOTE_NS}}}CreditNote"):
            return UblReader(root).read(), _ubl_format(root)
    except SyntaxReadError as exc:
        raise EInvoiceError(str(exc)) from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise EInvoiceError(f"values do not fit the invoice schema: {problems}") from exc
    what = _NOT_INVOICES.get(root.tag, "not an e-invoice")
    # Cut short: a hostile megabyte tag would become the failure reason in the manifest.
    tag = root.tag if len(root.tag) <= 200 else f"{root.tag[:200]}..."
    raise EInvoiceError(
        f"root element {tag!r} is {what}; read are UBL 2.1 Invoice/CreditNote, "
        "UN/CEFACT CrossIndustryInvoice and ZUGFeRD 1.0 CrossIndustryDocument",
        kind="unsupported_document",
    )


def _cii_format(root: Element, filename: str) -> str:
    guideline = (
        text_at(root, "ExchangedDocumentContext/GuidelineSpecifiedDocumentContextParameter/ID")
        or ""
    ).lower()
    name = filename.lower()
    for fmt in ("xrechnung", "zugferd", "factur-x"):
        if fmt in guideline or fmt in name:
            return "xrechnung-cii" if fmt == "xrechnung" else fmt
    return "cii"


def _ubl_format(root: Element) -> str:
    customization = (text_at(root, "CustomizationID") or "").lower()
    if "xrechnung" in customization:
        return "xrechnung-ubl"
    if "peppol" in customization:
        return "peppol-ubl"
    return "ubl"


# --- the document checked against itself ----------------------------------------------------


def inconsistencies(stated: StatedFigures, tolerance: Decimal = TOLERANCE) -> list[str]:
    """Where a document's totals disagree with its own lines and each other.

    EN 16931 BR-CO-10 (lines sum to the line total), BR-CO-13 (tax basis), BR-CO-14
    (VAT breakdown sums to the tax total), BR-CO-15 (grand total) and BR-CO-16 (amount
    due). The rounding amount is accepted in the grand total too: generic UBL 2.1
    documents put it there. Line quantity x price is not among them (EN 16931 states
    no such rule); `validate.check_invoice` flags it for review on every invoice.
    """
    s, found = stated, []
    amounts = s.line_amounts
    if s.line_total is not None and amounts and all(a is not None for a in amounts):
        lines = sum(amounts, Decimal(0))  # type: ignore[arg-type]
        if abs(lines - s.line_total) > tolerance:
            found.append(f"line amounts sum to {lines}, its line total is {s.line_total}")
    if s.line_total is not None and s.tax_basis_total is not None:
        basis = s.line_total - (s.allowance_total or 0) + (s.charge_total or 0)
        if abs(basis - s.tax_basis_total) > tolerance:
            found.append(
                f"line total {s.line_total} - allowances {s.allowance_total or 0} + charges "
                f"{s.charge_total or 0} = {basis}, its tax basis is {s.tax_basis_total}"
            )
    taxes = [t.tax_amount for t in s.tax_breakdown]
    if taxes and all(t is not None for t in taxes) and s.tax_total is not None:
        tax_sum = sum(taxes, Decimal(0))  # type: ignore[arg-type]
        if abs(tax_sum - s.tax_total) > tolerance:
            found.append(f"VAT breakdown sums to {tax_sum}, its tax total is {s.tax_total}")
    rounding = s.rounding or Decimal(0)
    if s.tax_basis_total is not None and s.grand_total is not None:
        grand = s.tax_basis_total + (s.tax_total or 0)
        if not _near(s.grand_total, (grand, grand + rounding), tolerance):
            found.append(f"tax basis + tax = {grand}, its grand total is {s.grand_total}")
    if s.grand_total is not None and s.due_payable is not None:
        due = s.grand_total - (s.prepaid or 0)
        if not _near(s.due_payable, (due + rounding, due), tolerance):
            found.append(
                f"grand total - prepaid + rounding = {due + rounding}, it says {s.due_payable} due"
            )
    return found


def _near(value: Decimal, candidates: tuple[Decimal, ...], tolerance: Decimal) -> bool:
    return any(abs(value - c) <= tolerance for c in candidates)


# --- XML embedded in a PDF ------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedRead:
    """What a PDF's e-invoice attachment gave: the invoice, or why it was not used.

    ``notes`` are review reasons for the text-path result when ``extraction`` is None
    because an attachment was invalid or disagreed with itself.
    """

    extraction: Extraction | None
    notes: tuple[str, ...] = ()


def read_embedded(pdf: bytes) -> EmbeddedRead:
    """The invoice from a PDF's e-invoice attachment, or None with review notes.

    Raises `EInvoiceError` ``too_large`` for an attachment past `MAX_XML_BYTES`
    (declared, stored or inflated), and ``unsupported_document`` when the PDF carries a
    business document that is not an invoice (e.g. an Order-X order) and no invoice.
    """
    notes: list[str] = []
    other_documents: list[str] = []
    for file in _attachments(pdf):
        try:
            if file.problem is not None:
                raise EInvoiceError(file.problem)
            root = _parse(file.data)
            if root.tag in _NOT_INVOICES:
                other_documents.append(f"{file.name} is {_NOT_INVOICES[root.tag]}")
                continue
            read = _read_parsed(root, file.name)
        except EInvoiceError as exc:
            if exc.kind != "unsupported_document":  # else: some other XML, not for us
                notes.append(f"embedded {file.name} is not usable ({exc}); read from the text")
            continue
        if read.disagreements:
            notes.append(
                f"embedded {file.name} disagrees with itself ({'; '.join(read.disagreements)}); "
                "read from the text"
            )
            continue
        return EmbeddedRead(read.extraction(read.notes))
    if other_documents and not notes:
        raise EInvoiceError(
            f"not an invoice: attachment {'; '.join(other_documents)}", kind="unsupported_document"
        )
    for note in notes:
        log.warning("%s", note)
    return EmbeddedRead(None, tuple(notes))


def read_einvoice(pdf: bytes) -> Extraction | None:
    """The invoice from the PDF's embedded e-invoice XML, or None. Never raises.

    Callers that can carry review reasons and fail an invoice use `read_embedded`.
    """
    try:
        return read_embedded(pdf).extraction
    except EInvoiceError as exc:
        log.warning("no e-invoice read from the PDF: %s", exc)
        return None


def embedded_xml_files(pdf: bytes) -> list[EmbeddedFile]:
    """XML attachments of a PDF, the standard names first, each checked before decoding.

    Raises `EInvoiceError` ``too_large`` for one past `MAX_XML_BYTES`; a broken PDF
    has none.
    """
    return list(_attachments(pdf))


def _attachments(pdf: bytes) -> Iterator[EmbeddedFile]:
    """Decoded one at a time, so only one attachment is in memory at once."""
    try:
        yield from xml_attachments(pdf, MAX_XML_BYTES)
    except AttachmentTooLarge as exc:
        raise EInvoiceError(str(exc), kind="too_large") from exc
