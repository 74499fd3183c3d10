"""Deterministic sample invoices (PDF + ground truth) for tests, demos and evals.

Everything random flows from one `random.Random(seed)`, and the PDF creation date is
pinned, so the same seed always yields byte-identical PDFs and the same `Invoice`.
Only fpdf2's core fonts are used (no font downloads); their encoding is set to
windows-1252 so that "€" can be printed.

Beyond the default English invoices, `generate_invoice` can print German, French and
Dutch labels (`language`), and embed the invoice as e-invoice XML (`einvoice`:
Factur-X / ZUGFeRD / XRechnung CII, or XRechnung UBL), the way hybrid e-invoices
travel. `generate_corpus(..., varied=True)` mixes languages for `invoiceflow eval`.

Imports nothing from Prefect.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import random
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Final, Literal

from fpdf import FPDF

from invoiceflow.schema import Invoice, LineItem

CENT: Final = Decimal("0.01")
_PDF_EPOCH: Final = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

NumberStyle = Literal["en", "de", "ch", "sv"]
Column = Literal["pos", "desc", "qty", "unit", "amount"]
Language = Literal["en", "de", "fr", "nl"]
EInvoiceFlavor = Literal["factur-x", "zugferd", "xrechnung-cii", "xrechnung-ubl"]
LANGUAGES: Final[tuple[Language, ...]] = ("en", "de", "fr", "nl")
# How the page is laid out. "classic" is what the generator always printed; the others
# are layouts real invoices use that the classic one does not. `generate_corpus(varied=
# True)` prints half of its invoices in one of them.
Layout = Literal[
    "classic", "two_column", "cells", "stacked", "title_number", "small_print", "boxed"
]
LAYOUTS: Final[tuple[Layout, ...]] = (
    "classic",
    "two_column",  # vendor block left, title and invoice details right, on the same lines
    "cells",  # invoice details as a table: a row of labels, the values in the row below
    "stacked",  # each value on the line under its label
    "title_number",  # the number in the title: "Rechnung Nr. 2026-001"
    "small_print",  # registered office / company register small print above the header
    "boxed",  # totals in a summary box, notes on the same lines to its left
)
EINVOICE_FLAVORS: Final[tuple[EInvoiceFlavor, ...]] = (
    "factur-x",
    "zugferd",
    "xrechnung-cii",
    "xrechnung-ubl",
)


@dataclass(frozen=True, slots=True)
class _Locale:
    numbers: NumberStyle
    date_formats: tuple[str, ...]  # strftime patterns; %B/%b are always English


_LOCALES: Final[dict[str, _Locale]] = {
    "US": _Locale("en", ("%B %d, %Y", "%m/%d/%Y", "%b %d, %Y", "%Y-%m-%d")),
    "GB": _Locale("en", ("%d/%m/%Y", "%d %B %Y", "%d-%b-%Y", "%Y-%m-%d")),
    "IE": _Locale("en", ("%d/%m/%Y", "%d %B %Y")),
    "CA": _Locale("en", ("%Y-%m-%d", "%B %d, %Y")),
    "AU": _Locale("en", ("%d/%m/%Y", "%d %b %Y")),
    "DE": _Locale("de", ("%d.%m.%Y", "%Y-%m-%d")),
    "NL": _Locale("de", ("%d-%m-%Y", "%d.%m.%Y", "%Y-%m-%d")),
    "ES": _Locale("de", ("%d/%m/%Y", "%d.%m.%Y")),
    "DK": _Locale("de", ("%d.%m.%Y", "%d-%m-%Y")),
    "CH": _Locale("ch", ("%d.%m.%Y",)),
    "SE": _Locale("sv", ("%Y-%m-%d",)),
    "NO": _Locale("sv", ("%d.%m.%Y", "%Y-%m-%d")),
    "FR": _Locale("sv", ("%d/%m/%Y", "%Y-%m-%d")),
    "AT": _Locale("de", ("%d.%m.%Y",)),
    "BE": _Locale("de", ("%d/%m/%Y", "%d-%m-%Y")),
}


@dataclass(frozen=True, slots=True)
class _Vendor:
    name: str
    address: tuple[str, str]
    country: str
    tax_label: str
    tax_id: str
    currency: str
    tax_name: str
    tax_rates: tuple[str, ...]
    number_format: str  # str.format pattern with {year} and {n}


VENDORS: Final[tuple[_Vendor, ...]] = (
    _Vendor(
        "Nordlicht Software GmbH",
        ("Friedrichstraße 112", "10117 Berlin, Germany"),
        "DE",
        "VAT ID:",
        "DE287654321",
        "EUR",
        "VAT",
        ("19", "7"),
        "RE-{year}-{n:05d}",
    ),
    _Vendor(
        "Brightwater Consulting Ltd",
        ("14 Harbour Lane", "Bristol BS1 4RN, United Kingdom"),
        "GB",
        "VAT Reg. No.:",
        "GB 123 4567 89",
        "GBP",
        "VAT",
        ("20",),
        "BWC-{n:06d}",
    ),
    _Vendor(
        "Acme Industrial Supply, Inc.",
        ("2200 Commerce Blvd", "Columbus, OH 43215, USA"),
        "US",
        "EIN:",
        "31-4159265",
        "USD",
        "Sales tax",
        ("7.25", "5.75", "0"),
        "INV-{year}-{n:05d}",
    ),
    _Vendor(
        "Helvetia Präzision AG",
        ("Bahnhofstrasse 21", "8001 Zürich, Switzerland"),
        "CH",
        "UID:",
        "CHE-116.281.710 MWST",
        "CHF",
        "MWST",
        ("8.1", "2.6"),
        "{year}{n:06d}",
    ),
    _Vendor(
        "Svensk Kontorsmaterial AB",
        ("Sveavägen 44", "111 34 Stockholm, Sweden"),
        "SE",
        "VAT reg. no:",
        "SE556677889901",
        "SEK",
        "Moms",
        ("25", "12"),
        "F{year}/{n:04d}",
    ),
    _Vendor(
        "Studio Lumière SARL",
        ("8 rue des Arts", "69002 Lyon, France"),
        "FR",
        "TVA / VAT No.:",
        "FR40303265045",
        "EUR",
        "TVA",
        ("20", "10"),
        "FA-{n:06d}",
    ),
    _Vendor(
        "Van der Berg Logistiek B.V.",
        ("Keizersgracht 301", "1016 ED Amsterdam, Netherlands"),
        "NL",
        "BTW / VAT ID:",
        "NL859373216B01",
        "EUR",
        "BTW",
        ("21", "9"),
        "VDB{year}-{n:04d}",
    ),
    _Vendor(
        "Oficina Verde S.L.",
        ("Calle de Alcalá 95", "28009 Madrid, Spain"),
        "ES",
        "NIF / VAT:",
        "ESB86412491",
        "EUR",
        "IVA",
        ("21", "10"),
        "OV-{year}-{n:04d}",
    ),
    _Vendor(
        "Dansk Design ApS",
        ("Store Kongensgade 40", "1264 København K, Denmark"),
        "DK",
        "CVR / VAT:",
        "DK31245789",
        "DKK",
        "Moms",
        ("25",),
        "{n:07d}",
    ),
    _Vendor(
        "Maple Leaf Analytics Corp.",
        ("250 Yonge Street", "Toronto, ON M5B 2L7, Canada"),
        "CA",
        "GST/HST No.:",
        "123456789RT0001",
        "CAD",
        "HST",
        ("13", "5"),
        "MLA-{n:05d}",
    ),
    _Vendor(
        "Koala Cloud Pty Ltd",
        ("88 George Street", "Sydney NSW 2000, Australia"),
        "AU",
        "ABN:",
        "51 824 753 556",
        "AUD",
        "GST",
        ("10",),
        "KC{n:06d}",
    ),
    _Vendor(
        "Fjord Data AS",
        ("Karl Johans gate 16", "0154 Oslo, Norway"),
        "NO",
        "Org.nr / VAT:",
        "NO 987 654 321 MVA",
        "NOK",
        "MVA",
        ("25", "15"),
        "FD-{year}-{n:04d}",
    ),
    _Vendor(
        "Emerald Print Works Ltd",
        ("Unit 7, Ballymount Road", "Dublin 12, Ireland"),
        "IE",
        "VAT No.:",
        "IE6388047V",
        "EUR",
        "VAT",
        ("23", "13.5"),
        "EPW/{year}/{n:04d}",
    ),
)

# Only drawn for German, French and Dutch invoices, so the English corpora (and the
# seeds tests rely on) are unchanged.
EXTRA_VENDORS: Final[tuple[_Vendor, ...]] = (
    _Vendor(
        "Alpenblick Handels GmbH",
        ("Mariahilfer Straße 77", "1060 Wien, Österreich"),
        "AT",
        "UID-Nr.:",
        "ATU57812349",
        "EUR",
        "USt.",
        ("20", "10"),
        "AR-{year}-{n:05d}",
    ),
    _Vendor(
        "Atelier Lumen SRL",
        ("Rue Haute 120", "1000 Bruxelles, Belgique"),
        "BE",
        "N° TVA :",
        "BE0477472701",
        "EUR",
        "TVA",
        ("21", "6"),
        "F{year}-{n:04d}",
    ),
    _Vendor(
        "Vlaamse Drukkerij NV",
        ("Meir 24", "2000 Antwerpen, België"),
        "BE",
        "BTW-nummer:",
        "BE0403170701",
        "EUR",
        "BTW",
        ("21", "6"),
        "VD-{n:06d}",
    ),
)

# (name, address line, country, VAT id or None)
CUSTOMERS: Final[tuple[tuple[str, str, str | None], ...]] = (
    ("Northwind Traders Ltd", "3 King Street, Leeds LS1 2HL, United Kingdom", "GB991122334"),
    ("Contoso Retail GmbH", "Leopoldstraße 9, 80802 München, Germany", "DE811907980"),
    ("Globex Corporation", "500 Market St, San Francisco, CA 94105, USA", None),
    ("Initech Solutions Ltd", "22 Quay Street, Galway, Ireland", "IE9825613N"),
    (
        "Umbrella Logistics B.V.",
        "Wilhelminakade 91, 3072 AP Rotterdam, Netherlands",
        "NL001234567B01",
    ),
    ("Stark Manufacturing AG", "Industriestrasse 5, 4052 Basel, Switzerland", None),
    ("Wayne Enterprises, Inc.", "1007 Mountain Drive, Gotham, NJ 07001, USA", None),
    ("Tyrell Components AB", "Lindholmspiren 3, 417 56 Göteborg, Sweden", "SE556012345601"),
    ("Cyberdyne Systems S.A.", "Avenue Louise 54, 1050 Brussels, Belgium", "BE0403170701"),
    ("Wonka Confectionery Ltd", "1 Chocolate Way, York YO1 7HH, United Kingdom", None),
    ("Soylent Foods SARL", "12 quai de la Loire, 44000 Nantes, France", "FR83404833048"),
    ("Hooli Europe Ltd", "Grand Canal Square 4, Dublin 2, Ireland", "IE3668997OH"),
)

# (description, low unit price, high unit price, fractional quantities allowed)
CATALOG: Final[tuple[tuple[str, int, int, bool], ...]] = (
    ("Software consulting (hours)", 90, 180, True),
    ("Project management (hours)", 70, 140, True),
    ("On-site support, day rate", 600, 1400, False),
    ("Annual licence - Analytics Pro", 1200, 9000, False),
    ("Cloud hosting, March", 150, 2500, False),
    ("SSD 1TB NVMe", 60, 140, False),
    ('Monitor 27" 4K', 250, 600, False),
    ("USB-C cable 2 m", 8, 25, False),
    ("Laptop stand, aluminium", 30, 90, False),
    ("Office chair Model 5", 180, 450, False),
    ("Copy paper A4 80g (box of 5)", 18, 40, False),
    ("Toner cartridge TN-2420", 35, 95, False),
    ("Tax return preparation", 250, 900, False),
    ("Freight Hamburg - Rotterdam", 300, 2200, False),
    ("Pallet storage per week", 4, 12, True),
    ("Customs clearance fee", 45, 180, False),
    ("Logo redesign", 800, 4500, False),
    ("Photography session (half day)", 400, 1200, False),
    ("Brochure print run 1000 pcs", 350, 1500, False),
    ("Website maintenance Q2", 300, 1800, False),
    ("Translation EN-DE (per 100 words)", 9, 20, True),
    ("Server rack 42U", 900, 2600, False),
    ("Network switch 24-port", 180, 900, False),
    ("Training workshop, 2 days", 1500, 4800, False),
    ("Espresso beans 1 kg", 14, 32, False),
    ("Desk lamp LED", 25, 80, False),
    ("Security audit", 2000, 12000, False),
    ("Data migration", 1000, 7000, False),
    ("SLA Gold support 12 months", 2400, 9600, False),
    ("Courier delivery", 12, 60, False),
    ("Ergonomic keyboard", 45, 160, False),
    ("Wireless mouse", 15, 60, False),
    ("Design review (hours)", 85, 160, True),
    ("Storage 500 GB add-on", 5, 30, False),
    ("Installation & setup", 120, 900, False),
    ("Packaging material", 6, 40, False),
)

_TITLES: Final = ("INVOICE", "Invoice", "TAX INVOICE")
_NUMBER_LABELS: Final = ("Invoice No.:", "Invoice #:", "Invoice number:", "Invoice Nr.:")
_DATE_LABELS: Final = ("Invoice date:", "Date:", "Issue date:", "Date of issue:")
_DUE_LABELS: Final = ("Due date:", "Payment due:", "Due:", "Pay by:")
_PO_LABELS: Final = ("PO Number:", "PO #:", "Purchase order:", "Your PO:")
_BILL_TO_LABELS: Final = ("Bill to:", "Billed to:", "Invoice to:", "Customer:")
_SUBTOTAL_LABELS: Final = ("Subtotal", "Net amount", "Sub-total", "Total excl. tax")
_TOTAL_LABELS: Final = ("Total", "Invoice total", "Grand total", "Total amount")
_DUE_AMOUNT_LABELS: Final = ("Amount due", "Balance due", "Amount payable", "Total due")
_PAID_LABELS: Final = ("Amount paid", "Less deposit", "Paid")
_COLUMN_HEADERS: Final[dict[Column, tuple[str, ...]]] = {
    "pos": ("#", "Pos."),
    "desc": ("Description", "Item", "Description of services"),
    "qty": ("Qty", "Quantity", "Units"),
    "unit": ("Unit price", "Price", "Rate"),
    "amount": ("Amount", "Total", "Line total"),
}
_MONTHS_EN: Final = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


def _months(first_half: str, second_half: str) -> tuple[str, ...]:
    return (*first_half.split(), *second_half.split())


@dataclass(frozen=True, slots=True)
class _Words:
    """Everything printed in one language. Tuples are alternatives drawn per invoice."""

    titles: tuple[str, ...]
    number: tuple[str, ...]
    date: tuple[str, ...]
    due: tuple[str, ...]
    po: tuple[str, ...]
    bill_to: tuple[str, ...]
    subtotal: tuple[str, ...]
    total: tuple[str, ...]
    amount_due: tuple[str, ...]
    paid: tuple[str, ...]
    columns: dict[Column, tuple[str, ...]]
    currency: str
    customer_vat: str
    terms_on_receipt: str
    terms_days: str  # str.format with {days}
    thanks: str
    page: str  # str.format with {page}; fpdf2 replaces {nb}
    months: tuple[str, ...]
    # None: the vendor's own conventions (English invoices come from every vendor).
    date_formats: tuple[str, ...] | None = None
    # Replaces the English tax name "VAT" of a vendor.
    tax_name: str | None = None
    # Vendor country -> the label in front of the vendor's own VAT number.
    tax_id_labels: dict[str, str] = field(default_factory=dict)
    # Names of the vendors that write in this language (empty: all of `VENDORS`).
    vendors: tuple[str, ...] = ()
    percent: str = "%"
    reverse_charge: str = " (reverse charge)"


WORDS: Final[dict[Language, _Words]] = {
    "en": _Words(
        titles=_TITLES,
        number=_NUMBER_LABELS,
        date=_DATE_LABELS,
        due=_DUE_LABELS,
        po=_PO_LABELS,
        bill_to=_BILL_TO_LABELS,
        subtotal=_SUBTOTAL_LABELS,
        total=_TOTAL_LABELS,
        amount_due=_DUE_AMOUNT_LABELS,
        paid=_PAID_LABELS,
        columns=_COLUMN_HEADERS,
        currency="Currency:",
        customer_vat="Customer VAT ID:",
        terms_on_receipt="Payment terms: due on receipt.",
        terms_days="Payment terms: {days} days net.",
        thanks="Thank you for your business.",
        page="Page {page} of {{nb}}",
        months=_MONTHS_EN,
    ),
    "de": _Words(
        titles=("RECHNUNG", "Rechnung"),
        number=("Rechnungsnummer:", "Rechnungs-Nr.:", "Rechnung Nr.:"),
        date=("Rechnungsdatum:", "Datum:", "Ausstellungsdatum:"),
        due=("Fällig am:", "Zahlbar bis:", "Fälligkeitsdatum:"),
        po=("Bestellnummer:", "Ihre Bestellung:", "Bestell-Nr.:"),
        bill_to=("Rechnungsempfänger:", "Kunde:", "Rechnung an:"),
        subtotal=("Zwischensumme", "Nettobetrag", "Summe netto"),
        total=("Gesamtbetrag", "Rechnungsbetrag", "Gesamtsumme", "Summe brutto"),
        amount_due=("Zahlbetrag", "Offener Betrag", "Zu zahlen"),
        paid=("Anzahlung", "Bereits bezahlt", "Abzüglich Anzahlung"),
        columns={
            "pos": ("Pos.", "#"),
            "desc": ("Beschreibung", "Bezeichnung", "Leistung"),
            "qty": ("Menge", "Anzahl"),
            "unit": ("Einzelpreis", "Preis"),
            "amount": ("Betrag", "Gesamt"),
        },
        currency="Währung:",
        customer_vat="Kunden-USt-IdNr.:",
        terms_on_receipt="Zahlbar sofort ohne Abzug.",
        terms_days="Zahlungsziel: {days} Tage netto.",
        thanks="Vielen Dank für Ihren Auftrag.",
        page="Seite {page} von {{nb}}",
        months=_months(
            "Januar Februar März April Mai Juni", "Juli August September Oktober November Dezember"
        ),
        date_formats=("%d.%m.%Y", "%d. %B %Y", "%Y-%m-%d"),
        tax_name="MwSt.",
        reverse_charge=" (Steuerschuldnerschaft des Leistungsempfängers)",
        tax_id_labels={"DE": "USt-IdNr.:"},
        vendors=("Nordlicht Software GmbH", "Helvetia Präzision AG", "Alpenblick Handels GmbH"),
    ),
    "fr": _Words(
        titles=("FACTURE", "Facture"),
        number=("N° de facture :", "Facture n° :", "Numéro de facture :"),
        date=("Date de facture :", "Date :", "Date d'émission :"),
        due=("Date d'échéance :", "Échéance :", "À payer avant le :"),
        po=("Bon de commande :", "N° de commande :", "Votre commande :"),
        bill_to=("Facturé à :", "Client :", "Destinataire :"),
        subtotal=("Total HT", "Sous-total", "Montant HT"),
        total=("Total TTC", "Montant TTC", "Total"),
        amount_due=("Net à payer", "Montant dû", "Reste à payer"),
        paid=("Acompte versé", "Déjà payé", "Acompte"),
        columns={
            "pos": ("N°", "#"),
            "desc": ("Désignation", "Description"),
            "qty": ("Qté", "Quantité"),
            "unit": ("Prix unitaire", "P.U. HT"),
            "amount": ("Montant", "Total HT"),
        },
        currency="Devise :",
        customer_vat="N° TVA client :",
        terms_on_receipt="Paiement à réception de facture.",
        terms_days="Conditions de paiement : {days} jours net.",
        thanks="Merci pour votre confiance.",
        page="Page {page} sur {{nb}}",
        months=_months(
            "janvier février mars avril mai juin",
            "juillet août septembre octobre novembre décembre",
        ),
        date_formats=("%d/%m/%Y", "%d %B %Y", "%d.%m.%Y"),
        tax_name="TVA",
        reverse_charge=" (autoliquidation)",
        tax_id_labels={"FR": "N° TVA :"},
        vendors=("Studio Lumière SARL", "Atelier Lumen SRL"),
        percent=" %",
    ),
    "nl": _Words(
        titles=("FACTUUR", "Factuur"),
        number=("Factuurnummer:", "Factuurnr.:", "Factuur nr.:"),
        date=("Factuurdatum:", "Datum:", "Datum factuur:"),
        due=("Vervaldatum:", "Te betalen voor:", "Uiterste betaaldatum:"),
        po=("Inkoopordernummer:", "Ordernummer:", "Bestelnummer:"),
        bill_to=("Factuuradres:", "Klant:", "Gefactureerd aan:"),
        subtotal=("Subtotaal", "Totaal excl. BTW", "Netto bedrag"),
        total=("Totaal", "Totaal incl. BTW", "Totaalbedrag"),
        amount_due=("Te betalen", "Openstaand bedrag", "Nog te betalen"),
        paid=("Reeds betaald", "Aanbetaling", "Betaald"),
        columns={
            "pos": ("Pos.", "#"),
            "desc": ("Omschrijving", "Artikel"),
            "qty": ("Aantal",),
            "unit": ("Prijs", "Stukprijs"),
            "amount": ("Bedrag", "Totaal"),
        },
        currency="Valuta:",
        customer_vat="BTW-nr. klant:",
        terms_on_receipt="Te betalen bij ontvangst.",
        terms_days="Betalingstermijn: {days} dagen.",
        thanks="Bedankt voor uw opdracht.",
        page="Pagina {page} van {{nb}}",
        months=_months(
            "januari februari maart april mei juni",
            "juli augustus september oktober november december",
        ),
        date_formats=("%d-%m-%Y", "%d %B %Y", "%d.%m.%Y"),
        tax_name="BTW",
        reverse_charge=" (btw verlegd)",
        tax_id_labels={"NL": "BTW-nummer:"},
        vendors=("Van der Berg Logistiek B.V.", "Vlaamse Drukkerij NV"),
    ),
}

_LAYOUTS: Final[tuple[tuple[Column, ...], ...]] = (
    ("desc", "qty", "unit", "amount"),
    ("pos", "desc", "qty", "unit", "amount"),
    ("desc", "unit", "qty", "amount"),
)
_COLUMN_WIDTHS: Final[dict[Column, float]] = {"pos": 10, "qty": 20, "unit": 30, "amount": 32}
_SYMBOLS: Final = {"EUR": "€", "GBP": "£", "USD": "$"}
_CURRENCIES: Final = ("EUR", "USD", "GBP", "CHF")


def format_amount(value: Decimal, style: NumberStyle, *, places: int = 2) -> str:
    """Print a Decimal the way an invoice in `style` would."""
    quantum = Decimal(1).scaleb(-places)
    sign = "-" if value < 0 else ""
    text = f"{abs(value.quantize(quantum, ROUND_HALF_UP)):,.{places}f}"
    group, dec = {"en": (",", "."), "de": (".", ","), "ch": ("'", "."), "sv": (" ", ",")}[style]
    text = text.replace(",", "\0").replace(".", dec).replace("\0", group)
    return sign + text


def _format_quantity(value: Decimal, style: NumberStyle) -> str:
    if value == value.to_integral_value():
        return str(int(value))
    places = -value.normalize().as_tuple().exponent  # type: ignore[operator]
    return format_amount(value, style, places=int(places))


@dataclass(frozen=True, slots=True)
class _Plan:
    """Every random choice for one invoice, made before any drawing happens."""

    invoice: Invoice
    vendor: _Vendor
    customer: tuple[str, str, str | None]
    style: NumberStyle
    date_format: str
    tax_rate: str
    reverse_charge: bool
    paid: Decimal
    title: str
    title_first: bool
    two_column: bool
    labels: dict[str, str]
    currency_mode: Literal["label", "code", "symbol"]
    columns: tuple[Column, ...]
    column_titles: dict[Column, str]
    row_height: float
    vendor_tax_in_footer: bool
    show_customer_vat: bool
    words: _Words = WORDS["en"]
    tax_name: str = ""
    tax_id_label: str = ""
    einvoice: EInvoiceFlavor | None = None
    layout: Layout = "classic"


def _vendors(language: Language) -> tuple[_Vendor, ...]:
    names = WORDS[language].vendors
    if not names:
        return VENDORS
    by_name = {v.name: v for v in (*VENDORS, *EXTRA_VENDORS)}
    return tuple(by_name[name] for name in names)


def _invoice_dates(rng: random.Random) -> tuple[dt.date, dt.date | None]:
    issued = dt.date(2025, 1, 1) + dt.timedelta(days=rng.randrange(730))
    due: dt.date | None = issued + dt.timedelta(days=rng.choice((7, 14, 30, 30, 45, 60)))
    if rng.random() < 0.1:
        due = None
    return issued, due


def _invoice_references(rng: random.Random, vendor: _Vendor, year: int) -> tuple[str, str | None]:
    """The invoice number and (sometimes) a purchase-order number."""
    number = vendor.number_format.format(
        year=year, n=rng.randrange(1, 10**4 if "{n:04d}" in vendor.number_format else 10**5)
    )
    po_number = None
    if rng.random() < 0.6:
        po_number = rng.choice(
            (
                f"PO-{rng.randrange(10000, 99999)}",
                f"45000{rng.randrange(10000, 99999)}",
                f"PO{year}-{rng.randrange(1, 999):03d}",
            )
        )
    return number, po_number


def _line_items(rng: random.Random) -> list[LineItem]:
    items: list[LineItem] = []
    n_items = rng.choice((rng.randint(1, 6), rng.randint(1, 15), rng.randint(1, 40)))
    for description, low, high, fractional in rng.sample(CATALOG, k=min(n_items, len(CATALOG))) + [
        rng.choice(CATALOG) for _ in range(max(0, n_items - len(CATALOG)))
    ]:
        if fractional and rng.random() < 0.6:
            quantity = Decimal(rng.randrange(1, 160)) / 4  # quarter hours, e.g. 7.25
        else:
            quantity = Decimal(rng.choice((1, 1, 1, 2, 3, 4, 5, 6, 10, 12, 20, 25)))
        unit_price = (Decimal(rng.randrange(low * 100, high * 100 + 1)) / 100).quantize(CENT)
        if rng.random() < 0.5:  # round prices are common; make sure both kinds appear
            unit_price = unit_price.quantize(Decimal(1), ROUND_HALF_UP).quantize(CENT)
        amount = (quantity * unit_price).quantize(CENT, ROUND_HALF_UP)
        items.append(
            LineItem(
                description=description, quantity=quantity, unit_price=unit_price, amount=amount
            )
        )
    return items


def _plan_invoice(
    rng: random.Random,
    vendor: _Vendor,
    customer: tuple[str, str, str | None],
    currency: str,
    einvoice: EInvoiceFlavor | None,
) -> tuple[Invoice, str, bool, Decimal]:
    """The invoice's content, with its tax rate, reverse-charge flag and amount already paid."""
    issued, due = _invoice_dates(rng)
    number, po_number = _invoice_references(rng, vendor, issued.year)
    items = _line_items(rng)

    reverse_charge = vendor.country not in ("US", "CA", "AU") and rng.random() < 0.1
    tax_rate = "0" if reverse_charge else rng.choice(vendor.tax_rates)
    subtotal = sum((item.amount or Decimal(0) for item in items), Decimal("0.00"))
    tax_total = (subtotal * Decimal(tax_rate) / 100).quantize(CENT, ROUND_HALF_UP)
    total = subtotal + tax_total
    paid = Decimal("0.00")
    # E-invoice XML always states the amount due, so its printed twin shows it too.
    show_due_amount = rng.random() < 0.75 or einvoice is not None
    if show_due_amount and rng.random() < 0.25:
        paid = (total * Decimal(rng.choice((10, 25, 30, 50))) / 100).quantize(CENT, ROUND_HALF_UP)
    invoice = Invoice(
        invoice_number=number,
        invoice_date=issued,
        due_date=due,
        vendor_name=vendor.name,
        vendor_tax_id=vendor.tax_id,
        customer_name=customer[0],
        po_number=po_number,
        currency=currency,
        subtotal=subtotal,
        tax_total=tax_total,
        total=total,
        amount_due=(total - paid) if show_due_amount else None,
        line_items=items,
    )
    return invoice, tax_rate, reverse_charge, paid


