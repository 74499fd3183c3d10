"""Offline, deterministic extraction of invoice fields with labels and regexes.

Works on the plain text layer produced by `invoiceflow.pdf.parse_pdf`, where each
visual line becomes one text line and table cells are separated by single spaces.
The extractor never raises on odd input: a field it cannot find with confidence is
left as None, because a wrong value is worse than a missing one downstream.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal, Protocol, TypeVar

from invoiceflow.extractors import Extraction, ExtractionError
from invoiceflow.normalize import DATE_PATTERN, DecimalSeparator, parse_amount, parse_date
from invoiceflow.schema import ISO_4217, Invoice, LineItem

_I: Final = re.IGNORECASE

# --- labels -----------------------------------------------------------------------------
# Labels that end in a colon are only trusted with it: bare "Date" or "Due" occur in
# running text far too often.
# English first, then German, French and Dutch.
_INVOICE_NUMBER: Final = (
    r"invoice\s*(?:no\.?|nr\.?|number|num\.?|#|id)(?![a-z])",
    r"inv\.?\s*(?:no\.?|#)",
    r"(?:bill|document)\s*(?:no\.?|number|#)(?![a-z])",
    r"rechnungs?[\s-]*(?:nummer|nr\.?)",
    r"n[°o]\.?\s*(?:de\s+)?facture",
    r"facture\s+n[°o]\.?",
    r"num[ée]ro\s+de\s+facture",
    r"factuur\s*(?:nummer|nr\.?)",
)
_INVOICE_DATE: Final = (
    r"invoice\s+date",
    r"date\s+of\s+(?:issue|invoice)",
    r"issue\s+date",
    r"billing\s+date",
    r"issued(?:\s+on)?\s*:",
    # Generic "Date:", unless it is the tail of another date label ("Due date:").
    r"(?<!due )(?<!order )(?<!delivery )(?<!shipping )(?<!service )(?<!payment )date\s*:",
    r"rechnungsdatum",
    r"ausstellungsdatum",
    r"date\s+de\s+facture",
    r"date\s+d['\u2019]\s*[ée]mission",
    r"factuurdatum",
    r"datum\s+factuur",
    # "Datum:" (German, Dutch); compounds such as "Fälligkeitsdatum:" never match here.
    r"datum\s*:",
)
_DUE_DATE: Final = (
    r"due\s+date",
    r"payment\s+due(?:\s+date)?",
    r"due\s+(?:by|on)",
    r"pay(?:able)?\s+by",
    r"(?<!amount )(?<!balance )(?<!total )due\s*:",
    r"f[äa]lligkeitsdatum",
    r"f[äa]llig(?:\s+am)?\s*:",
    r"zahlbar\s+bis",
    r"date\s+d['\u2019]\s*[ée]ch[ée]ance",
    r"[ée]ch[ée]ance\s*:",
    r"[àa]\s+payer\s+avant(?:\s+le)?",
    r"vervaldatum",
    r"te\s+betalen\s+voor",
    r"uiterste\s+betaaldatum",
)
_PO_NUMBER: Final = (
    r"p\.?\s?o\.?\s*(?:number|no\.?|nr\.?|#)",
    r"purchase\s+order(?:\s*(?:number|no\.?|#))?",
    r"(?:your|customer)\s+(?:po|order)(?:\s*(?:number|no\.?|#))?",
    r"order\s+(?:number|no\.?)",
    r"bestell(?:ung)?[\s-]*(?:nummer|nr\.?)",
    r"ihre\s+bestellung",
    r"bon\s+de\s+commande",
    r"n[°o]\.?\s*de\s+commande",
    r"votre\s+commande",
    r"inkoopordernummer",
    r"ordernummer",
    r"bestelnummer",
)
_BILL_TO: Final = (
    r"bill(?:ed)?\s+to",
    r"invoice\s+to",
    r"sold\s+to",
    r"(?:customer|client|buyer)\s*:",
    r"rechnungsempf[äa]nger",
    r"rechnung\s+an\s*:",
    r"kunde\s*:",
    r"factur[ée]\s+[àa]",
    r"destinataire\s*:",
    r"factuuradres",
    r"gefactureerd\s+aan",
    r"klant\s*:",
)
_VENDOR: Final = (
    r"(?:from|seller|vendor|supplier)\s*:",
    r"(?:lieferant|verk[äa]ufer|fournisseur|vendeur|leverancier)\s*:",
)
_CURRENCY_LABEL: Final = (r"currency\s*:?", r"w[äa]hrung\s*:?", r"devise\s*:?", r"valuta\s*:?")
_TAX_ID: Final = (
    r"(?:vat|tax|gst/hst|gst|hst|ust|mwst|btw|tva|iva|moms)\s*(?:reg(?:istration)?\.?\s*)?"
    r"(?:id|no\.?|number|nr\.?|#)(?![a-z])",
    r"tax\s*id",
    r"org\.?\s*n[ro]\.?",
    r"(?-i:EIN|UID|ABN|CVR|NIF|SIREN|UEN)\b",
    # "USt-IdNr.", "BTW-nummer", "BTW-nr.", "MwSt-Nr."
    r"(?:ust|mwst|btw|tva)[\s-]*(?:id[\s-]*)?(?:nr\.?|nummer|no\.?)(?![a-z])",
    r"n[°o]\.?\s*(?:de\s+)?tva(?:\s+intracom\w*\.?)?",
)
_OTHER_LABELS: Final = (
    r"page\s+\d+",
    r"seite\s+\d+",
    r"pagina\s+\d+",
    r"iban\b",
    r"bic\b",
)


def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile(r"(?<![\w])(?:" + "|".join(patterns) + r")\s*[:#.]?", _I)


_RE_INVOICE_NUMBER: Final = _compile(_INVOICE_NUMBER)
_RE_INVOICE_DATE: Final = _compile(_INVOICE_DATE)
_RE_DUE_DATE: Final = _compile(_DUE_DATE)
_RE_PO_NUMBER: Final = _compile(_PO_NUMBER)
_RE_BILL_TO: Final = _compile(_BILL_TO)
_RE_VENDOR: Final = _compile(_VENDOR)
_RE_CURRENCY_LABEL: Final = _compile(_CURRENCY_LABEL)
_RE_TAX_ID: Final = _compile(_TAX_ID)
# Where a free-text value (a name) ends: at the next label on the same line, which is
# how two-column layouts come out of text extraction.
_RE_ANY_LABEL: Final = _compile(
    _INVOICE_NUMBER
    + _INVOICE_DATE
    + _DUE_DATE
    + _PO_NUMBER
    + _BILL_TO
    + _VENDOR
    + _CURRENCY_LABEL
    + _TAX_ID
    + _OTHER_LABELS
)
_CUSTOMER_QUALIFIER: Final = re.compile(
    r"(?:customer|client|buyer|your|recipient|kunden|klant)[\s-]*$", _I
)
# The qualifier after the label: "N° TVA client :", "BTW-nr. klant:".
_CUSTOMER_QUALIFIER_AFTER: Final = re.compile(r"^[\s.]*(?:client|klant|kunde|customer)\b", _I)

# Totals, tried in this order: the specific labels must win over "Total" and "VAT".
TotalField = Literal["amount_due", "paid", "subtotal", "total", "tax_total"]
_TOTAL_LABELS: Final[tuple[tuple[TotalField, re.Pattern[str]], ...]] = tuple(
    (field, re.compile(rf"^\s*(?:{pattern})(?![\w-])", _I))
    for field, pattern in (
        (
            "amount_due",
            r"amount\s+(?:due|payable)|balance(?:\s+due)?|total\s+(?:due|payable)"
            r"|please\s+pay|amount\s+to\s+pay"
            r"|zahlbetrag|offener\s+betrag|zu\s+zahlen|restbetrag"
            r"|net\s+[àa]\s+payer|montant\s+d[ûu]|reste\s+[àa]\s+payer"
            r"|nog\s+te\s+betalen|openstaand\s+bedrag|te\s+betalen(?!\s+(?:voor|bij))",
        ),
        (
            "paid",
            r"amount\s+paid|less\s+(?:deposit|payments?)|paid|deposit|payments?\s+received"
            r"|prepaid|prepayment"
            r"|abz[üu]glich\s+anzahlung|anzahlung|bereits\s+bezahlt"
            r"|acompte(?:\s+vers[ée])?|d[ée]j[àa]\s+pay[ée]"
            r"|reeds\s+betaald|aanbetaling|betaald",
        ),
        (
            "subtotal",
            r"sub-?\s?total|net\s+(?:amount|total)|total\s+net"
            r"|total\s+(?:excl\.?|excluding|before)\s*(?:tax|vat|gst)?|amount\s+before\s+tax"
            r"|zwischensumme|nettobetrag|summe\s+netto|netto(?:betrag|summe)"
            r"|total\s+ht|sous-?\s?total|montant\s+ht"
            r"|subtotaal|totaal\s+excl\.?(?:\s*btw)?|netto\s+bedrag",
        ),
        (
            "total",
            r"total\s+(?:incl\.?|including)\s*(?:tax|vat|gst)?"
            r"|summe\s+brutto|bruttobetrag|total\s+ttc|montant\s+ttc"
            r"|totaal\s+incl\.?(?:\s*btw)?",
        ),
        (
            "tax_total",
            r"(?:total\s+)?(?:vat|tax|sales\s+tax|gst|hst|pst|qst|mwst|ust|moms|mva"
            r"|tva|btw|iva)",
        ),
        (
            "total",
            r"(?:invoice|grand)\s+total|total\s+amount|amount\s+total|total"
            r"|gesamtbetrag|rechnungsbetrag|gesamtsumme|endbetrag"
            r"|montant\s+total|totaalbedrag|totaal",
        ),
    )
)

# --- amounts and currencies --------------------------------------------------------------
_AMOUNT: Final = re.compile(
    r"(?<![\w.,'\u2019])"
    r"(?:\d{1,3}(?:(?:[ ,.'\u2019]\d{3})+)|\d+)(?:[.,]\d{1,4})?"
    r"(?![\w%]|[.,]\d)"
)
_MONEY_TOKEN: Final = re.compile(r"[-(]?\d[\d.,'\u2019]*[.,]\d{2,4}\)?-?")
_NUMBER_TOKEN: Final = re.compile(r"[-(]?(?:\d[\d.,'\u2019]*|[.,]\d+)\)?-?")
_ISO_CODE: Final = re.compile(r"(?<![A-Za-z])[A-Z]{3}(?![A-Za-z])")
_SYMBOLS: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(pattern), code)
    for pattern, code in (
        (r"US\$|USD", "USD"),
        (r"C\$|CA\$", "CAD"),
        (r"A\$|AU\$", "AUD"),
        (r"NZ\$", "NZD"),
        (r"HK\$", "HKD"),
        (r"S\$", "SGD"),
        (r"€", "EUR"),
        (r"£", "GBP"),
        (r"₹", "INR"),
        (r"¥", "JPY"),
        (r"zł", "PLN"),
        (r"\bFr\.", "CHF"),
        (r"(?<![\w$])\$", "USD"),
    )
)
_KRONA: Final = re.compile(r"(?<![A-Za-z])kr\.?(?![A-Za-z])", _I)
_KRONA_BY_COUNTRY: Final = {"SE": "SEK", "DK": "DKK", "NO": "NOK", "IS": "ISK"}

# --- vendor heuristics -----------------------------------------------------------------
_TITLE: Final = re.compile(
    r"^(?:(?:tax|commercial|proforma|pro-forma|vat)\s+)?(?:invoice|bill|rechnung|facture|factura"
    r"|fattura|faktura|factuur)(?:\s+\w+)?$",
    _I,
)
_LEGAL_FORM: Final = re.compile(
    r"\b(?:GmbH|AG|KG|SE|UG|e\.K\.|Ltd\.?|Limited|LLP|plc|Inc\.?|LLC|Corp\.?|Corporation|Co\.|"
    r"AB|AS|ASA|ApS|A/S|Oy|Oyj|SARL|SAS|SA|S\.A\.|S\.L\.|S\.r\.l\.|S\.p\.A\.|B\.V\.|N\.V\.|BV|NV|"
    r"Pty|Sp\. z o\.o\.|s\.r\.o\.|K\.K\.|SRL|SPRL|BVBA|VOF|OG|e\.U\.)(?!\w)"
)
_EIN: Final = re.compile(r"^\d{2}-\d{7}$")
_US_HINT: Final = re.compile(
    r"\b(?:USA|U\.S\.A\.|United States)\b|,\s*[A-Z]{2}\s+\d{5}(?:-\d{4})?\b"
)


@dataclass(frozen=True, slots=True)
class _Line:
    index: int
    text: str


T = TypeVar("T")


class Runner(Protocol):
    """Runs a picklable function elsewhere (`invoiceflow.sandbox.DocumentWorkers`)."""

    async def acall(self, fn: Callable[..., T], *args: Any) -> T: ...


class RulesExtractor:
    """Regex/label based extractor; needs no network and no model.

    With a ``runner`` (a `DocumentWorkers`), `extract_invoice` runs in a worker process
    under its time and memory limits instead of on the caller's event loop; a budget
    breach becomes a permanent ExtractionError of the same kind (too_slow, too_large).
    """

    name: str = "rules"

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner

    async def extract(self, text: str) -> Invoice:
        if self.runner is None:
            return extract_invoice(text)
        # Imported here: invoiceflow.documents imports this module (for the fork server).
        from invoiceflow.documents import DocumentError

        try:
            return await self.runner.acall(extract_invoice, text)
        except DocumentError as exc:
            raise ExtractionError(exc.kind, str(exc), transient=exc.transient) from exc

    async def extract_document(
        self, text: str, *, pages: int | None = None, invoice_key: str | None = None
    ) -> Extraction:
        return Extraction(invoice=await self.extract(text), source="rules", extractor=self.name)


def extract_invoice(text: str) -> Invoice:
    """Synchronous core of `RulesExtractor`: always returns a valid `Invoice`."""
    lines = _lines(text)
    if not lines:
        return Invoice()

    vendor_tax_id = _vendor_tax_id(lines)
    totals, decimal = _totals(lines)
    header_index, columns = _table_header(lines)
    items = _line_items(lines, header_index, columns, decimal)
    item_lines = {index for index, _ in items}
    if item_lines:
        # An item description such as "Tax return preparation" must not count as a tax line.
        totals, decimal = _totals([ln for ln in lines if ln.index not in item_lines], decimal)

    dayfirst = _dayfirst(lines, vendor_tax_id)
    currency = _currency(lines, totals, vendor_tax_id)
    invoice_number = _labeled_token(lines, _RE_INVOICE_NUMBER)
    # The first letterhead line is only a plausible vendor if this is an invoice at all.
    is_invoice = bool(invoice_number or vendor_tax_id or totals or items)
    return Invoice(
        invoice_number=invoice_number,
        invoice_date=_labeled_date(lines, _RE_INVOICE_DATE, dayfirst),
        due_date=_labeled_date(lines, _RE_DUE_DATE, dayfirst),
        vendor_name=_vendor_name(lines, allow_unqualified=is_invoice),
        vendor_tax_id=vendor_tax_id,
        customer_name=_customer_name(lines),
        po_number=_labeled_token(lines, _RE_PO_NUMBER),
        currency=currency,
        subtotal=_amount(totals.get("subtotal"), decimal),
        tax_total=_amount(totals.get("tax_total"), decimal),
        total=_amount(totals.get("total"), decimal),
        amount_due=_amount(totals.get("amount_due"), decimal),
        line_items=[item for _, item in items],
    )


def _lines(text: str) -> list[_Line]:
    cleaned = text.replace("\f", "\n").replace("\u00a0", " ").replace("\u202f", " ")
    stripped = (re.sub(r"[ \t]+", " ", raw).strip() for raw in cleaned.splitlines())
    return [_Line(i, line) for i, line in enumerate(line for line in stripped if line)]


# --- labelled header fields ----------------------------------------------------------------


def _label_values(lines: Sequence[_Line], label: re.Pattern[str]) -> Iterator[tuple[int, str]]:
    """(position in `lines`, text after the label) for every label occurrence.

    A label with nothing after it takes the next line, for layouts that stack the value
    under its label.
    """
    for pos, line in enumerate(lines):
        for match in label.finditer(line.text):
            rest = line.text[match.end() :].strip(" :#\t")
            if not rest and pos + 1 < len(lines):
                yield pos, lines[pos + 1].text
            else:
                yield pos, rest


def _cut_at_label(value: str) -> str:
    match = _RE_ANY_LABEL.search(value)
    if match is not None:
        value = value[: match.start()]
    return value.split(" · ")[0].split(" | ")[0].strip(" :,;-\t")


def _labeled_token(lines: Sequence[_Line], label: re.Pattern[str]) -> str | None:
    for _, rest in _label_values(lines, label):
        token = rest.split(" ")[0].strip(".,;:()") if rest else ""
        # Identifiers always carry a digit; this rejects prose like "invoice number with".
        if token and any(ch.isdigit() for ch in token) and _RE_ANY_LABEL.match(token) is None:
            return token
    return None


def _labeled_date(lines: Sequence[_Line], label: re.Pattern[str], dayfirst: bool) -> dt.date | None:
    for _, rest in _label_values(lines, label):
        for match in DATE_PATTERN.finditer(rest):
            try:
                return parse_date(match.group(0), dayfirst=dayfirst)
            except ValueError:
                continue
    return None


def _customer_name(lines: Sequence[_Line]) -> str | None:
    for pos, line in enumerate(lines):
        for match in _RE_BILL_TO.finditer(line.text):
            name = _cut_at_label(line.text[match.end() :])
            if not name and pos + 1 < len(lines):
                name = _cut_at_label(lines[pos + 1].text)
            if name and any(ch.isalpha() for ch in name):
                return name
    return None


def _vendor_name(lines: Sequence[_Line], *, allow_unqualified: bool) -> str | None:
    for _, rest in _label_values(lines, _RE_VENDOR):
        name = _cut_at_label(rest)
        if name:
            return name

    # Otherwise the vendor is the letterhead: the first lines before any labelled field.
    candidates: list[str] = []
    for line in lines[:12]:
        if _RE_ANY_LABEL.search(line.text) or _table_columns(line.text) is not None:
            break
        if _TITLE.match(line.text) or not any(ch.isalpha() for ch in line.text):
            continue
        if any(pattern.match(line.text) for _, pattern in _TOTAL_LABELS):
            break
        # Letterheads often run name and address together: "Acme Ltd · 1 Main St".
        candidates.append(re.split(r" [·|•] ", line.text)[0].strip())
    for candidate in candidates[:6]:
        if _LEGAL_FORM.search(candidate):
            return candidate
    for candidate in candidates if allow_unqualified else ():
        if not candidate[0].isdigit():
            return candidate

    # Last resort: a page footer such as "Acme Ltd · 1 Main St · VAT GB123".
    for line in lines:
        if " · " in line.text:
            first = line.text.split(" · ")[0].strip()
            if _LEGAL_FORM.search(first):
                return first
    return None


def _vendor_tax_id(lines: Sequence[_Line]) -> str | None:
    for line in lines:
        for match in _RE_TAX_ID.finditer(line.text):
            rest = line.text[match.end() :]
            if _CUSTOMER_QUALIFIER.search(
                line.text[: match.start()]
            ) or _CUSTOMER_QUALIFIER_AFTER.match(rest):
                continue  # the buyer's VAT number, printed in the bill-to block
            # Compound labels ("Org.nr / VAT:", "NIF / VAT:") end at their colon.
            colon = rest.find(":")
            if 0 <= colon <= 12:
                rest = rest[colon + 1 :]
            value = _cut_at_label(rest)
            value = re.split(r"\s{2,}", value)[0]
            if sum(ch.isdigit() for ch in value) >= 5 and len(value) <= 32:
                return value
    return None


# --- totals and currency -----------------------------------------------------------------


def _totals(
    lines: Sequence[_Line], decimal: DecimalSeparator | None = None
) -> tuple[dict[TotalField, str], DecimalSeparator | None]:
    """The printed amount for each totals label (the last occurrence wins)."""
    found: dict[TotalField, str] = {}
    for line in lines:
        if _RE_TAX_ID.search(line.text):
            continue  # "VAT ID: DE123456789" is not a tax amount
        for field, pattern in _TOTAL_LABELS:
            match = pattern.match(line.text)
            if match is None:
                continue
            amounts = _AMOUNT.findall(line.text[match.end() :])
            if amounts:
                found[field] = amounts[-1]
            break
    return found, decimal or _decimal_separator(found.values())


def _decimal_separator(amounts: Iterable[str]) -> DecimalSeparator | None:
    votes = Counter(m.group(1) for a in amounts if (m := re.search(r"([.,])\d{2}$", a)))
    if not votes:
        return None
    return "," if votes[","] > votes["."] else "."


def _amount(text: str | None, decimal: DecimalSeparator | None) -> Decimal | None:
    if text is None:
        return None
    try:
        value = parse_amount(text, decimal=decimal)
    except ValueError:
        return None
    return value if _fits_money(value) else None


def _fits_money(value: Decimal) -> bool:
    # The schema caps money at 18 digits / 4 places; anything beyond is a misread, and
    # passing it on would make the Invoice itself fail validation.
    return abs(value) < Decimal(10) ** 14 and value == value.quantize(Decimal("0.0001"))


def _currency(
    lines: Sequence[_Line], totals: dict[TotalField, str], vendor_tax_id: str | None
) -> str | None:
    for _, rest in _label_values(lines, _RE_CURRENCY_LABEL):
        for code in _ISO_CODE.findall(rest[:12]):
            if code in ISO_4217:
                return code

    total_lines = [
        ln.text
        for ln in lines
        if any(p.match(ln.text) for f, p in _TOTAL_LABELS if f != "paid")
        and not _RE_TAX_ID.search(ln.text)
    ]
    for scope in (total_lines, [ln.text for ln in lines]):
        for text in scope:
            # An ISO code directly next to a number is the most reliable signal.
            for match in re.finditer(
                r"(?<![A-Za-z])([A-Z]{3})\s?[-(]?\d|\d\s?([A-Z]{3})(?![A-Za-z])", text
            ):
                code = match.group(1) or match.group(2)
                if code in ISO_4217:
                    return code
            if scope is total_lines:
                for code in _ISO_CODE.findall(text):
                    if code in ISO_4217:
                        return code
        for text in scope:
            for pattern, code in _SYMBOLS:
                if pattern.search(text):
                    return code
            if _KRONA.search(text) and vendor_tax_id:
                country = _KRONA_BY_COUNTRY.get(vendor_tax_id[:2].upper())
                if country:
                    return country
    return None


# --- dates -------------------------------------------------------------------------------


def _dayfirst(lines: Sequence[_Line], vendor_tax_id: str | None) -> bool:
    """Decide how to read "03/04/2026" for this document."""
    for line in lines:
        for match in re.finditer(r"(?<!\d)(\d{1,2})[/-](\d{1,2})[/-]\d{2,4}(?!\d)", line.text):
            first, second = int(match.group(1)), int(match.group(2))
            if first > 12 >= second:
                return True
            if second > 12 >= first:
                return False
    # No unambiguous date: fall back on the vendor's country. Only the US (and a few
    # others that rarely invoice in English) writes month first.
    if vendor_tax_id and _EIN.match(vendor_tax_id):
        return False
    letterhead = []
    for line in lines[:8]:
        if _RE_BILL_TO.search(line.text):
            break
        letterhead.append(line.text)
    return not any(_US_HINT.search(text) for text in letterhead)


# --- line items --------------------------------------------------------------------------

Column = Literal["qty", "unit", "amount"]
_HEADER_WORDS: Final[dict[str, re.Pattern[str]]] = {
    "desc": re.compile(
        r"\b(?:description|item|service|product|article|details)s?\b"
        r"|\b(?:beschreibung|bezeichnung|leistung|artikel|d[ée]signation|omschrijving)\b",
        _I,
    ),
    "qty": re.compile(
        r"\b(?:qty|quantity|units|hours|hrs|pcs|menge|anzahl|qté|quantit[ée]|aantal)\b", _I
    ),
    "unit": re.compile(
        r"\b(?:unit\s*price|price|rate|unit\s*cost|each|einzelpreis|preis|prix\s+unitaire"
        r"|prijs|stukprijs)\b|\bp\.\s?u\.(?!\w)",
        _I,
    ),
    "amount": re.compile(
        r"\b(?:amount|line\s*total|total|sum|net|betrag|gesamt|montant|bedrag|totaal)\b", _I
    ),
}
_POS_COLUMN: Final = re.compile(r"^(?:#|pos\.?|no\.?|n°|item\s*#)\s", _I)


def _table_columns(text: str) -> tuple[tuple[Column, ...], bool] | None:
    """Numeric column order and whether a position column leads, if `text` is a table header."""
    hits = {name: pattern.search(text) for name, pattern in _HEADER_WORDS.items()}
    if not (hits["desc"] and hits["qty"] and (hits["unit"] or hits["amount"])):
        return None
    positions = {
        col: match.start() for col in ("qty", "unit", "amount") if (match := hits[col]) is not None
    }
    order = tuple(sorted(positions, key=positions.__getitem__))
    columns: tuple[Column, ...] = order if len(order) == 3 else ("qty", "unit", "amount")
    return columns, bool(_POS_COLUMN.match(text))


def _table_header(lines: Sequence[_Line]) -> tuple[int | None, tuple[tuple[Column, ...], bool]]:
    for pos, line in enumerate(lines):
        columns = _table_columns(line.text)
        if columns is not None:
            return pos, columns
    return None, (("qty", "unit", "amount"), False)


def _line_items(
    lines: Sequence[_Line],
    header_pos: int | None,
    layout: tuple[tuple[Column, ...], bool],
    decimal: DecimalSeparator | None,
) -> list[tuple[int, LineItem]]:
    if header_pos is None:
        return []  # without a table header, arithmetic-looking prose is too risky
    columns, has_pos = layout
    items: list[tuple[int, LineItem]] = []
    for line in lines[header_pos + 1 :]:
        item = _parse_item(line.text, columns, has_pos, decimal)
        if item is not None:
            items.append((line.index, item))
            continue
        if _AMOUNT.search(line.text) and any(
            p.match(line.text) for f, p in _TOTAL_LABELS if f in ("subtotal", "total")
        ):
            break  # the totals block ends the table
    return items


_MAX_TOKENS_PER_NUMBER: Final = 3  # "1 234 567,89" spans three tokens


def _parse_item(
    text: str, columns: tuple[Column, ...], has_pos: bool, decimal: DecimalSeparator | None
) -> LineItem | None:
    """Read "<description> <n1> <n2> <n3>", where the numbers follow `columns`.

    Digit groups separated by spaces make the split ambiguous ("1 1 650,25 1 650,25"),
    so every split is tried and the one where quantity x unit price = amount wins.
    """
    tokens = text.split(" ")
    tail = 0
    while (
        tail < len(tokens)
        and tail < 3 * _MAX_TOKENS_PER_NUMBER
        and _NUMBER_TOKEN.fullmatch(tokens[-1 - tail])
    ):
        tail += 1
    if tail < 3 or tail == len(tokens):
        return None

    def spans(end: int, remaining: int) -> Iterator[list[tuple[int, int]]]:
        if remaining == 0:
            yield []
            return
        for width in range(1, _MAX_TOKENS_PER_NUMBER + 1):
            start = end - width
            if start < len(tokens) - tail:
                break
            for rest in spans(start, remaining - 1):
                yield [(start, end), *rest]

    for split in spans(len(tokens), 3):
        values: dict[Column, Decimal] = {}
        for column, (start, end) in zip(reversed(columns), split, strict=True):
            raw = " ".join(tokens[start:end])
            if column != "qty" and not _MONEY_TOKEN.fullmatch(raw.replace(" ", "")):
                break
            try:
                values[column] = parse_amount(raw, decimal=decimal)
            except ValueError:
                break
        else:
            qty, unit, amount = values["qty"], values["unit"], values["amount"]
            if not (_fits_money(unit) and _fits_money(amount) and abs(qty) < Decimal(10) ** 9):
                continue
            if qty == 0 or abs(qty * unit - amount) > Decimal("0.01"):
                continue
            description_tokens = tokens[: split[-1][0]]
            if has_pos and len(description_tokens) > 1 and description_tokens[0].isdigit():
                description_tokens = description_tokens[1:]
            description = " ".join(description_tokens).strip()
            if not any(ch.isalpha() for ch in description):
                continue
            return LineItem(description=description, quantity=qty, unit_price=unit, amount=amount)
    return None
