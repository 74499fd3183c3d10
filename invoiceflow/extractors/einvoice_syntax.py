"""Reading the two e-invoice syntaxes EN 16931 allows into an `Invoice`, exactly.

* UN/CEFACT Cross Industry Invoice (CII D16B): Factur-X, ZUGFeRD 2.x, XRechnung CII;
  and its predecessor, ZUGFeRD 1.0's ``CrossIndustryDocument`` (same business terms,
  older element names, e.g. ``ApplicableSupplyChainTradeSettlement`` for
  ``ApplicableHeaderTradeSettlement``).
* OASIS UBL 2.1 ``Invoice`` and ``CreditNote``: XRechnung UBL, Peppol BIS Billing 3.0.

Paths match local names in any namespace (``{*}``): the root's namespace decides the
syntax; the versions of the ``ram``/``udt``/``cac``/``cbc`` namespaces a producer
writes do not change what an element means.

Besides the `Invoice`, each reader returns the figures the document states about
itself (`StatedFigures`), so `einvoice.inconsistencies` can check the document
against its own arithmetic before any of it is trusted.

Imports nothing from Prefect.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any, Final
from xml.etree.ElementTree import Element

from invoiceflow.schema import DocumentType, Invoice, LineItem, TaxBreakdown

_MONEY_PLACES: Final = Decimal("0.0001")
# UNTDID 1001 document types that are credit notes (EN 16931 code list for BT-3).
CREDIT_NOTE_TYPE_CODES: Final = frozenset(
    {"81", "83", "261", "262", "296", "308", "381", "396", "420", "458", "532"}
)
# Sub-lines (Factur-X/ZUGFeRD Extended) that are not summed into the line total.
_NOT_SUMMED_LINE_STATUS: Final = frozenset({"DETAIL", "INFORMATION"})
_IBAN_SHAPE: Final = re.compile(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}")
# What stands in the purchase order reference (BT-13) when there is none: UBL requires
# cac:OrderReference/cbc:ID, so a document with only a sales order reference (BT-14)
# writes "NA" there (Peppol BIS 3 sales-order example); producers also write "N/A".
_NO_ORDER_REFERENCE: Final = frozenset({"NA", "N/A"})
# Longest number read: money has at most 18 digits, quantities and rates far fewer. A
# megabyte "quantity" would travel into the result, its review reasons and the manifest.
_MAX_NUMBER_CHARS: Final = 100
# How much of an unreadable value a message quotes: messages become failure reasons.
_MAX_QUOTED_CHARS: Final = 40


class SyntaxReadError(ValueError):
    """A value in a recognised e-invoice cannot be read exactly."""


@dataclass(frozen=True)
class StatedFigures:
    """The totals a document states (EN 16931 BG-22), to check it against itself."""

    # Net amounts of the lines summed into the line total (BT-131), None where absent.
    line_amounts: tuple[Decimal | None, ...] = ()
    line_total: Decimal | None = None
    allowance_total: Decimal | None = None
    charge_total: Decimal | None = None
    tax_basis_total: Decimal | None = None
    tax_total: Decimal | None = None
    grand_total: Decimal | None = None
    prepaid: Decimal | None = None
    rounding: Decimal | None = None
    due_payable: Decimal | None = None
    tax_breakdown: tuple[TaxBreakdown, ...] = field(default=())

    def invoice_fields(
        self, currency: str | None, line_items: Iterable[LineItem]
    ) -> dict[str, Any]:
        """The `Invoice` money fields these figures state, with the currency and lines."""
        return {
            "currency": currency,
            "subtotal": self.tax_basis_total,
            "tax_total": self.tax_total,
            "total": self.grand_total,
            "amount_due": self.due_payable,
            "line_items": list(line_items),
        }


@dataclass(frozen=True)
class SyntaxRead:
    invoice: Invoice
    stated: StatedFigures
    type_code: str | None
    # Optional values that could not be read exactly and were left out (review reasons).
    notes: tuple[str, ...] = ()


# --- element helpers ------------------------------------------------------------------------


@cache
def _wild(path: str) -> str:
    """ "A/B" -> "{*}A/{*}B": match local names whatever the namespace."""
    return "/".join(part if part in (".", "..") else "{*}" + part for part in path.split("/"))


def find(base: Element | None, path: str) -> Element | None:
    return None if base is None else base.find(_wild(path))


def find_all(base: Element | None, path: str) -> list[Element]:
    return [] if base is None else base.findall(_wild(path))


def text(element: Element | None) -> str | None:
    if element is None or element.text is None:
        return None
    value = " ".join(element.text.split())
    return value or None


def text_at(base: Element | None, path: str) -> str | None:
    return text(find(base, path))


def _quoted(value: str) -> str:
    """``value`` quoted for a message, cut short when it is long."""
    if len(value) <= _MAX_QUOTED_CHARS:
        return repr(value)
    return f"{value[:_MAX_QUOTED_CHARS]!r}... ({len(value)} characters)"


def decimal(element: Element | None, what: str) -> Decimal | None:
    value = text(element)
    if value is None:
        return None
    if len(value) > _MAX_NUMBER_CHARS:
        raise SyntaxReadError(f"{what} {_quoted(value)} is too long to be a number")
    try:
        number = Decimal(value)
    except InvalidOperation as exc:
        raise SyntaxReadError(f"{what} {_quoted(value)} is not a decimal number") from exc
    if not number.is_finite():
        raise SyntaxReadError(f"{what} {_quoted(value)} is not a finite number")
    return number


def money(element: Element | None, what: str) -> Decimal | None:
    value = decimal(element, what)
    if value is None:
        return None
    try:
        exact = value.quantize(_MONEY_PLACES)
    except InvalidOperation as exc:  # more digits than the context holds: "1E+40"
        raise SyntaxReadError(f"{what} {value} is not an amount") from exc
    if value != exact:
        # Rounding would change a legally binding amount: refuse instead.
        raise SyntaxReadError(f"{what} {value} has more than 4 decimal places")
    return value


def iso_date(value: str | None, what: str) -> dt.date | None:
    """xs:date as UBL writes it: YYYY-MM-DD, optionally with a time zone (+01:00, Z)."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2})(Z|[+-]\d{2}:\d{2})?", value)
    try:
        if match is None:
            raise ValueError(value)
        return dt.date.fromisoformat(match.group(1))
    except ValueError as exc:
        raise SyntaxReadError(f"{what} {_quoted(value)} is not an ISO date") from exc