def _plan(seed: int, language: Language = "en", einvoice: EInvoiceFlavor | None = None) -> _Plan:
    rng = random.Random(seed)
    words = WORDS[language]
    vendor = rng.choice(_vendors(language))
    customer = rng.choice([c for c in CUSTOMERS if c[0] != vendor.name])
    locale = _LOCALES[vendor.country]
    currency = vendor.currency
    if rng.random() < 0.2:
        currency = rng.choice([c for c in _CURRENCIES if c != vendor.currency])
    invoice, tax_rate, reverse_charge, paid = _plan_invoice(
        rng, vendor, customer, currency, einvoice
    )

    currency_mode: Literal["label", "code", "symbol"] = rng.choice(("label", "code", "symbol"))
    if currency_mode == "symbol" and currency not in _SYMBOLS:
        currency_mode = "code"
    columns = rng.choice(_LAYOUTS)
    return _Plan(
        invoice=invoice,
        vendor=vendor,
        customer=customer,
        style=locale.numbers,
        date_format=rng.choice(words.date_formats or locale.date_formats),
        tax_rate=tax_rate,
        reverse_charge=reverse_charge,
        paid=paid,
        title=rng.choice(words.titles),
        title_first=rng.random() < 0.5,
        two_column=rng.random() < 0.4,
        labels={
            "number": rng.choice(words.number),
            "date": rng.choice(words.date),
            "due": rng.choice(words.due),
            "po": rng.choice(words.po),
            "bill_to": rng.choice(words.bill_to),
            "subtotal": rng.choice(words.subtotal),
            "total": rng.choice(words.total),
            "amount_due": rng.choice(words.amount_due),
            "paid": rng.choice(words.paid),
        },
        currency_mode=currency_mode,
        columns=columns,
        column_titles={col: rng.choice(words.columns[col]) for col in columns},
        row_height=rng.choice((6.0, 7.0, 8.0, 9.5, 11.0)),
        vendor_tax_in_footer=rng.random() < 0.3,
        show_customer_vat=customer[2] is not None and rng.random() < 0.7,
        words=words,
        tax_name=(words.tax_name or vendor.tax_name)
        if vendor.tax_name == "VAT"
        else vendor.tax_name,
        tax_id_label=words.tax_id_labels.get(vendor.country, vendor.tax_label),
        einvoice=einvoice,
    )


