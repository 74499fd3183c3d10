"""The e-invoice fast path: read the XML a PDF carries instead of asking anyone.

Factur-X and ZUGFeRD embed a UN/CEFACT Cross Industry Invoice (CII) in a PDF/A-3;
XRechnung is CII or OASIS UBL 2.1 (as a PDF attachment when sent as a hybrid). The
XML is the legally binding invoice, so its values are taken exactly: Decimal amounts
as written, ISO dates, the currency code as stated. No model, no heuristics, no cost.

Parsing uses defusedxml: the XML is untrusted input (no entity expansion, no DTDs).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Final
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException
from pydantic import ValidationError
from pypdf import PdfReader

from invoiceflow.extractors import Extraction
from invoiceflow.schema import Invoice, LineItem

log = logging.getLogger(__name__)

NAME = "einvoice"
# File names the standards prescribe; any other *.xml attachment is tried after them.
KNOWN_FILENAMES: Final = (
    "factur-x.xml",
    "zugferd-invoice.xml",
    "xrechnung.xml",
    "ZUGFeRD-invoice.xml",
)
MAX_XML_BYTES: Final = 10_000_000

CII_NS: Final = {
    "rsm": "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100",
    "ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100",
    "udt": "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100",
}
UBL_INVOICE_NS: Final = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
UBL_CREDIT_NOTE_NS: Final = "urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2"
UBL_NS: Final = {
    "cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2",
    "cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2",
}
_MONEY_PLACES: Final = Decimal("0.0001")


class EInvoiceError(ValueError):
    """The XML is not a CII or UBL invoice we can read."""


@dataclass(frozen=True)
class EmbeddedFile:
    name: str
    data: bytes


def embedded_xml_files(pdf: bytes) -> list[EmbeddedFile]:
    """XML attachments of a PDF, the standard names first. Never raises."""
    try:
        reader = PdfReader(io.BytesIO(pdf), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            return []
        attachments = reader.attachments
        files = [
            EmbeddedFile(name, data)
            for name in attachments
            if name.lower().endswith(".xml")
            for data in attachments[name]
            if len(data) <= MAX_XML_BYTES
        ]
    except Exception as exc:  # a broken PDF simply has no usable attachment
        log.debug("no attachments readable: %s", exc)
        return []
    known = {n.lower(): i for i, n in enumerate(KNOWN_FILENAMES)}
    return sorted(files, key=lambda f: known.get(f.name.lower(), len(known)))


def read_einvoice(pdf: bytes) -> Extraction | None:
    """The invoice from the PDF's embedded CII/UBL XML, or None if it has none.

    A broken or foreign XML attachment is logged and skipped: the text path still
    works for that PDF.
    """
    for file in embedded_xml_files(pdf):
        try:
            invoice, fmt = parse_einvoice_xml(file.data, filename=file.name)
        except EInvoiceError as exc:
            log.warning("embedded %s is not a usable e-invoice: %s", file.name, exc)
            continue
        return Extraction(invoice=invoice, source="einvoice", extractor=NAME, einvoice_format=fmt)
    return None


def parse_einvoice_xml(data: bytes, *, filename: str = "") -> tuple[Invoice, str]:
    """(invoice, format) from CII or UBL XML; format is e.g. "factur-x", "xrechnung-ubl"."""
    try:
        root = SafeET.fromstring(data)
    except (SafeET.ParseError, DefusedXmlException, ValueError) as exc:
        raise EInvoiceError(f"not well-formed XML: {exc}") from exc
    try:
        if root.tag == f"{{{CII_NS['rsm']}}}CrossIndustryInvoice":
            return _Cii(root).invoice(), _cii_format(root, filename)
        if root.tag in (f"{{{UBL_INVOICE_NS}}}Invoice", f"{{{UBL_CREDIT_NOTE_NS}}}CreditNote"):
            return _Ubl(root).invoice(), _ubl_format(root)
    except ValidationError as exc:
        raise EInvoiceError(f"values do not fit the invoice schema: {exc}") from exc
    raise EInvoiceError(f"root element {root.tag!r} is neither CII nor UBL")


# --- shared helpers -------------------------------------------------------------------------


def _text(element: Element | None) -> str | None:
    if element is None or element.text is None:
        return None
    text = element.text.strip()
    return text or None


def _decimal(element: Element | None, what: str) -> Decimal | None:
    text = _text(element)
    if text is None:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise EInvoiceError(f"{what} {text!r} is not a decimal number") from exc
    if not value.is_finite():
        raise EInvoiceError(f"{what} {text!r} is not a finite number")
    return value


def _money(element: Element | None, what: str) -> Decimal | None:
    value = _decimal(element, what)
    if value is None:
        return None
    if value != value.quantize(_MONEY_PLACES):
        # Unit prices may carry more decimals than the schema's four; exact values
        # beyond that are not money we can represent, so the read fails loudly.
        raise EInvoiceError(f"{what} {value} has more than 4 decimal places")
    return value


def _date(text: str | None, fmt: str, what: str) -> dt.date | None:
    if text is None:
        return None
    try:
        return dt.datetime.strptime(text, fmt).date()
    except ValueError as exc:
        raise EInvoiceError(f"{what} {text!r} is not a {fmt} date") from exc


# --- UN/CEFACT CII (Factur-X, ZUGFeRD, XRechnung CII) ---------------------------------------


def _cii_format(root: Element, filename: str) -> str:
    guideline = (
        _text(
            root.find(
                "rsm:ExchangedDocumentContext/ram:GuidelineSpecifiedDocumentContextParameter/ram:ID",
                CII_NS,
            )
        )
        or ""
    ).lower()
    name = filename.lower()
    if "xrechnung" in guideline or "xrechnung" in name:
        return "xrechnung-cii"
    if "zugferd" in guideline or "zugferd" in name:
        return "zugferd"
    if "factur-x" in guideline or "factur-x" in name:
        return "factur-x"
    return "cii"


class _Cii:
    def __init__(self, root: Element) -> None:
        self.root = root
        self.trade = root.find("rsm:SupplyChainTradeTransaction", CII_NS)
        if self.trade is None:
            raise EInvoiceError("CII without SupplyChainTradeTransaction")

    @staticmethod
    def _find(path: str, base: Element | None) -> Element | None:
        return None if base is None else base.find(path, CII_NS)

    def _date(self, element: Element | None, what: str) -> dt.date | None:
        if element is None:
            return None
        fmt = element.get("format", "102")
        if fmt != "102":
            raise EInvoiceError(f"{what} uses date format {fmt}, expected 102 (YYYYMMDD)")
        return _date(_text(element), "%Y%m%d", what)

    def invoice(self) -> Invoice:
        doc = self.root.find("rsm:ExchangedDocument", CII_NS)
        agreement = self._find("ram:ApplicableHeaderTradeAgreement", self.trade)
        settlement = self._find("ram:ApplicableHeaderTradeSettlement", self.trade)
        seller = self._find("ram:SellerTradeParty", agreement)
        buyer = self._find("ram:BuyerTradeParty", agreement)
        summary = self._find("ram:SpecifiedTradeSettlementHeaderMonetarySummation", settlement)
        currency = _text(self._find("ram:InvoiceCurrencyCode", settlement))
        return Invoice(
            invoice_number=_text(self._find("ram:ID", doc)),
            invoice_date=self._date(
                self._find("ram:IssueDateTime/udt:DateTimeString", doc), "IssueDateTime"
            ),
            due_date=self._date(
                self._find(
                    "ram:SpecifiedTradePaymentTerms/ram:DueDateDateTime/udt:DateTimeString",
                    settlement,
                ),
                "DueDateDateTime",
            ),
            vendor_name=_text(self._find("ram:Name", seller)),
            vendor_tax_id=self._tax_id(seller),
            customer_name=_text(self._find("ram:Name", buyer)),
            po_number=_text(
                self._find("ram:BuyerOrderReferencedDocument/ram:IssuerAssignedID", agreement)
            ),
            currency=currency,
            subtotal=_money(self._find("ram:TaxBasisTotalAmount", summary), "TaxBasisTotalAmount"),
            tax_total=self._tax_total(summary, currency),
            total=_money(self._find("ram:GrandTotalAmount", summary), "GrandTotalAmount"),
            amount_due=_money(self._find("ram:DuePayableAmount", summary), "DuePayableAmount"),
            line_items=list(self._lines()),
        )

    def _tax_id(self, party: Element | None) -> str | None:
        if party is None:
            return None
        registrations = party.findall("ram:SpecifiedTaxRegistration/ram:ID", CII_NS)
        # VAT number ("VA") first, then the fiscal number ("FC").
        for scheme in ("VA", "FC"):
            for element in registrations:
                if element.get("schemeID") == scheme and _text(element):
                    return _text(element)
        return None

    def _tax_total(self, summary: Element | None, currency: str | None) -> Decimal | None:
        if summary is None:
            return None
        amounts = summary.findall("ram:TaxTotalAmount", CII_NS)
        # A second TaxTotalAmount may state the tax in the accounting currency.
        for element in amounts:
            if element.get("currencyID") in (None, currency):
                return _money(element, "TaxTotalAmount")
        return None

    def _lines(self) -> Iterator[LineItem]:
        assert self.trade is not None
        for line in self.trade.findall("ram:IncludedSupplyChainTradeLineItem", CII_NS):
            yield LineItem(
                description=_text(line.find("ram:SpecifiedTradeProduct/ram:Name", CII_NS)) or "",
                quantity=_decimal(
                    line.find("ram:SpecifiedLineTradeDelivery/ram:BilledQuantity", CII_NS),
                    "BilledQuantity",
                ),
                unit_price=_money(
                    line.find(
                        "ram:SpecifiedLineTradeAgreement/ram:NetPriceProductTradePrice/"
                        "ram:ChargeAmount",
                        CII_NS,
                    ),
                    "ChargeAmount",
                ),
                amount=_money(
                    line.find(
                        "ram:SpecifiedLineTradeSettlement/"
                        "ram:SpecifiedTradeSettlementLineMonetarySummation/ram:LineTotalAmount",
                        CII_NS,
                    ),
                    "LineTotalAmount",
                ),
            )


# --- OASIS UBL 2.1 (XRechnung UBL, Peppol BIS) ------------------------------------------------


def _ubl_format(root: Element) -> str:
    customization = (_text(root.find("cbc:CustomizationID", UBL_NS)) or "").lower()
    if "xrechnung" in customization:
        return "xrechnung-ubl"
    if "peppol" in customization:
        return "peppol-ubl"
    return "ubl"


class _Ubl:
    def __init__(self, root: Element) -> None:
        self.root = root
        self.credit_note = root.tag.endswith("}CreditNote")

    def _find(self, path: str, base: Element | None = None, *, root: bool = True) -> Element | None:
        if base is None:
            return self.root.find(path, UBL_NS) if root else None
        return base.find(path, UBL_NS)

    def _party(self, role: str) -> tuple[str | None, str | None]:
        party = self._find(f"cac:{role}/cac:Party")
        if party is None:
            return None, None
        name = _text(party.find("cac:PartyLegalEntity/cbc:RegistrationName", UBL_NS)) or _text(
            party.find("cac:PartyName/cbc:Name", UBL_NS)
        )
        tax_id = _text(party.find("cac:PartyTaxScheme/cbc:CompanyID", UBL_NS))
        return name, tax_id

    def invoice(self) -> Invoice:
        vendor_name, vendor_tax_id = self._party("AccountingSupplierParty")
        customer_name, _ = self._party("AccountingCustomerParty")
        currency = _text(self._find("cbc:DocumentCurrencyCode"))
        totals = self._find("cac:LegalMonetaryTotal")
        due = _text(self._find("cbc:DueDate")) or _text(
            self._find("cac:PaymentMeans/cbc:PaymentDueDate")
        )
        return Invoice(
            invoice_number=_text(self._find("cbc:ID")),
            invoice_date=_date(_text(self._find("cbc:IssueDate")), "%Y-%m-%d", "IssueDate"),
            due_date=_date(due, "%Y-%m-%d", "DueDate"),
            vendor_name=vendor_name,
            vendor_tax_id=vendor_tax_id,
            customer_name=customer_name,
            po_number=_text(self._find("cac:OrderReference/cbc:ID")),
            currency=currency,
            subtotal=self._total(totals, "TaxExclusiveAmount"),
            tax_total=self._tax_total(currency),
            total=self._total(totals, "TaxInclusiveAmount"),
            amount_due=self._total(totals, "PayableAmount"),
            line_items=list(self._lines()),
        )

    def _total(self, totals: Element | None, name: str) -> Decimal | None:
        return _money(self._find(f"cbc:{name}", totals, root=False), name)

    def _tax_total(self, currency: str | None) -> Decimal | None:
        for element in self.root.findall("cac:TaxTotal/cbc:TaxAmount", UBL_NS):
            if element.get("currencyID") in (None, currency):
                return _money(element, "TaxAmount")
        return None

    def _lines(self) -> Iterator[LineItem]:
        line_tag, quantity_tag = (
            ("cac:CreditNoteLine", "cbc:CreditedQuantity")
            if self.credit_note
            else ("cac:InvoiceLine", "cbc:InvoicedQuantity")
        )
        for line in self.root.findall(line_tag, UBL_NS):
            yield LineItem(
                description=_text(line.find("cac:Item/cbc:Name", UBL_NS)) or "",
                quantity=_decimal(line.find(quantity_tag, UBL_NS), "quantity"),
                unit_price=_money(line.find("cac:Price/cbc:PriceAmount", UBL_NS), "PriceAmount"),
                amount=_money(line.find("cbc:LineExtensionAmount", UBL_NS), "LineExtensionAmount"),
            )