def cii_date(element: Element | None, what: str) -> dt.date | None:
    """udt:DateTimeString; EN 16931 allows only format 102 (YYYYMMDD) for dates.

    An ISO date (YYYY-MM-DD) in its place is unambiguous and read too; anything else
    (e.g. format 610, a month) is not a day and is refused.
    """
    value = text(element)
    if element is None or value is None:
        return None
    fmt = element.get("format", "102")
    if fmt == "102" and re.fullmatch(r"\d{8}", value):
        try:
            return dt.datetime.strptime(value, "%Y%m%d").date()
        except ValueError as exc:
            raise SyntaxReadError(f"{what} {_quoted(value)} is not a YYYYMMDD date") from exc
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return iso_date(value, what)
    raise SyntaxReadError(
        f"{what} {_quoted(value)} (format {fmt[:_MAX_QUOTED_CHARS]}) is not a YYYYMMDD date"
    )


class OptionalValues:
    """Reads optional values; one that cannot be read is left out with a note.

    A due date in a format that is not a day must not make the whole e-invoice
    unreadable, and must not pass unnoticed either.
    """

    def __init__(self) -> None:
        self.notes: list[str] = []

    def date(self, read: Callable[[], dt.date | None]) -> dt.date | None:
        try:
            return read()
        except SyntaxReadError as exc:
            self.notes.append(f"{exc}; left out")
            return None


def in_currency(elements: list[Element], currency: str | None, what: str) -> Decimal | None:
    """The amount stated in the document currency (a second one may be the tax currency)."""
    for element in elements:
        if element.get("currencyID") in (None, currency):
            return money(element, what)
    return None


def iban(value: str | None) -> str | None:
    """An account identifier as an IBAN (no spaces), or None when it is not one."""
    if value is None:
        return None
    compact = re.sub(r"\s+", "", value).upper()
    return compact if _IBAN_SHAPE.fullmatch(compact) else None


def order_reference(value: str | None) -> str | None:
    """A purchase order reference (BT-13), or None for a placeholder standing in for none."""
    if value is None or value.upper() in _NO_ORDER_REFERENCE:
        return None
    return value


def tax_identifier(value: str | None) -> str | None:
    """A tax registration as an identifier, or None for a statement without digits.

    Peppol BIS 3 has sellers state "Foretaksregisteret" (NO-R-002) or "Godkänd för
    F-skatt" (SE-R-005) where EN 16931 puts the tax registration identifier (BT-32);
    every VAT or tax number has digits.
    """
    return value if value is not None and any(ch.isdigit() for ch in value) else None