class _InvoicePdf(FPDF):
    def __init__(self, plan: _Plan) -> None:
        super().__init__(format="Letter" if plan.vendor.country in ("US", "CA") else "A4")
        self.plan = plan
        self.core_fonts_encoding = "windows-1252"  # "€" is not latin-1
        self.set_creation_date(_PDF_EPOCH)
        self.set_auto_page_break(auto=False)
        self.set_margins(18, 15, 18)

    def footer(self) -> None:
        vendor = self.plan.vendor
        self.set_y(-16)
        self.set_font("helvetica", "", 7.5)
        parts = [vendor.name, ", ".join(vendor.address)]
        if self.plan.vendor_tax_in_footer:
            parts.append(f"{self.plan.tax_id_label} {vendor.tax_id}")
        self.cell(0, 4, " · ".join(parts), align="C", new_x="LMARGIN", new_y="NEXT")
        self.cell(0, 4, self.plan.words.page.format(page=self.page_no()), align="C")


def _render(plan: _Plan) -> bytes:
    pdf = _InvoicePdf(plan)
    pdf.set_title(f"Invoice {plan.invoice.invoice_number}")
    pdf.set_author(plan.vendor.name)
    pdf.add_page()
    meta = _render_header(pdf, plan)
    _render_details(pdf, plan, meta)
    _render_items(pdf, plan)
    _render_totals(pdf, plan)
    _render_closing(pdf, plan)
    return bytes(pdf.output())


def _bottom(pdf: FPDF) -> float:
    return pdf.h - 24  # keep clear of the footer


def _line(pdf: FPDF, text: str, *, size: float = 10, bold: bool = False, h: float = 5.0) -> None:
    pdf.set_font("helvetica", "B" if bold else "", size)
    pdf.cell(0, h, text, new_x="LMARGIN", new_y="NEXT")


def _money(plan: _Plan, value: Decimal, *, with_currency: bool = False) -> str:
    text = format_amount(value, plan.style)
    if not with_currency or plan.currency_mode == "label":
        return text
    code = plan.invoice.currency or ""
    if plan.currency_mode == "symbol":
        symbol = _SYMBOLS[code]
        if code == "USD" and plan.vendor.country != "US":
            symbol = "US$"  # a bare "$" outside the US could be any dollar
        return f"{text} {symbol}" if plan.style != "en" else f"{symbol}{text}"
    return f"{code} {text}"


def _date(plan: _Plan, value: dt.date | None) -> str:
    return _format_date(value, plan.date_format, plan.words.months) if value else ""


def _meta(plan: _Plan) -> list[tuple[str, str]]:
    """The invoice details as (label, value), in print order."""
    inv = plan.invoice
    meta = [
        (plan.labels["number"], inv.invoice_number or ""),
        (plan.labels["date"], _date(plan, inv.invoice_date)),
    ]
    if inv.due_date:
        meta.append((plan.labels["due"], _date(plan, inv.due_date)))
    if inv.po_number:
        meta.append((plan.labels["po"], inv.po_number))
    if plan.currency_mode == "label":
        meta.append((plan.words.currency, inv.currency or ""))
    return meta