def join_address(parts: list[str | None]) -> str | None:
    return ", ".join(p for p in parts if p) or None


def document_type(type_code: str | None, *, credit_note_root: bool = False) -> DocumentType:
    return "credit_note" if credit_note_root or type_code in CREDIT_NOTE_TYPE_CODES else "invoice"


# --- UN/CEFACT CII and ZUGFeRD 1.0 ------------------------------------------------------------


@dataclass(frozen=True)
class CiiDialect:
    """Element names that differ between CII D16B and ZUGFeRD 1.0 (CII D13B draft)."""

    document: str
    transaction: str
    agreement: str
    delivery: str
    settlement: str
    summation: str
    line_agreement: str
    line_delivery: str
    line_settlement: str
    line_summation: str
    rate: str


CII_D16B: Final = CiiDialect(
    document="ExchangedDocument",
    transaction="SupplyChainTradeTransaction",
    agreement="ApplicableHeaderTradeAgreement",
    delivery="ApplicableHeaderTradeDelivery",
    settlement="ApplicableHeaderTradeSettlement",
    summation="SpecifiedTradeSettlementHeaderMonetarySummation",
    line_agreement="SpecifiedLineTradeAgreement",
    line_delivery="SpecifiedLineTradeDelivery",
    line_settlement="SpecifiedLineTradeSettlement",
    line_summation="SpecifiedTradeSettlementLineMonetarySummation",
    rate="RateApplicablePercent",
)
ZUGFERD_1: Final = CiiDialect(
    document="HeaderExchangedDocument",
    transaction="SpecifiedSupplyChainTradeTransaction",
    agreement="ApplicableSupplyChainTradeAgreement",
    delivery="ApplicableSupplyChainTradeDelivery",
    settlement="ApplicableSupplyChainTradeSettlement",
    summation="SpecifiedTradeSettlementMonetarySummation",
    line_agreement="SpecifiedSupplyChainTradeAgreement",
    line_delivery="SpecifiedSupplyChainTradeDelivery",
    line_settlement="SpecifiedSupplyChainTradeSettlement",
    line_summation="SpecifiedTradeSettlementMonetarySummation",
    rate="ApplicablePercent",
)