def _render_header(pdf: FPDF, plan: _Plan) -> list[tuple[str, str]]:
    """Title and vendor block; returns the invoice details still to print."""
    vendor, meta = plan.vendor, _meta(plan)
    if plan.layout == "small_print":
        _small_print(pdf, plan)
    if plan.layout == "two_column":
        _two_column_header(pdf, plan, meta)
        pdf.ln(4)
        return []  # printed beside the vendor block
    title = plan.title
    if plan.layout == "title_number":
        number_word = _TITLE_NUMBER_WORD[plan.words.currency]
        title = f"{plan.title} {number_word} {plan.invoice.invoice_number}"
        meta = meta[1:]
    if plan.title_first:
        _line(pdf, title, size=18, bold=True, h=10)
    _line(pdf, vendor.name, size=14, bold=True, h=7)
    for address_line in vendor.address:
        _line(pdf, address_line, size=9, h=4.5)
    if not plan.vendor_tax_in_footer:
        _line(pdf, f"{plan.tax_id_label} {vendor.tax_id}", size=9, h=4.5)
    if not plan.title_first:
        pdf.ln(3)
        _line(pdf, title, size=18, bold=True, h=10)
    pdf.ln(4)
    return meta


def _render_details(pdf: FPDF, plan: _Plan, meta: list[tuple[str, str]]) -> None:
    """The invoice details not printed yet, and the bill-to block."""
    customer_name, customer_address, customer_vat = plan.customer
    bill_to = [plan.labels["bill_to"], customer_name, customer_address]
    if plan.show_customer_vat:
        bill_to.append(f"{plan.words.customer_vat} {customer_vat}")
    if plan.layout in ("cells", "stacked"):
        (_meta_cells if plan.layout == "cells" else _meta_stacked)(pdf, meta)
        meta = []
    pdf.set_font("helvetica", "", 10)
    if plan.two_column:
        # Bill-to on the left and invoice details on the right share rows, so the text
        # layer interleaves them; that is what real two-column invoices look like.
        top = pdf.get_y()
        for i in range(max(len(bill_to), len(meta))):
            pdf.set_xy(pdf.l_margin, top + i * 5)
            if i < len(bill_to):
                pdf.set_font("helvetica", "B" if i == 1 else "", 10 if i < 2 else 8.5)
                pdf.cell(90, 5, bill_to[i])
            if i < len(meta):
                pdf.set_xy(pdf.l_margin + pdf.epw - 80, top + i * 5)
                pdf.set_font("helvetica", "", 10)
                pdf.cell(35, 5, meta[i][0])
                pdf.cell(45, 5, meta[i][1], align="R")
        pdf.set_xy(pdf.l_margin, top + max(len(bill_to), len(meta)) * 5)
    else:
        for label, value in meta:
            pdf.cell(40, 5, label)
            pdf.cell(0, 5, value, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(4)
        for i, text in enumerate(bill_to):
            _line(pdf, text, bold=i == 1)
    pdf.ln(6)


def _render_items(pdf: FPDF, plan: _Plan) -> None:
    fixed = sum(_COLUMN_WIDTHS[c] for c in plan.columns if c != "desc")
    widths = {c: (pdf.epw - fixed if c == "desc" else _COLUMN_WIDTHS[c]) for c in plan.columns}
    row_h, style = plan.row_height, plan.style

    def table_header() -> None:
        pdf.set_font("helvetica", "B", 9.5)
        for col in plan.columns:
            pdf.cell(
                widths[col],
                row_h,
                plan.column_titles[col],
                border="B",
                align="L" if col == "desc" else "R",
            )
        pdf.ln(row_h)

    table_header()
    pdf.set_font("helvetica", "", 9.5)
    for pos, item in enumerate(plan.invoice.line_items, start=1):
        if pdf.get_y() + row_h > _bottom(pdf):
            pdf.add_page()
            table_header()
            pdf.set_font("helvetica", "", 9.5)
        cells: dict[Column, str] = {
            "pos": str(pos),
            "desc": item.description,
            "qty": _format_quantity(item.quantity or Decimal(0), style),
            "unit": format_amount(item.unit_price or Decimal(0), style),
            "amount": format_amount(item.amount or Decimal(0), style),
        }
        for col in plan.columns:
            pdf.cell(widths[col], row_h, cells[col], align="L" if col in ("desc", "pos") else "R")
        pdf.ln(row_h)


def _render_totals(pdf: FPDF, plan: _Plan) -> None:
    """The totals block, kept on one page."""
    inv, words = plan.invoice, plan.words
    rate = format_amount(Decimal(plan.tax_rate), plan.style, places=_places(plan.tax_rate))
    tax_label = f"{plan.tax_name} {rate}{words.percent}"
    if plan.reverse_charge:
        tax_label += words.reverse_charge
    totals = [
        (plan.labels["subtotal"], _money(plan, inv.subtotal or Decimal(0))),
        (tax_label, _money(plan, inv.tax_total or Decimal(0))),
        (plan.labels["total"], _money(plan, inv.total or Decimal(0), with_currency=True)),
    ]
    if inv.amount_due is not None:
        if plan.paid:
            totals.append((plan.labels["paid"], _money(plan, -plan.paid)))
        due = _money(plan, inv.amount_due, with_currency=True)
        totals.append((plan.labels["amount_due"], due))
    if pdf.get_y() + 4 + len(totals) * 6 + 20 > _bottom(pdf):
        pdf.add_page()
    pdf.ln(4)
    if plan.layout == "boxed":
        _boxed_totals(pdf, plan, totals)
        return
    for label, value in totals:
        bold = label in (plan.labels["total"], plan.labels["amount_due"])
        pdf.set_font("helvetica", "B" if bold else "", 10)
        pdf.set_x(pdf.l_margin + pdf.epw - 95)
        pdf.cell(55, 6, label)
        pdf.cell(40, 6, value, align="R", new_x="LMARGIN", new_y="NEXT")


def _render_closing(pdf: FPDF, plan: _Plan) -> None:
    """Payment terms, bank details, thanks; the e-invoice attachment if any."""
    inv, words = plan.invoice, plan.words
    pdf.ln(6)
    if inv.due_date is None or inv.invoice_date is None:
        _line(pdf, words.terms_on_receipt, size=9, h=4.5)
    else:
        days = (inv.due_date - inv.invoice_date).days
        _line(pdf, words.terms_days.format(days=days), size=9, h=4.5)
    _line(pdf, "IBAN DE89 3704 0044 0532 0130 00 - BIC COBADEFFXXX", size=9, h=4.5)
    _line(pdf, words.thanks, size=9, h=4.5)
    if plan.einvoice is not None:
        name, xml = einvoice_xml(plan)
        pdf.embed_file(
            bytes=xml,
            basename=name,
            desc=f"{plan.einvoice} e-invoice",
            mime_type="text/xml",
            associated_file_relationship="Data",
            creation_date=_PDF_EPOCH,
            modification_date=_PDF_EPOCH,
        )


# --- layouts beyond the classic one -----------------------------------------------------------

# The word between title and number in the "title_number" layout, keyed by the
# language's currency label (one per language).
_TITLE_NUMBER_WORD: Final = {
    "Currency:": "No.",
    "Währung:": "Nr.",
    "Devise :": "N°",
    "Valuta:": "nr.",
}
_SMALL_PRINT: Final = {
    "Currency:": "Registered office: {address}. Registered in England and Wales, "
    "company no. {reg}.",
    "Währung:": "Sitz der Gesellschaft: {city} · Amtsgericht {city} HRB {reg} · Geschäftsführung: "
    "A. Berger",
    "Devise :": "Siège social : {address} · RCS {city} {reg} · Capital social 10 000",
    "Valuta:": "Statutair gevestigd te {city} · KvK {reg}",
}


def _small_print(pdf: FPDF, plan: _Plan) -> None:
    """Company register small print above the header, as many letterheads have it."""
    vendor = plan.vendor
    city = vendor.address[1].split(" ", 1)[-1] if " " in vendor.address[1] else vendor.address[1]
    reg = str(int(hashlib.sha256(vendor.name.encode()).hexdigest()[:7], 16) % 10**8).zfill(8)
    text = _SMALL_PRINT[plan.words.currency].format(
        address=", ".join(vendor.address), city=city, reg=reg
    )
    pdf.set_font("helvetica", "", 6.5)
    pdf.cell(0, 3.5, text, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)


def _two_column_header(pdf: FPDF, plan: _Plan, meta: list[tuple[str, str]]) -> None:
    """Vendor block on the left, title and invoice details on the right, sharing lines."""
    vendor = plan.vendor
    left = [vendor.name, *vendor.address]
    if not plan.vendor_tax_in_footer:
        left.append(f"{plan.tax_id_label} {vendor.tax_id}")
    right: list[tuple[str, str]] = [(plan.title, ""), *meta]
    top, right_x = pdf.get_y(), pdf.l_margin + pdf.epw - 85
    for i in range(max(len(left), len(right))):
        y = top + i * 6
        if i < len(left):
            pdf.set_xy(pdf.l_margin, y)
            pdf.set_font("helvetica", "B" if i == 0 else "", 13 if i == 0 else 9)
            pdf.cell(90, 6, left[i])
        if i < len(right):
            pdf.set_xy(right_x, y)
            label, value = right[i]
            pdf.set_font("helvetica", "B" if i == 0 else "", 14 if i == 0 else 9.5)
            pdf.cell(40, 6, label)
            pdf.cell(45, 6, value, align="R")
    pdf.set_xy(pdf.l_margin, top + max(len(left), len(right)) * 6)


def _meta_cells(pdf: FPDF, meta: list[tuple[str, str]]) -> None:
    """Invoice details as a bordered table: labels in one row, values in the row below."""
    if not meta:
        return
    width = pdf.epw / len(meta)
    pdf.set_font("helvetica", "B", 8)
    for label, _ in meta:
        pdf.cell(width, 6, label.rstrip(" :"), border=1)
    pdf.ln(6)
    pdf.set_font("helvetica", "", 9)
    for _, value in meta:
        pdf.cell(width, 7, value, border=1)
    pdf.ln(9)


def _meta_stacked(pdf: FPDF, meta: list[tuple[str, str]]) -> None:
    """Each label in small bold type with its value on the line below."""
    for label, value in meta:
        pdf.set_font("helvetica", "B", 8)
        pdf.cell(0, 4, label.rstrip(" :"), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("helvetica", "", 10)
        pdf.cell(0, 5, value, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)


def _boxed_totals(pdf: FPDF, plan: _Plan, totals: list[tuple[str, str]]) -> None:
    """Totals in a framed box on the right; notes on the left share its lines."""
    notes = [plan.words.thanks, "IBAN DE89 3704 0044 0532 0130 00"]
    top, box_x = pdf.get_y(), pdf.l_margin + pdf.epw - 95
    pdf.rect(box_x - 2, top - 1, 97, len(totals) * 6 + 2)
    for i, (label, value) in enumerate(totals):
        y = top + i * 6
        if i < len(notes):
            pdf.set_xy(pdf.l_margin, y)
            pdf.set_font("helvetica", "I", 8.5)
            pdf.cell(80, 6, notes[i])
        pdf.set_xy(box_x, y)
        bold = label in (plan.labels["total"], plan.labels["amount_due"])
        pdf.set_font("helvetica", "B" if bold else "", 10)
        pdf.cell(55, 6, label)
        pdf.cell(40, 6, value, align="R")
    pdf.set_xy(pdf.l_margin, top + len(totals) * 6)


def _format_date(value: dt.date, pattern: str, months: Sequence[str] = _MONTHS_EN) -> str:
    # strftime's %B/%b follow the process locale (LC_TIME), which would make the output
    # depend on the machine; month names are substituted by hand instead.
    month = months[value.month - 1]
    return value.strftime(pattern.replace("%B", month).replace("%b", month[:3]))


def _places(rate: str) -> int:
    return len(rate.partition(".")[2])


# The fields a generated invoice's truth states. The page also prints an IBAN, a BIC
# and payment terms that the truth leaves out (e-invoice twins do not carry them).
STATED_FIELDS: Final = frozenset(
    (
        "invoice_number", "invoice_date", "due_date", "vendor_name", "vendor_tax_id",
        "customer_name", "po_number", "currency", "subtotal", "tax_total", "total",
        "amount_due", "line_items",
    )
)  # fmt: skip


def stated_fields(invoice: Invoice) -> Invoice:
    """`invoice` with only the fields generated truth states (the others at their default)."""
    return Invoice.model_validate(invoice.model_dump(include=set(STATED_FIELDS)))


def generate_invoice(
    seed: int,
    *,
    language: Language = "en",
    einvoice: EInvoiceFlavor | None = None,
    layout: Layout = "classic",
) -> tuple[bytes, Invoice]:
    """One sample invoice: its PDF bytes and the ground truth printed on it.

    ``language`` picks the printed labels (and, for de/fr/nl, vendors and date formats
    of that language); ``einvoice`` also embeds the truth as e-invoice XML.
    """
    plan = dataclasses.replace(_plan(seed, language, einvoice), layout=layout)
    return _render(plan), plan.invoice


def corpus_seed(seed: int, index: int) -> int:
    """The `generate_invoice` seed of document `index` in corpus `seed`.

    Hashed rather than `seed + index`, so corpora with neighbouring seeds do not share
    documents.
    """
    digest = hashlib.sha256(f"invoiceflow-corpus:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def generate_corpus(
    n: int, seed: int = 0, *, varied: bool = False, einvoice_share: float = 0.0
) -> Iterator[tuple[str, bytes, Invoice]]:
    """Yield `n` sample invoices as (file stem, PDF bytes, ground truth).

    ``varied`` mixes English, German, French and Dutch invoices (the stem then ends in
    the language, e.g. ``invoice-0007-fr``) and page layouts (half of them not the
    classic one: ``invoice-0007-fr-cells``); ``einvoice_share`` of them also carry
    embedded e-invoice XML (stem suffix ``-factur-x``, ``-xrechnung-ubl``, ...).
    Without either, the corpus is the plain English one the tests have always used.
    """
    for index in range(n):
        doc_seed = corpus_seed(seed, index)
        stem = f"invoice-{index:04d}"
        language: Language = "en"
        layout: Layout = "classic"
        flavor: EInvoiceFlavor | None = None
        if varied or einvoice_share:
            # A generator of its own, so the invoice itself still comes from doc_seed.
            pick = random.Random(doc_seed ^ 0x5EED)
            if varied:
                language = pick.choice(LANGUAGES)
                stem += f"-{language}"
                layout = _corpus_layout(doc_seed)
                stem += "" if layout == "classic" else f"-{layout}"
            if pick.random() < einvoice_share:
                flavor = pick.choice(EINVOICE_FLAVORS)
                stem += f"-{flavor}"
        pdf, truth = generate_invoice(doc_seed, language=language, einvoice=flavor, layout=layout)
        yield stem, pdf, truth


def _corpus_layout(doc_seed: int) -> Layout:
    """Half classic, half one of the other layouts; drawn apart from the other choices."""
    pick = random.Random(doc_seed ^ 0x1A70)
    return "classic" if pick.random() < 0.5 else pick.choice(LAYOUTS[1:])


def write_corpus(
    directory: Path, n: int, seed: int = 0, *, varied: bool = False, einvoice_share: float = 0.0
) -> list[Path]:
    """Write `<stem>.pdf` and `<stem>.json` (ground truth) for `n` invoices; return the PDFs."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for stem, pdf, truth in generate_corpus(n, seed, varied=varied, einvoice_share=einvoice_share):
        pdf_path = directory / f"{stem}.pdf"
        pdf_path.write_bytes(pdf)
        (directory / f"{stem}.json").write_text(
            truth.model_dump_json(indent=2) + "\n", encoding="utf-8"
        )
        written.append(pdf_path)
    return written


# --- embedded e-invoice XML -----------------------------------------------------------------

_CII: Final = {
    "rsm": "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100",
    "ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100",
    "udt": "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100",
}
_UBL: Final = {
    "": "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2",
    "cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2",
    "cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2",
}
_GUIDELINES: Final[dict[EInvoiceFlavor, tuple[str, str]]] = {
    # flavor: (attachment file name, guideline / customization id)
    "factur-x": ("factur-x.xml", "urn:cen.eu:en16931:2017"),
    "zugferd": (
        "zugferd-invoice.xml",
        "urn:cen.eu:en16931:2017#conformant#urn:zugferd.de:2p0:extended",
    ),
    "xrechnung-cii": (
        "xrechnung.xml",
        "urn:cen.eu:en16931:2017#compliant#urn:xeinkauf.de:kosit:xrechnung_3.0",
    ),
    "xrechnung-ubl": (
        "xrechnung.xml",
        "urn:cen.eu:en16931:2017#compliant#urn:xeinkauf.de:kosit:xrechnung_3.0",
    ),
}


class _Xml:
    """Tiny builder: ``x.sub(parent, "ram:Name", "text", attr=...)``."""

    def __init__(self, namespaces: dict[str, str]) -> None:
        self.ns = namespaces

    def tag(self, name: str) -> str:
        prefix, _, local = name.rpartition(":")
        return f"{{{self.ns[prefix]}}}{local}"

    def sub(
        self, parent: ET.Element, name: str, text: str | None = None, **attrs: str
    ) -> ET.Element:
        element = ET.SubElement(parent, self.tag(name), attrs)
        if text is not None:
            element.text = text
        return element

    def dump(self, root: ET.Element) -> bytes:
        for prefix, uri in self.ns.items():
            ET.register_namespace(prefix, uri)
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _amount_xml(value: Decimal | None) -> str:
    return f"{(value or Decimal(0)):.2f}"


def _quantity_xml(value: Decimal | None) -> str:
    return format(value if value is not None else Decimal(0), "f")


def einvoice_xml(plan: _Plan) -> tuple[str, bytes]:
    """(attachment name, XML) of the plan's invoice in its e-invoice flavor."""
    assert plan.einvoice is not None
    name, guideline = _GUIDELINES[plan.einvoice]
    if plan.einvoice == "xrechnung-ubl":
        return name, _ubl_xml(plan, guideline)
    return name, _cii_xml(plan, guideline)


def _cii_line(
    x: _Xml, trade: ET.Element, number: int, item: LineItem, category: str, tax_rate: str
) -> None:
    line = x.sub(trade, "ram:IncludedSupplyChainTradeLineItem")
    x.sub(x.sub(line, "ram:AssociatedDocumentLineDocument"), "ram:LineID", str(number))
    x.sub(x.sub(line, "ram:SpecifiedTradeProduct"), "ram:Name", item.description)
    agreement = x.sub(line, "ram:SpecifiedLineTradeAgreement")
    price = x.sub(agreement, "ram:NetPriceProductTradePrice")
    x.sub(price, "ram:ChargeAmount", _amount_xml(item.unit_price))
    delivery = x.sub(line, "ram:SpecifiedLineTradeDelivery")
    x.sub(delivery, "ram:BilledQuantity", _quantity_xml(item.quantity), unitCode="C62")
    settlement = x.sub(line, "ram:SpecifiedLineTradeSettlement")
    tax = x.sub(settlement, "ram:ApplicableTradeTax")
    x.sub(tax, "ram:TypeCode", "VAT")
    x.sub(tax, "ram:CategoryCode", category)
    x.sub(tax, "ram:RateApplicablePercent", tax_rate)
    summation = x.sub(settlement, "ram:SpecifiedTradeSettlementLineMonetarySummation")
    x.sub(summation, "ram:LineTotalAmount", _amount_xml(item.amount))


def _cii_xml(plan: _Plan, guideline: str) -> bytes:
    inv, x = plan.invoice, _Xml(_CII)
    currency = inv.currency or ""
    category = "AE" if plan.reverse_charge else "S"
    root = ET.Element(x.tag("rsm:CrossIndustryInvoice"))
    context = x.sub(root, "rsm:ExchangedDocumentContext")
    x.sub(x.sub(context, "ram:GuidelineSpecifiedDocumentContextParameter"), "ram:ID", guideline)
    document = x.sub(root, "rsm:ExchangedDocument")
    x.sub(document, "ram:ID", inv.invoice_number)
    x.sub(document, "ram:TypeCode", "380")
    issued = x.sub(document, "ram:IssueDateTime")
    assert inv.invoice_date is not None
    x.sub(issued, "udt:DateTimeString", inv.invoice_date.strftime("%Y%m%d"), format="102")

    trade = x.sub(root, "rsm:SupplyChainTradeTransaction")
    for number, item in enumerate(inv.line_items, start=1):
        _cii_line(x, trade, number, item, category, plan.tax_rate)

    agreement = x.sub(trade, "ram:ApplicableHeaderTradeAgreement")
    seller = x.sub(agreement, "ram:SellerTradeParty")
    x.sub(seller, "ram:Name", inv.vendor_name)
    address = x.sub(seller, "ram:PostalTradeAddress")
    x.sub(address, "ram:LineOne", plan.vendor.address[0])
    x.sub(address, "ram:CountryID", plan.vendor.country)
    x.sub(x.sub(seller, "ram:SpecifiedTaxRegistration"), "ram:ID", inv.vendor_tax_id, schemeID="VA")
    buyer = x.sub(agreement, "ram:BuyerTradeParty")
    x.sub(buyer, "ram:Name", inv.customer_name)
    if inv.po_number:
        reference = x.sub(agreement, "ram:BuyerOrderReferencedDocument")
        x.sub(reference, "ram:IssuerAssignedID", inv.po_number)
    x.sub(trade, "ram:ApplicableHeaderTradeDelivery")
    settlement = x.sub(trade, "ram:ApplicableHeaderTradeSettlement")
    x.sub(settlement, "ram:InvoiceCurrencyCode", currency)
    tax = x.sub(settlement, "ram:ApplicableTradeTax")
    x.sub(tax, "ram:CalculatedAmount", _amount_xml(inv.tax_total))
    x.sub(tax, "ram:TypeCode", "VAT")
    x.sub(tax, "ram:BasisAmount", _amount_xml(inv.subtotal))
    x.sub(tax, "ram:CategoryCode", category)
    x.sub(tax, "ram:RateApplicablePercent", plan.tax_rate)
    if inv.due_date is not None:
        due = x.sub(x.sub(settlement, "ram:SpecifiedTradePaymentTerms"), "ram:DueDateDateTime")
        x.sub(due, "udt:DateTimeString", inv.due_date.strftime("%Y%m%d"), format="102")
    sums = x.sub(settlement, "ram:SpecifiedTradeSettlementHeaderMonetarySummation")
    x.sub(sums, "ram:LineTotalAmount", _amount_xml(inv.subtotal))
    x.sub(sums, "ram:TaxBasisTotalAmount", _amount_xml(inv.subtotal))
    x.sub(sums, "ram:TaxTotalAmount", _amount_xml(inv.tax_total), currencyID=currency)
    x.sub(sums, "ram:GrandTotalAmount", _amount_xml(inv.total))
    x.sub(sums, "ram:TotalPrepaidAmount", _amount_xml(plan.paid))
    x.sub(sums, "ram:DuePayableAmount", _amount_xml(inv.amount_due))
    return x.dump(root)


def _ubl_xml(plan: _Plan, customization: str) -> bytes:
    inv, x = plan.invoice, _Xml(_UBL)
    currency = inv.currency or ""
    root = ET.Element(x.tag(":Invoice"))
    x.sub(root, "cbc:CustomizationID", customization)
    x.sub(root, "cbc:ID", inv.invoice_number)
    assert inv.invoice_date is not None
    x.sub(root, "cbc:IssueDate", inv.invoice_date.isoformat())
    if inv.due_date is not None:
        x.sub(root, "cbc:DueDate", inv.due_date.isoformat())
    x.sub(root, "cbc:InvoiceTypeCode", "380")
    x.sub(root, "cbc:DocumentCurrencyCode", currency)
    if inv.po_number:
        x.sub(x.sub(root, "cac:OrderReference"), "cbc:ID", inv.po_number)

    supplier = x.sub(x.sub(root, "cac:AccountingSupplierParty"), "cac:Party")
    x.sub(x.sub(supplier, "cac:PartyName"), "cbc:Name", inv.vendor_name)
    scheme = x.sub(supplier, "cac:PartyTaxScheme")
    x.sub(scheme, "cbc:CompanyID", inv.vendor_tax_id)
    x.sub(x.sub(scheme, "cac:TaxScheme"), "cbc:ID", "VAT")
    x.sub(x.sub(supplier, "cac:PartyLegalEntity"), "cbc:RegistrationName", inv.vendor_name)
    customer = x.sub(x.sub(root, "cac:AccountingCustomerParty"), "cac:Party")
    x.sub(x.sub(customer, "cac:PartyLegalEntity"), "cbc:RegistrationName", inv.customer_name)

    x.sub(
        x.sub(root, "cac:TaxTotal"),
        "cbc:TaxAmount",
        _amount_xml(inv.tax_total),
        currencyID=currency,
    )
    totals = x.sub(root, "cac:LegalMonetaryTotal")
    for tag, value in (
        ("LineExtensionAmount", inv.subtotal),
        ("TaxExclusiveAmount", inv.subtotal),
        ("TaxInclusiveAmount", inv.total),
        ("PrepaidAmount", plan.paid),
        ("PayableAmount", inv.amount_due),
    ):
        x.sub(totals, f"cbc:{tag}", _amount_xml(value), currencyID=currency)
    for number, item in enumerate(inv.line_items, start=1):
        line = x.sub(root, "cac:InvoiceLine")
        x.sub(line, "cbc:ID", str(number))
        x.sub(line, "cbc:InvoicedQuantity", _quantity_xml(item.quantity), unitCode="C62")
        x.sub(line, "cbc:LineExtensionAmount", _amount_xml(item.amount), currencyID=currency)
        x.sub(x.sub(line, "cac:Item"), "cbc:Name", item.description)
        x.sub(
            x.sub(line, "cac:Price"),
            "cbc:PriceAmount",
            _amount_xml(item.unit_price),
            currencyID=currency,
        )
    return x.dump(root)


__all__ = [
    "CUSTOMERS",
    "EINVOICE_FLAVORS",
    "EXTRA_VENDORS",
    "LANGUAGES",
    "VENDORS",
    "WORDS",
    "corpus_seed",
    "einvoice_xml",
    "format_amount",
    "generate_corpus",
    "generate_invoice",
    "write_corpus",
]


# --- scanned copies (docread) ---------------------------------------------------------------


def write_scanned_corpus(
    directory: Path, n: int, seed: int = 0, *, varied: bool = True, mixed_share: float = 0.3
) -> list[Path]:
    """`write_corpus` (without e-invoices) plus a scanned copy of every invoice.

    Each ``<stem>.pdf`` gets ``<stem>-scan.pdf`` (image-only, see `invoiceflow.scans`),
    and ``mixed_share`` of them also ``<stem>-mixed.pdf`` (a text cover letter, then the
    scan), each with the same expected JSON, so `evaluate.evaluate_scans` can compare
    OCR with the text layer on the same invoices.
    """
    from invoiceflow.scans import mixed_pdf, scanned_pdf

    written = write_corpus(directory, n, seed, varied=varied)
    for pdf_path in list(written):
        truth_json = pdf_path.with_suffix(".json").read_text(encoding="utf-8")
        doc_seed = corpus_seed(seed, int(pdf_path.stem.split("-")[1]))
        copies = {"scan": scanned_pdf(pdf_path.read_bytes(), doc_seed)}
        if random.Random(doc_seed ^ 0x5CA9).random() < mixed_share:
            vendor = Invoice.model_validate_json(truth_json).vendor_name or ""
            copies["mixed"] = mixed_pdf(pdf_path.read_bytes(), doc_seed, sender=vendor)
        for group, data in copies.items():
            copy = directory / f"{pdf_path.stem}-{group}.pdf"
            copy.write_bytes(data)
            copy.with_suffix(".json").write_text(truth_json, encoding="utf-8")
            written.append(copy)
    return written