class CiiReader:
    def __init__(self, root: Element, dialect: CiiDialect) -> None:
        self.d = dialect
        self.doc = find(root, dialect.document)
        self.trade = find(root, dialect.transaction)
        self.agreement = find(self.trade, dialect.agreement)
        self.settlement = find(self.trade, dialect.settlement)
        self.summation = find(self.settlement, dialect.summation)
        # BT-5 is mandatory; when a producer omits it, the grand total's own currencyID
        # still states the currency exactly.
        self.currency = text_at(self.settlement, "InvoiceCurrencyCode") or _currency_id(
            find(self.summation, "GrandTotalAmount")
        )
        self.optional = OptionalValues()

    def read(self) -> SyntaxRead:
        seller = find(self.agreement, "SellerTradeParty")
        buyer = find(self.agreement, "BuyerTradeParty")
        type_code = text_at(self.doc, "TypeCode")
        stated = self.stated()
        period = find(self.settlement, "BillingSpecifiedPeriod")
        payee_iban, payee_bic = self._payee_account()
        invoice = Invoice(
            invoice_number=text_at(self.doc, "ID"),
            invoice_date=cii_date(find(self.doc, "IssueDateTime/DateTimeString"), "issue date"),
            due_date=self.optional.date(self._due_date),
            vendor_name=text_at(seller, "Name"),
            vendor_tax_id=self._tax_id(seller),
            customer_name=text_at(buyer, "Name"),
            po_number=order_reference(
                text_at(self.agreement, "BuyerOrderReferencedDocument/IssuerAssignedID")
                or text_at(self.agreement, "BuyerOrderReferencedDocument/ID")
            ),
            **stated.invoice_fields(self.currency, self._line_items()),
            document_type=document_type(type_code),
            customer_tax_id=self._tax_id(buyer),
            payment_terms=self._payment_terms(),
            iban=payee_iban,
            bic=payee_bic,
            tax_breakdown=list(stated.tax_breakdown),
            vendor_address=self._address(seller),
            customer_address=self._address(buyer),
            service_period_start=self.optional.date(
                lambda: cii_date(find(period, "StartDateTime/DateTimeString"), "period start")
            ),
            service_period_end=self.optional.date(
                lambda: cii_date(find(period, "EndDateTime/DateTimeString"), "period end")
            ),
        )
        return SyntaxRead(invoice, stated, type_code, tuple(self.optional.notes))

    def _payee_account(self) -> tuple[str | None, str | None]:
        """(IBAN, BIC) of the first means naming a payee IBAN, both from that one.

        The payee's account only: a direct debit's IBAN (PayerPartyDebtorFinancialAccount)
        is the customer's, not where to pay.
        """
        for means in find_all(self.settlement, "SpecifiedTradeSettlementPaymentMeans"):
            if value := iban(text_at(means, "PayeePartyCreditorFinancialAccount/IBANID")):
                return value, text_at(means, "PayeeSpecifiedCreditorFinancialInstitution/BICID")
        return None, None

    def _due_date(self) -> dt.date | None:
        for terms in find_all(self.settlement, "SpecifiedTradePaymentTerms"):
            found = find(terms, "DueDateDateTime/DateTimeString")
            if found is not None:
                return cii_date(found, "due date")
        return None

    def _payment_terms(self) -> str | None:
        notes = [
            text_at(t, "Description")
            for t in find_all(self.settlement, "SpecifiedTradePaymentTerms")
        ]
        return "\n".join(dict.fromkeys(n for n in notes if n)) or None

    @staticmethod
    def _tax_id(party: Element | None) -> str | None:
        registrations = find_all(party, "SpecifiedTaxRegistration/ID")
        # VAT number ("VA") first, then the fiscal number ("FC"), then one whose
        # producer left out the scheme.
        for scheme in ("VA", "FC", None):
            for element in registrations:
                if element.get("schemeID") == scheme and (value := tax_identifier(text(element))):
                    return value
        return None

    @staticmethod
    def _address(party: Element | None) -> str | None:
        address = find(party, "PostalTradeAddress")
        if address is None:
            return None
        city = " ".join(
            p for p in (text_at(address, "PostcodeCode"), text_at(address, "CityName")) if p
        )
        return join_address(
            [
                text_at(address, "LineOne"),
                text_at(address, "LineTwo"),
                text_at(address, "LineThree"),
                city,
                text_at(address, "CountrySubDivisionName"),
                text_at(address, "CountryID"),
            ]
        )

    def _summed_lines(self) -> Iterator[Element]:
        for line in find_all(self.trade, "IncludedSupplyChainTradeLineItem"):
            doc = find(line, "AssociatedDocumentLineDocument")
            status = (text_at(doc, "LineStatusReasonCode") or "").upper()
            if text_at(doc, "ParentLineID") is None and status not in _NOT_SUMMED_LINE_STATUS:
                yield line

    def _line_items(self) -> Iterator[LineItem]:
        for line in self._summed_lines():
            quantity = decimal(find(line, f"{self.d.line_delivery}/BilledQuantity"), "quantity")
            agreement = find(line, self.d.line_agreement)
            price = find(agreement, "NetPriceProductTradePrice")
            # The CII binding of EN 16931 states BT-149 on either price (at most one):
            # a basis given only with the gross price is the net price's basis too.
            basis = find(price, "BasisQuantity")
            if basis is None:
                basis = find(agreement, "GrossPriceProductTradePrice/BasisQuantity")
            product = find(line, "SpecifiedTradeProduct")
            yield LineItem(
                # The item name (BT-153), else the item description (BT-154): a line
                # without a name is still said to be something.
                description=text_at(product, "Name") or text_at(product, "Description") or "",
                quantity=quantity,
                unit_price=_unit_price(
                    decimal(find(price, "ChargeAmount"), "net price"),
                    decimal(basis, "price basis quantity"),
                ),
                amount=money(self._line_amount(line), "line total"),
            )

    def _line_amount(self, line: Element) -> Element | None:
        return find(line, f"{self.d.line_settlement}/{self.d.line_summation}/LineTotalAmount")

    def stated(self) -> StatedFigures:
        s = self.summation
        return StatedFigures(
            line_amounts=tuple(
                money(self._line_amount(line), "line total") for line in self._summed_lines()
            ),
            line_total=money(find(s, "LineTotalAmount"), "LineTotalAmount"),
            allowance_total=money(find(s, "AllowanceTotalAmount"), "AllowanceTotalAmount"),
            charge_total=money(find(s, "ChargeTotalAmount"), "ChargeTotalAmount"),
            tax_basis_total=money(find(s, "TaxBasisTotalAmount"), "TaxBasisTotalAmount"),
            tax_total=in_currency(find_all(s, "TaxTotalAmount"), self.currency, "TaxTotalAmount"),
            grand_total=money(find(s, "GrandTotalAmount"), "GrandTotalAmount"),
            prepaid=money(find(s, "TotalPrepaidAmount"), "TotalPrepaidAmount"),
            rounding=money(find(s, "RoundingAmount"), "RoundingAmount"),
            due_payable=money(find(s, "DuePayableAmount"), "DuePayableAmount"),
            tax_breakdown=tuple(self._tax_breakdown()),
        )

    def _tax_breakdown(self) -> Iterator[TaxBreakdown]:
        for tax in find_all(self.settlement, "ApplicableTradeTax"):
            yield TaxBreakdown(
                rate=decimal(find(tax, self.d.rate), "tax rate"),
                taxable_amount=money(find(tax, "BasisAmount"), "tax basis amount"),
                tax_amount=money(find(tax, "CalculatedAmount"), "tax amount"),
            )


# --- OASIS UBL 2.1 ----------------------------------------------------------------------------


class UblReader:
    def __init__(self, root: Element) -> None:
        self.root = root
        self.credit_note = root.tag.endswith("}CreditNote") or root.tag == "CreditNote"
        self.totals = find(root, "LegalMonetaryTotal")
        self.currency = text_at(root, "DocumentCurrencyCode") or _currency_id(
            find(self.totals, "TaxInclusiveAmount")
        )
        self.optional = OptionalValues()

    def read(self) -> SyntaxRead:
        root = self.root
        seller = find(root, "AccountingSupplierParty/Party")
        buyer = find(root, "AccountingCustomerParty/Party")
        type_code = text_at(root, "CreditNoteTypeCode" if self.credit_note else "InvoiceTypeCode")
        stated = self.stated()
        due = (
            text_at(root, "DueDate")
            or text_at(root, "PaymentMeans/PaymentDueDate")
            or text_at(root, "PaymentTerms/PaymentDueDate")
        )
        account = self._payee_account()
        invoice = Invoice(
            invoice_number=text_at(root, "ID"),
            invoice_date=iso_date(text_at(root, "IssueDate"), "IssueDate"),
            due_date=self.optional.date(lambda: iso_date(due, "DueDate")),
            vendor_name=self._name(seller),
            vendor_tax_id=self._tax_id(seller),
            customer_name=self._name(buyer),
            po_number=order_reference(text_at(root, "OrderReference/ID")),
            **stated.invoice_fields(self.currency, self._line_items()),
            document_type=document_type(type_code, credit_note_root=self.credit_note),
            customer_tax_id=self._tax_id(buyer),
            payment_terms="\n".join(
                dict.fromkeys(n for t in find_all(root, "PaymentTerms/Note") if (n := text(t)))
            )
            or None,
            iban=iban(text_at(account, "ID")),
            bic=text_at(account, "FinancialInstitutionBranch/ID")
            or text_at(account, "FinancialInstitutionBranch/FinancialInstitution/ID"),
            tax_breakdown=list(stated.tax_breakdown),
            vendor_address=self._address(seller),
            customer_address=self._address(buyer),
            service_period_start=self.optional.date(
                lambda: iso_date(text_at(root, "InvoicePeriod/StartDate"), "StartDate")
            ),
            service_period_end=self.optional.date(
                lambda: iso_date(text_at(root, "InvoicePeriod/EndDate"), "EndDate")
            ),
        )
        return SyntaxRead(invoice, stated, type_code, tuple(self.optional.notes))

    def _payee_account(self) -> Element | None:
        for means in find_all(self.root, "PaymentMeans"):
            account = find(means, "PayeeFinancialAccount")
            if account is not None:
                return account
        return None

    @staticmethod
    def _name(party: Element | None) -> str | None:
        return text_at(party, "PartyLegalEntity/RegistrationName") or text_at(
            party, "PartyName/Name"
        )

    @staticmethod
    def _tax_id(party: Element | None) -> str | None:
        schemes = find_all(party, "PartyTaxScheme")
        # The VAT number first (TaxScheme ID "VAT"), then any other tax registration.
        for scheme in sorted(schemes, key=lambda s: text_at(s, "TaxScheme/ID") != "VAT"):
            if value := tax_identifier(text_at(scheme, "CompanyID")):
                return value
        return None

    @staticmethod
    def _address(party: Element | None) -> str | None:
        address = find(party, "PostalAddress")
        if address is None:
            return None
        city = " ".join(
            p for p in (text_at(address, "PostalZone"), text_at(address, "CityName")) if p
        )
        return join_address(
            [
                text_at(address, "StreetName"),
                text_at(address, "AdditionalStreetName"),
                *(text(line) for line in find_all(address, "AddressLine/Line")),
                city,
                text_at(address, "CountrySubentity"),
                text_at(address, "Country/IdentificationCode"),
            ]
        )

    def _lines(self) -> list[Element]:
        return find_all(self.root, "CreditNoteLine" if self.credit_note else "InvoiceLine")

    def _quantity(self, line: Element) -> Decimal | None:
        tag = "CreditedQuantity" if self.credit_note else "InvoicedQuantity"
        return decimal(find(line, tag), "quantity")

    def _line_items(self) -> Iterator[LineItem]:
        for line in self._lines():
            yield LineItem(
                # The item name (BT-153), else the item description (BT-154).
                description=text_at(line, "Item/Name") or text_at(line, "Item/Description") or "",
                quantity=self._quantity(line),
                unit_price=_unit_price(
                    decimal(find(line, "Price/PriceAmount"), "PriceAmount"),
                    decimal(find(line, "Price/BaseQuantity"), "BaseQuantity"),
                ),
                amount=money(find(line, "LineExtensionAmount"), "LineExtensionAmount"),
            )

    def _total(self, name: str) -> Decimal | None:
        return money(find(self.totals, name), name)

    def stated(self) -> StatedFigures:
        own = self._tax_total_in_document_currency()
        return StatedFigures(
            line_amounts=tuple(
                money(find(line, "LineExtensionAmount"), "LineExtensionAmount")
                for line in self._lines()
            ),
            line_total=self._total("LineExtensionAmount"),
            allowance_total=self._total("AllowanceTotalAmount"),
            charge_total=self._total("ChargeTotalAmount"),
            tax_basis_total=self._total("TaxExclusiveAmount"),
            tax_total=money(find(own, "TaxAmount"), "TaxAmount"),
            grand_total=self._total("TaxInclusiveAmount"),
            prepaid=self._total("PrepaidAmount"),
            rounding=self._total("PayableRoundingAmount"),
            due_payable=self._total("PayableAmount"),
            tax_breakdown=tuple(self._tax_breakdown(own)),
        )

    def _tax_total_in_document_currency(self) -> Element | None:
        # A second TaxTotal may state the VAT in the accounting currency (BT-111).
        for tax_total in find_all(self.root, "TaxTotal"):
            amount = find(tax_total, "TaxAmount")
            if amount is not None and amount.get("currencyID") in (None, self.currency):
                return tax_total
        return None

    @staticmethod
    def _tax_breakdown(tax_total: Element | None) -> Iterator[TaxBreakdown]:
        for sub in find_all(tax_total, "TaxSubtotal"):
            yield TaxBreakdown(
                rate=decimal(_first(sub, "TaxCategory/Percent", "Percent"), "Percent"),
                taxable_amount=money(find(sub, "TaxableAmount"), "TaxableAmount"),
                tax_amount=money(find(sub, "TaxAmount"), "TaxAmount"),
            )


def _unit_price(price: Decimal | None, basis: Decimal | None) -> Decimal | None:
    """The price of one unit: the stated price over its basis quantity when that is exact.

    "12.00 per 100 pieces" is 0.12 per piece. A price that does not fit the schema's 10
    places (or a basis that is not positive) is left out rather than rounded; the line
    amount, which is what is summed, is still read.
    """
    if price is None:
        return None
    if basis is None or basis == 1:
        unit = price
    elif basis > 0:
        try:
            unit = price / basis
        except ArithmeticError:  # a basis like 1E-999999 overflows the context
            return None
        if unit * basis != price:
            return None
    else:
        return None
    try:
        return unit if unit == unit.quantize(Decimal("1E-10")) else None
    except InvalidOperation:  # more digits than the context holds
        return None


def _currency_id(amount: Element | None) -> str | None:
    value = None if amount is None else amount.get("currencyID")
    return value.strip() or None if value else None


def _first(base: Element | None, *paths: str) -> Element | None:
    for path in paths:
        if (found := find(base, path)) is not None:
            return found
    return None
