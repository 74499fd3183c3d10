"""Offline, deterministic extraction of invoice fields with labels and regexes.

Works on the plain text layer produced by `invoiceflow.pdf.parse_pdf`, where each
visual line becomes one text line and table cells are separated by single spaces.
The extractor never raises on odd input: a field it cannot find with confidence is
left as None, because a wrong value is worse than a missing one downstream.

Imports nothing from Prefect.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal, Protocol, TypeVar

from invoiceflow.extractors import Extraction, ExtractionError
from invoiceflow.normalize import DATE_PATTERN, DecimalSeparator, parse_date, read_amount
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
    r"facture[\s.]+n[°o]\.?",  # OCR may read the space as a dot
    r"num[ée]ro\s+de\s+facture",
    r"factuu?r?\s*(?:nummer|nr\.?|mummer)",  # OCR reads "rn" as "m": "Factuumummer"
    r"credit\s*(?:note|memo)\s*(?:no\.?|nr\.?|number|#)",
    r"gutschrifts?[\s-]*(?:nummer|nr\.?)",
    r"beleg[\s-]*(?:nummer|nr\.?)",
    r"receipt\s*(?:no\.?|number|#)",
    r"facture\s+num[ée]ro",
    r"(?:avoir|creditnota|creditfactuur)\s*(?:n[°o]\.?|nr\.?|nummer)",
    # The number after the document title: "Rechnung Nr. 123", "Handelsrechnung (380)
    # 05.03.2018 Nr. 471102", "Gutschrift Nr. GS-1". Bounded, so no backtracking blow-up.
    r"(?:\w{0,20}rechnung|invoice|facture|factuur|gutschrift|avoir|credit\s*note)"
    r"(?:\s*\(\d{3}\))?(?:\s+\d{1,2}[./-]\d{1,2}[./-]\d{2,4})?"
    r"\s+(?:nr\.?|no\.?|n[°o]\.?|number|nummer|#)",
    # A bare "Number:" only at the start of a line.
    r"^(?:nummer|number|num[ée]ro)\s*:",
)
# "FACTUUR 2026-118", "Invoice INV-0042": a title at the start of a line, then the number.
# Tried only when no labelled number exists.
_RE_TITLE_THEN_NUMBER: Final = re.compile(
    r"^(?:(?:tax|sales|commercial)\s+)?(?:invoice|rechnung|facture|factuur|gutschrift"
    r"|credit\s+note|avoir|creditnota)\s+(?=[A-Z]{0,6}[-/]?\d)",
    _I,
)
# "TAX INVOICE" / "# INV-000112": the number alone on the line under the title.
_NUMBER_LINE: Final = re.compile(r"(?:#|no\.?|nr\.?|n[°o]\.?)\s*([\w/-]{1,30})", _I)


def _number_under_title(lines: Sequence[_Line]) -> str | None:
    for line, below in itertools.pairwise(lines):
        if _TITLE.match(line.text) and (match := _NUMBER_LINE.fullmatch(below.text)):
            return match.group(1) if _is_identifier(match.group(1)) else None
    return None


# "Zu Rechnung Nr. 2026-1187", "Original invoice no. ...": another document's number.
_REFERENCE_QUALIFIER: Final = re.compile(
    r"(?:\bzu|\bzur|\bzum|original|orig\.|urspr[üu]ngliche\w*|related|bez[üu]glich|betreft"
    r"|referring\s+to|against|\bfor|d['\u2019]origine|bij)\s*(?:der\s+|the\s+|de\s+la\s+)?$",
    _I,
)
# "Date de facture associée :", "N° de facture d'origine" (French puts the qualifier
# after the label): again another document's.
_REFERENCE_QUALIFIER_AFTER: Final = re.compile(
    r"\s*(?:associ[ée]e?s?|d['\u2019]origine|initiale?|originale?|r[ée]f[ée]renc[ée]e"
    r"|rectifi[ée]e|corrig[ée]e)(?!\w)",
    _I,
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
    r"date\s+de\s+(?:la\s+)?facture",
    r"date\s+d['\u2019]\s*[ée]mission",
    r"factuurdatum",
    r"datum\s+factuur",
    # "Datum:" (German, Dutch); compounds such as "Fälligkeitsdatum:" never match here.
    r"datum\s*:",
    r"(?:bill|document|beleg)\s*date",
    r"belegdatum",
    r"rechnungs\s+datum",  # OCR splits compounds
    r"factuur\s+datum",
    # "Date 05/03/2026", "Datum 3 maart 2026": a bare label right before a date.
    r"(?<!due )(?<!order )(?<!delivery )(?<!shipping )(?<!service )(?<!payment )"
    r"(?:date|datum)(?=\s+\d)",
    # A label alone on its line, the value on the next one.
    r"^(?:date|datum|dated|issued)\s*:?$",
    # "Handelsrechnung (380) 05.03.2018 Nr. 471102": the date right after the title.
    r"(?:\w{0,20}rechnung|invoice|facture|factuur|gutschrift)(?:\s*\(\d{3}\))?"
    r"(?=\s+\d{1,2}[./-]\d{1,2}[./-]\d{2,4})",
    # "Facture n° 2026-045 du 12/03/2026", "Rechnung Nr. 26-0107 vom 10.03.2026",
    # "Rechnungs-Nr. 10457 von 27.02.2026", "Rechnungsnummer 123 vom 01.02.2026".
    r"(?:\w{0,20}rechnung|invoice|facture|factuur|gutschrift)s?[\s-]*"
    r"(?:n[°o]\.?|nr\.?|no\.?|nummer|number|#)?"
    r"\s*[\w/.-]{1,30}\s+(?:du|vom|von|van|d\.d\.|dated|of)(?=\s+\d)",
    # "Zürich, 31. Januar 2026": place and date alone on a line (German/French letters).
    r"^[A-ZÄÖÜ][\w.' -]{1,30},\s*(?:den\s+|le\s+|am\s+)?"
    r"(?=(?:\d{1,2}\.?\s*[A-Za-zÀ-ÿ]{3,10}\.?\s+\d{4}|\d{1,2}[./]\d{1,2}[./]\d{2,4})$)",
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
    # "Bitte überweisen Sie den Betrag bis zum ...", not a discount date ("mit Skonto bis").
    r"(?:[üu]berweisen|zahlen)\s+sie(?:\s+(?!skonto)[\w-]+){0,3}?\s+bis"
    r"(?:\s+sp[äa]testens)?(?:\s+(?:zum|am))?",
    r"date\s+d['\u2019]\s*[ée]ch[ée]ance",
    r"[ée]ch[ée]ance\s*:",
    r"[àa]\s+payer\s+avant(?:\s+le)?",
    r"vervaldatum",
    r"te\s+betalen\s+voor",
    r"uiterste\s+betaaldatum",
    r"date\s+due",
    r"vervaldag",
    # A label alone on its line, the value on the next one.
    r"^(?:due|f[äa]llig(?:\s+am)?|[ée]ch[ée]ance)\s*:?$",
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
    r"factur[ée]\s+[àa](?=\s*:|$)",
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
    r"(?:vat|tax|gst/hst|gst|hst|ust|mwst|btw|tva|iva|moms)[\s-]*(?:reg(?:istration)?\.?\s*)?"
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
TotalField = Literal["amount_due", "paid", "subtotal", "total", "tax_total", "total_weak"]
_TOTAL_PATTERNS: Final[tuple[tuple[TotalField, str], ...]] = (
    (
        "amount_due",
        r"amount\s+(?:due|payable)|balance(?:\s+due)?|total\s+(?:amount\s+)?(?:due|payable)"
        r"|please\s+pay|amount\s+to\s+(?:be\s+)?pa(?:y|id)|total\s+to\s+pay"
        r"|zahlbetrag|offener\s+betrag|zu\s+zahlen(?:der\s+betrag)?|restbetrag"
        r"|net\s+[àa]\s+payer|montant\s+[àa]\s+payer|total\s+[àa]\s+payer|montant\s+d[ûu]"
        r"|reste\s+[àa]\s+payer"
        r"|nog\s+te\s+betalen|openstaand\s+bedrag|(?:totaal\s+)?te\s+(?:betalen|voldoen)"
        r"(?!\s+(?:voor|bij|binnen))",
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
        r"|total\s*\(?\s*(?:excl\.?|excluding|before|exkl\.?|hors|ohne|zonder)\s*"
        r"(?:tax(?:es)?|vat|gst|mwst|ust|tva|btw)?"
        r"|amount\s+before\s+tax|goods\s+total|total\s+goods"
        r"|zwischensumme|nettobetrag|summe\s+netto|netto(?:betrag|summe)"
        r"|gesamtbetrag\s+der\s+positionen|summe\s+(?:der\s+)?positionen|warenwert"
        r"|total\s+h\.?\s?t\.?(?:v\.?a\.?)?|sous-?\s?total|montant\s+h\.?\s?t\.?(?:v\.?a\.?)?"
        r"|gesamt(?:betrag|summe)?\s+netto|rechnungs(?:betrag|summe)\s+netto|bedrag\s+excl\.?(?:\s*btw)?"
        r"|subtotaal|totaal\s+excl\.?(?:\s*btw)?|netto\s+bedrag|maatstaf\s+van\s+heffing",
    ),
    (
        "total",
        r"total\s*\(?\s*(?:incl\.?|including|inkl\.?)\s*(?:tax|vat|gst|mwst)?\)?"
        r"|invoice\s+amount|payable\s+amount|bruttosumme|rechnungssumme|total\s+g[ée]n[ée]ral"
        r"|montant\s+de\s+la\s+facture|totaal\s+bedrag"
        r"|summe\s+brutto|bruttobetrag|gesamt(?:betrag|summe)?\s+brutto"
        r"|total\s+t\.?\s?t\.?\s?c\.?|montant\s+(?:total\s+)?t\.?\s?t\.?\s?c\.?"
        r"|bedrag\s+incl\.?(?:\s*btw)?"
        r"|totaal\s+incl\.?(?:\s*btw)?|factuur\s*totaal|factuurbedrag"
        r"|total\s+credit|credit\s+total|gutschriftsbetrag|montant\s+de\s+l['\u2019]avoir",
    ),
    (
        "tax_total",
        r"(?:total\s+)?(?:vat|tax|sales\s+tax|gst|hst|pst|qst|mwst|ust|moms|mva"
        r"|tva|btw|iva|umsatzsteuer|mehrwertsteuer)",
    ),
    (
        "total",
        r"(?:invoice|grand)\s+total|total\s+amount|amount\s+total"
        r"|gesamtbetrag|rechnungsbetrag|gesamtsumme|endbetrag|gesamtpreis|endsumme"
        r"|montant\s+total|total\s+tvac|montant\s+tvac|totaalbedrag|totaal\s+factuur",
    ),
    # A bare "Total" / "Gesamt" counts only when no label above names the total: a VAT
    # summary row ("Gesamt 42,01 € 7,98 €") also says "Gesamt".
    ("total_weak", r"total|totaal|gesamt|totale"),
)
_TOTAL_LABELS: Final[tuple[tuple[TotalField, re.Pattern[str]], ...]] = tuple(
    (field, re.compile(rf"^\s*(?:{pattern})(?![\w-])", _I)) for field, pattern in _TOTAL_PATTERNS
)
# The same labels anywhere in a line ("Thank you! TOTAL $ 2,375.50", a summary box to the
# right of other text); there only trusted when nothing but an amount follows.
_TOTAL_LABEL_INLINE: Final = re.compile(
    r"(?<![\w-])(?:"
    + "|".join(f"(?P<t{i}>{pattern})" for i, (_, pattern) in enumerate(_TOTAL_PATTERNS))
    + r")(?![\w-])",
    _I,
)
_INLINE_FIELDS: Final[dict[str, TotalField]] = {
    f"t{i}": field for i, (field, _) in enumerate(_TOTAL_PATTERNS)
}
_ENDS_WITH_AMOUNT: Final = re.compile(r"\d\s?(?:[A-Z]{3}|[$€£])?\s*$")
_ONLY_AN_AMOUNT: Final = re.compile(
    r"[\s:.)]*(?:\(?\d{1,2}(?:[.,]\d{1,2})?\s?%\)?\s*)?(?:\([^()]{0,40}\)\s*)?(?:[A-Z]{3}|US\$|[$€£¥])?\s?"
    r"-?\d[\d.,'\u2019 ]{0,20}\s?(?:[A-Z]{3}|[$€£])?\s*"
)

# --- label rows: a table header of labels with the values in the row below ---------------
# "Factuurnummer Factuurdatum Vervaldatum Klantnummer" / "2026-00412 14-01-2026 ...".
# Each cell label is matched whole; longer alternatives come first.
_CELL_LABELS: Final[tuple[tuple[str, str], ...]] = (
    (
        "invoice_number",
        r"(?:invoice|bill|document|credit\s*note|rechnungs?|gutschrifts?|factuur|beleg)"
        r"[\s-]*(?:no\.?|nr\.?|number|nummer|#)|num[ée]ro(?:\s+de\s+facture)?"
        r"|n[°o]\s*(?:de\s+)?facture|facture\s+n[°o]|nummer|number|nr\.?|no\.?|n[°o]",
    ),
    (
        "due_date",
        r"due\s+date|date\s+due|payment\s+due|due|f[äa]llig(?:keitsdatum|\s+am)?"
        r"|zahlbar\s+bis|vervaldatum|vervaldag|date\s+d['\u2019][ée]ch[ée]ance|[ée]ch[ée]ance",
    ),
    (
        "invoice_date",
        r"(?:invoice|bill|issue|document)\s+date|date\s+of\s+(?:issue|invoice)|date\s+de\s+facture"
        r"|rechnungs\s?datum|factuur\s?datum|belegdatum|datum|date",
    ),
    (
        "po_number",
        r"p\.?\s?o\.?\s*(?:number|no\.?|#)?|(?:order|bestell)\s*(?:no\.?|nr\.?|number|nummer)"
        r"|bestellnummer|ordernummer|your\s+(?:ref(?:erence)?|order)\.?|ihr\s+zeichen",
    ),
    (
        "other",
        r"(?:customer|client|account|kunden?|klant|debiteur)[\s-]*(?:no\.?|nr\.?|number|nummer|#|id)?"
        r"|kundennr\.?|klantnummer|terms|page|seite|pagina|rep|ship\s+via|project|projekt"
        r"|ref(?:erence|erenz|\.)?|r[ée]f[ée]rence|lieferdatum|delivery\s+date|currency|w[äa]hrung"
        r"|devise|valuta|period|zeitraum|vat\s+(?:no\.?|number)|ust-?idnr\.?|btw-?nummer",
    ),
    *(
        (field, r"(?:vat|tax|btw|tva|mwst|ust)\s*\d{1,2}(?:[.,]\d+)?\s?%|" + pattern)
        if field == "tax_total"
        else (field, pattern)
        for field, pattern in _TOTAL_PATTERNS
        if field != "paid"
    ),
)
_RE_CELL_LABEL: Final = re.compile(
    # Labels start a word; the lookbehind also makes the scan fail fast inside words.
    r"(?<![\w-])(?:"
    + "|".join(f"(?P<c{i}>{pattern})" for i, (_, pattern) in enumerate(_CELL_LABELS))
    + r")(?![\w-])",
    _I,
)
_CELL_FIELDS: Final = {f"c{i}": field for i, (field, _) in enumerate(_CELL_LABELS)}
# Per field, the cell words plus the line labels ("Date of issue", "Your PO"), so the
# longest label at a position can be found.
_LINE_LABELS_BY_FIELD: Final[dict[str, tuple[str, ...]]] = {
    "invoice_number": _INVOICE_NUMBER,
    "invoice_date": _INVOICE_DATE,
    "due_date": _DUE_DATE,
    "po_number": _PO_NUMBER,
    "other": _CURRENCY_LABEL,
}
_CELL_PATTERNS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = tuple(
    (
        field,
        re.compile(
            # The line labels first: they are the longer, more specific alternatives.
            "(?:" + "|".join((*_LINE_LABELS_BY_FIELD.get(field, ()), pattern)) + r")(?![\w-])",
            _I,
        ),
    )
    for field, pattern in _CELL_LABELS
)
# A label row is short: the left column's words, then a handful of labels.
_MAX_ROW_PREFIX_WORDS: Final = 8
_MAX_ROW_LABELS: Final = 8
_CELL_GAP: Final = re.compile(r"[\s:|/]*")
_HEADER_CELL_FIELDS: Final = frozenset(("invoice_number", "invoice_date", "due_date", "po_number"))


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
# ISO 4217 also lists fund and accounting units no invoice is priced in; "CHE" is
# moreover the prefix of every Swiss VAT number ("CHE-123.456.789").
_PRINTED_CURRENCIES: Final = ISO_4217 - {
    "BOV",
    "CHE",
    "CHW",
    "CLF",
    "COU",
    "MXV",
    "USN",
    "UYI",
    "UYW",
}
_KRONA: Final = re.compile(r"(?<![A-Za-z])kr\.?(?![A-Za-z])", _I)
_KRONA_BY_COUNTRY: Final = {"SE": "SEK", "DK": "DKK", "NO": "NOK", "IS": "ISK"}

# --- vendor heuristics -----------------------------------------------------------------
_TITLE: Final = re.compile(
    r"^(?:(?:tax|commercial|proforma|pro-forma|vat)\s+)?(?:invoice|bill|rechnung|facture|factura"
    r"|fattura|faktura|factuur)(?:\s+\w+)?$",
    _I,
)
_TRAILING_TITLE: Final = re.compile(
    r"\s+(?:(?:tax|sales|commercial|proforma|vat)\s+)?(?:invoice|bill|rechnung|facture|factuur"
    r"|credit\s+note|gutschrift|avoir|creditnota)$",
    _I,
)
_TITLE_WITH_NUMBER: Final = re.compile(
    r"^(?:(?:tax|sales|commercial|proforma|vat)\s+)?(?:invoice|rechnung|facture|factuur"
    r"|gutschrift|credit\s+note|avoir|creditnota)\s+(?:no\.?|nr\.?|n[°o]\.?|number|nummer|#)",
    _I,
)
# Company-register small print above a letterhead is not the vendor's name.
_SMALL_PRINT: Final = re.compile(
    r"^(?:registered|reg\.|company\s+(?:no|number|reg)|sitz\b|amtsgericht|handelsregister"
    r"|gesch[äa]ftsf[üu]hr|si[èe]ge|rcs\b|capital\b|kvk\b|statutair|directors?\b)",
    _I,
)
_LEGAL_FORM: Final = re.compile(
    r"\b(?:GmbH|AG|KG|SE|UG|e\.K\.|Ltd\.?|Limited|LLP|plc|Inc\.?|LLC|Corp\.?|Corporation|Co\.|"
    r"AB|AS|ASA|ApS|A/S|Oy|Oyj|SARL|SAS|SA|S\.A\.|S\.L\.|S\.r\.l\.|S\.p\.A\.|B\.V\.|N\.V\.|BV|NV|"
    r"Pty|Sp\. z o\.o\.|s\.r\.o\.|K\.K\.|SRL|SPRL|BVBA|VOF|OG|e\.U\.)(?!\w)"
)
# "Kundennummer:2", "Phone: 0123": a labelled field, so the letterhead (if any) is above it.
_FIELD_LINE: Final = re.compile(r"^[^\W\d][\w.\- ]{0,30}:\s*\S")
_EIN: Final = re.compile(r"^\d{2}-\d{7}$")
_US_HINT: Final = re.compile(
    r"\b(?:USA|U\.S\.A\.|United States)\b|,\s*[A-Z]{2}\s+\d{5}(?:-\d{4})?\b"
)


# --- bounds that keep the extractor linear in its input -------------------------------------
# Text extraction sometimes glues a whole page into one line; longer lines are split at a
# space so every per-line regex sees bounded input.
_MAX_LINE_CHARS: Final = 1_000
# A label's value sits right after it: only this much of the line is looked at.
_VALUE_WINDOW: Final = 160
# A label repeated thousands of times ("Date: " x 8,000) must not cost thousands of
# value scans: past these caps further occurrences are ignored (real invoices have a few).
_MAX_MATCHES_PER_LINE: Final = 4
_MAX_CANDIDATES_PER_LABEL: Final = 40
# The longest real invoices run to a few thousand lines (~100 pages of ~5k characters);
# beyond these the middle (line items) is skipped so the time stays bounded, and the
# document is flagged for review. Header fields sit at the start, totals at the end.
_MAX_LINES: Final = 20_000
_MAX_CHARS: Final = 600_000


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
        invoice, _ = await self._extract_with_notes(text)
        return invoice

    async def extract_document(
        self, text: str, *, pages: int | None = None, invoice_key: str | None = None
    ) -> Extraction:
        invoice, notes = await self._extract_with_notes(text)
        return Extraction(invoice=invoice, source="rules", extractor=self.name, notes=notes)

    async def _extract_with_notes(self, text: str) -> tuple[Invoice, tuple[str, ...]]:
        if self.runner is None:
            return extract_invoice_with_notes(text)
        # Imported here: invoiceflow.documents imports this module (for the fork server).
        from invoiceflow.documents import DocumentError

        try:
            return await self.runner.acall(extract_invoice_with_notes, text)
        except DocumentError as exc:
            raise ExtractionError(exc.kind, str(exc), transient=exc.transient) from exc


def extract_invoice(text: str) -> Invoice:
    """Synchronous core of `RulesExtractor`: always returns a valid `Invoice`."""
    return extract_invoice_with_notes(text)[0]


def extract_invoice_with_notes(text: str) -> tuple[Invoice, tuple[str, ...]]:
    """The `Invoice` plus review reasons (e.g. a number too large to be money was ignored)."""
    notes: list[str] = []
    return _extract(text, notes), tuple(notes)


def _extract(text: str, notes: list[str]) -> Invoice:
    lines = _ocr_fixed(_head_and_tail(_lines(text), notes))
    if not lines:
        return Invoice()

    vendor_tax_id = _vendor_tax_id(lines)
    totals, decimal = _totals(lines)
    header_index, columns = _table_header(lines)
    items = _line_items(lines, header_index, columns, decimal, notes)
    item_lines = {index for index, _ in items}
    if item_lines:
        # An item description such as "Tax return preparation" must not count as a tax line.
        totals, decimal = _totals([ln for ln in lines if ln.index not in item_lines], decimal)

    rows = _label_rows(lines)
    for field, values in _label_stacks(lines).items():
        rows.setdefault(field, []).extend(values)
    totals = _with_row_totals(totals, rows)
    decimal = decimal or _decimal_separator(totals.values())
    dayfirst = _dayfirst(lines, vendor_tax_id)
    currency = _currency(lines, totals, vendor_tax_id) or _currency_from_locale(
        lines, vendor_tax_id, decimal
    )
    invoice_number = _invoice_number(lines, rows)
    # The first letterhead line is only a plausible vendor if this is an invoice at all.
    is_invoice = bool(invoice_number or vendor_tax_id or totals or items)
    amounts = _amounts(totals, decimal, notes)
    return Invoice(
        invoice_number=invoice_number,
        invoice_date=_labeled_date(
            lines,
            _RE_INVOICE_DATE,
            dayfirst,
            rows.get("invoice_date", ()),
            not_after=_REFERENCE_QUALIFIER,
        ),
        due_date=_labeled_date(lines, _RE_DUE_DATE, dayfirst, rows.get("due_date", ())),
        vendor_name=_vendor_name(lines, allow_unqualified=is_invoice),
        vendor_tax_id=vendor_tax_id,
        customer_name=_customer_name(lines),
        po_number=_labeled_token(lines, _RE_PO_NUMBER, rows.get("po_number", ())),
        currency=currency,
        line_items=[item for _, item in items],
        **amounts,
        **_more_fields(lines, dayfirst, vendor_tax_id),
    )


def _invoice_number(lines: list[_Line], rows: dict[str, list[str]]) -> str | None:
    return (
        _labeled_token(
            lines,
            _RE_INVOICE_NUMBER,
            rows.get("invoice_number", ()),
            not_after=_REFERENCE_QUALIFIER,
        )
        or _labeled_token(lines[:30], _RE_TITLE_THEN_NUMBER)
        or _number_under_title(lines[:30])
    )


def _amounts(
    totals: dict[TotalField, str], decimal: DecimalSeparator | None, notes: list[str]
) -> dict[str, Decimal | None]:
    """Subtotal, tax total, total and amount due, read from the printed totals."""
    amounts = {
        field: _amount(totals.get(field), decimal, notes)
        for field in ("subtotal", "tax_total", "total", "amount_due")
    }
    if amounts["total"] is None:
        amounts["total"] = _amount(totals.get("total_weak"), decimal, notes)
    if amounts["total"] is None and "paid" not in totals:
        # Many invoices print only the payable amount ("Te betalen", "Balance due").
        amounts["total"] = amounts["amount_due"]
    return amounts


def _lines(text: str) -> list[_Line]:
    if len(text) > 4 * _MAX_CHARS:  # far more than is read; skip the middle before splitting
        text = text[: 2 * _MAX_CHARS] + "\n" + text[-2 * _MAX_CHARS :]
    cleaned = text.replace("\f", "\n").replace("\u00a0", " ").replace("\u202f", " ")
    stripped = (_SPACE_RUN.sub(" ", raw).strip() for raw in cleaned.splitlines())
    return [_Line(i, line) for i, line in enumerate(_bounded(stripped)) if line]


def _ocr_fixed(lines: list[_Line]) -> list[_Line]:
    return [_Line(line.index, _ocr_fixed_text(line.text)) for line in lines]


def _ocr_fixed_text(text: str) -> str:
    text = _OCR_DIGITS.sub(_ocr_digit_fix, text)
    text = _OCR_SPACE_BEFORE_DECIMALS.sub("", text)
    return _OCR_CAPITAL_I.sub("I", text)


# OCR splits "422.487,86" into "422.487 ,86".
_OCR_SPACE_BEFORE_DECIMALS: Final = re.compile(r"(?<=\d) (?=[.,]\d{2}(?!\d))")


# OCR reads a capital I as a small l: "lnvoice". No word starts with "lnv".
_OCR_CAPITAL_I: Final = re.compile(r"(?<![\w])l(?=nv(?:oice|OICE))")


_SPACE_RUN: Final = re.compile(r"[ \t]+")
# OCR reads 0 as O: a run of digits, O/o and separators, not touching a letter.
_OCR_DIGITS: Final = re.compile(r"(?<![^\W\d_])[0-9Oo.,]+(?![^\W\d_])")


def _ocr_digit_fix(match: re.Match[str]) -> str:
    """ "1.19O,OO" -> "1.190,00", "RE-2O26" -> "RE-2026"; runs without a digit stay."""
    run = match.group(0)
    if ("O" not in run and "o" not in run) or not any(ch.isdigit() for ch in run):
        return run
    return run.replace("O", "0").replace("o", "0")


def _head_and_tail(lines: list[_Line], notes: list[str]) -> list[_Line]:
    """`lines` within `_MAX_LINES` / `_MAX_CHARS`: the start and the end of the text."""
    total_chars = sum(len(line.text) for line in lines)
    if len(lines) <= _MAX_LINES and total_chars <= _MAX_CHARS:
        return lines

    def within_budget(ordered: Iterable[_Line]) -> list[_Line]:
        kept, chars = [], 0
        for line in ordered:
            chars += len(line.text)
            if len(kept) >= _MAX_LINES // 2 or chars > _MAX_CHARS // 2:
                break
            kept.append(line)
        return kept

    head = within_budget(lines)
    tail = within_budget(reversed(lines[len(head) :]))[::-1]
    notes.append(
        f"text has {len(lines)} lines and {total_chars} characters; the rules read only "
        f"the first {len(head)} and the last {len(tail)} lines"
    )
    return head + tail


def _bounded(lines: Iterable[str]) -> Iterator[str]:
    """Each line, split at spaces into pieces of at most `_MAX_LINE_CHARS`."""
    for line in lines:
        start = 0
        # Walk by index: slicing off the rest each time would copy it, quadratically.
        while len(line) - start > _MAX_LINE_CHARS:
            limit = start + _MAX_LINE_CHARS
            cut = line.rfind(" ", start + _MAX_LINE_CHARS // 2, limit)
            cut = cut if cut > 0 else limit
            yield line[start:cut].strip()
            start = cut
        yield line[start:].strip()


# --- labelled header fields ----------------------------------------------------------------


def _label_values(
    lines: Sequence[_Line], label: re.Pattern[str], *, not_after: re.Pattern[str] | None = None
) -> Iterator[tuple[int, str]]:
    """(position in `lines`, text after the label) for every label occurrence.

    A label with nothing after it takes the next line, for layouts that stack the value
    under its label. Bounded: at most `_MAX_CANDIDATES_PER_LABEL` occurrences, each
    with a value of at most `_VALUE_WINDOW` characters.
    """
    found = 0
    for pos, line in enumerate(lines):
        for match, _ in zip(label.finditer(line.text), range(_MAX_MATCHES_PER_LINE), strict=False):
            before = line.text[max(0, match.start() - 30) : match.start()]
            if not_after is not None and (
                not_after.search(before) or _REFERENCE_QUALIFIER_AFTER.match(line.text, match.end())
            ):
                continue  # e.g. "zu Rechnung Nr.": another document's number
            rest = line.text[match.end() : match.end() + _VALUE_WINDOW].strip(" :#\t")
            # The next line holds the value only under a label alone on its line; the
            # last label of a row of labels ("Number Date Due") is read by `_label_rows`.
            if not rest and match.start() == 0 and pos + 1 < len(lines):
                yield pos, lines[pos + 1].text[:_VALUE_WINDOW]
            else:
                yield pos, rest
            found += 1
            if found >= _MAX_CANDIDATES_PER_LABEL:
                return


def _row_labels(text: str) -> list[str] | None:
    """The fields of a row of cell labels ("DATE INVOICE #"), or None if `text` is not one.

    Words before the first label are another column (a two-column header: the vendor's
    address on the left); after it, the row must be labels only.
    """
    if len(text) > 300 or len(_RE_CELL_LABEL.findall(text)) < 2:
        return None  # cheap test first: this runs on every line
    fields: list[str] = []
    pos, skipped = 0, 0
    while pos < len(text) and skipped <= _MAX_ROW_PREFIX_WORDS:
        pos = _CELL_GAP.match(text, pos).end()  # type: ignore[union-attr]
        label = _longest_cell_label(text, pos)
        if label is not None:
            fields.append(label[0])
            pos = label[1]
        elif fields:
            return None
        else:
            space = text.find(" ", pos)
            pos, skipped = (len(text) if space < 0 else space), skipped + 1
    return fields if 2 <= len(fields) <= _MAX_ROW_LABELS and pos >= len(text) else None


def _longest_cell_label(text: str, pos: int) -> tuple[str, int] | None:
    best: tuple[str, int] | None = None
    for field, pattern in _CELL_PATTERNS:
        match = pattern.match(text, pos)
        if match is not None and match.end() > pos and (best is None or match.end() > best[1]):
            best = (field, match.end())
    return best


_VALUE_CELL: Final = re.compile(
    rf"{DATE_PATTERN.pattern}|\d{{1,3}}(?:[ .,'\u2019]\d{{3}})+(?:[.,]\d{{1,2}})?|\S+"
)
_CURRENCY_CELL: Final = re.compile(r"[A-Z]{3}|US\$|[$€£¥]", _I)


def _cells(text: str) -> list[str]:
    """Whitespace-separated cells of a value row, keeping "3 maart 2026" and "1 234,56" whole."""
    # Currency cells ("EUR") stay: a "Currency" column lines up with them.
    return [match.group(0).strip() for match in _VALUE_CELL.finditer(text[:_MAX_LINE_CHARS])]


def _label_stacks(lines: Sequence[_Line]) -> dict[str, list[str]]:
    """Values of label stacks: k lines that are each one label, then k lines of values.

    Text extraction reads a right-aligned details box column by column: "Invoice No.:",
    "Date:", then "INV-7", "3 March 2026". The i-th value belongs to the i-th label. A
    stack may hold labels we do not know ("Verzendkosten") when every value is an amount.
    """
    found: dict[str, list[str]] = {}
    pos = 0
    while pos < len(lines):
        fields = _stacked_labels(lines, pos)
        values = [line.text for line in lines[pos + len(fields) : pos + 2 * len(fields)]]
        known = [field for field in fields if field is not None]
        trusted = len(known) == len(fields) or all(map(_ONLY_AN_AMOUNT.fullmatch, values))
        # A stack starts with a label we know; the title above it is not part of it.
        starts_known = bool(fields) and fields[0] is not None
        if starts_known and len(fields) >= 2 and len(values) == len(fields) and trusted:
            for field, value in zip(fields, values, strict=True):
                if field is not None:
                    found.setdefault(field, []).append(value)
            pos += len(fields)
        else:
            pos += 1
    return found


def _stacked_labels(lines: Sequence[_Line], pos: int) -> list[str | None]:
    """The run of label-only lines from `pos`: each one's field, None for an unknown label."""
    fields: list[str | None] = []
    while pos + len(fields) < len(lines) and len(fields) < _MAX_ROW_LABELS:
        text = lines[pos + len(fields)].text
        if len(text) > 40:
            break
        label = _longest_cell_label(text, 0) if _RE_CELL_LABEL.match(text) else None
        if label is not None and _LABEL_TAIL.fullmatch(text, label[1]):
            fields.append(label[0])
        elif _UNKNOWN_LABEL.fullmatch(text):
            fields.append(None)
        else:
            break
    return fields


# A short line of words and no digits, such as a totals label we have no pattern for.
_UNKNOWN_LABEL: Final = re.compile(r"[^\W\d][^\d]{1,30}")


def _label_rows(lines: Sequence[_Line]) -> dict[str, list[str]]:
    """Values read from rows of cell labels, by field, in document order.

    The values row is the next line; its last cells line up with the labels (columns on
    the right of a two-column header). Totals rows must hold amounts only.
    """
    found: dict[str, list[str]] = {}
    for pos, line in enumerate(lines[:-1]):
        fields = _row_labels(line.text)
        if fields is None:
            continue
        cells = _cells(lines[pos + 1].text)
        if len(cells) < len(fields):
            continue
        amounts_only = all(_AMOUNT.fullmatch(c) or _CURRENCY_CELL.fullmatch(c) for c in cells)
        for field, cell in zip(fields, cells[-len(fields) :], strict=True):
            if field in _HEADER_CELL_FIELDS or (field != "other" and amounts_only):
                found.setdefault(field, []).append(cell)
    return found


def _cut_at_label(value: str) -> str:
    match = _RE_ANY_LABEL.search(value)
    if match is not None:
        value = value[: match.start()]
    return value.split(" · ")[0].split(" | ")[0].strip(" :,;-\t")


def _labeled_token(
    lines: Sequence[_Line],
    label: re.Pattern[str],
    cells: Sequence[str] = (),
    *,
    not_after: re.Pattern[str] | None = None,
) -> str | None:
    """The identifier after `label` (or else the first fitting cell of a label row)."""
    for pos, rest in _label_values(lines, label, not_after=not_after):
        token = rest.split(" ")[0].strip(".,;:()") if rest else ""
        if _is_identifier(token):
            if token == rest.rstrip(".,;:") and pos + 1 < len(lines):
                # A number broken over two lines by OCR or a narrow cell: "6011" / "-2026-88".
                follow = lines[pos + 1].text
                if _CONTINUATION.fullmatch(follow):
                    token += follow
            return token
    return next((cell for cell in cells if _is_identifier(cell)), None)


_OCR_DATE_COLON: Final = re.compile(r"(?<=\d{2}[.:]\d{2}):(?=\d{4})|(?<=\d{2}):(?=\d{2}\.\d{4})")
_SPACE_IN_NUMBER: Final = re.compile(r"(?<=[\d.]) (?=[\d.])")
_CONTINUATION: Final = re.compile(r"[-/][\w/-]{1,30}")


def _is_identifier(token: str) -> bool:
    # Identifiers always carry a digit; this rejects prose like "invoice number with".
    return (
        bool(token)
        and len(token) <= 40
        and any(ch.isdigit() for ch in token)
        and _RE_ANY_LABEL.match(token) is None
    )


def _labeled_date(
    lines: Sequence[_Line],
    label: re.Pattern[str],
    dayfirst: bool,
    cells: Sequence[str] = (),
    *,
    not_after: re.Pattern[str] | None = None,
) -> dt.date | None:
    """The first date after `label` (or else in a label row's cell)."""
    labelled = (rest for _, rest in _label_values(lines, label, not_after=not_after))
    values = itertools.chain(labelled, cells)
    for value in values:
        # OCR puts stray spaces into dates ("1 9. 0 2. 2026") and reads a dot as a
        # colon ("30.08:2025").
        despaced = _OCR_DATE_COLON.sub(".", _SPACE_IN_NUMBER.sub("", value[:24]))
        for match in itertools.chain(DATE_PATTERN.finditer(value), DATE_PATTERN.finditer(despaced)):
            try:
                return parse_date(match.group(0), dayfirst=dayfirst)
            except ValueError:
                continue
    return None


# "N° de client :", "Code client :", "Kunden-Nr."-style labels name the customer's
# number, not the customer.
_CUSTOMER_ID_QUALIFIER: Final = re.compile(
    r"(?:n[°o]\.?|num[ée]ro|code|r[ée]f\.?|id|nr\.?)\s*(?:de\s+|du\s+)?$", _I
)


def _customer_name(lines: Sequence[_Line]) -> str | None:
    for pos, rest in _label_values(lines, _RE_BILL_TO, not_after=_CUSTOMER_ID_QUALIFIER):
        name = _cut_at_label(rest)
        if not name and pos + 1 < len(lines):
            name = _cut_at_label(lines[pos + 1].text[:_VALUE_WINDOW])
        if name and any(ch.isalpha() for ch in name):
            return name
    return _recipient_under_return_address(lines)


# The salutation line of an address block ("Herrn", "Firma"), above the name.
_ADDRESS_SALUTATION: Final = re.compile(r"(?:herrn?|frau|firma|an|z\.\s?hd\.?.*)$", _I)


def _recipient_under_return_address(lines: Sequence[_Line]) -> str | None:
    """The first line of the address block right under the return-address line: the
    window envelope's recipient (DIN 5008 and the like), which carries no label."""
    for pos, line in enumerate(lines[:-1]):
        if _return_address_name(line.text) is None:
            continue
        below = [ln.text.strip() for ln in lines[pos + 1 : pos + 3]]
        name = below[1] if _ADDRESS_SALUTATION.fullmatch(below[0]) and len(below) > 1 else below[0]
        if (
            not name[:1].isalpha()
            or _FIELD_LINE.match(name)
            or _RE_ANY_LABEL.search(name)
            or _return_address_name(name)
        ):
            return None  # not an address block under it: no guess
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
        if _SMALL_PRINT.match(line.text) or _TITLE_WITH_NUMBER.match(line.text):
            continue  # above or beside the letterhead, not the end of it
        if _RE_ANY_LABEL.search(line.text) or _table_columns(line.text) is not None:
            break
        if _FIELD_LINE.match(line.text):
            break
        if _TITLE.match(line.text) or not any(ch.isalpha() for ch in line.text):
            continue
        if DATE_PATTERN.fullmatch(line.text.strip()):
            continue  # "February 17, 2026" under the title: the issue date, not a name
        if any(pattern.match(line.text) for _, pattern in _TOTAL_LABELS):
            break
        if not candidates and (sender := _return_address_name(line.text)):
            return sender  # no letterhead above the window envelope's sender line
        # Letterheads often run name and address together: "Acme Ltd · 1 Main St"; a
        # two-column header puts the title beside the name: "Acme Ltd INVOICE".
        name = re.split(r" [·|•] ", line.text)[0].strip()
        candidates.append(_TRAILING_TITLE.sub("", name) or name)
    for candidate in candidates[:6]:
        if _LEGAL_FORM.search(candidate):
            return candidate
    for candidate in candidates if allow_unqualified else ():
        if not candidate[0].isdigit():
            return candidate

    # Last resort: a return-address line printed out of reading order, or a page footer
    # such as "Acme Ltd · 1 Main St · VAT GB123".
    for line in lines:
        if sender := _return_address_name(line.text):
            return sender
        if " · " in line.text:
            first = line.text.split(" · ")[0].strip()
            if _LEGAL_FORM.search(first):
                return first
    return None


_SENDER_PARTS: Final = re.compile(r"\s+[·|•●]\s+")
_POSTCODE_CITY: Final = re.compile(r"(?:[A-Z]{1,2}-)?\d{4,5}\s+[^\W\d]")


def _return_address_name(text: str) -> str | None:
    """The sender on a window envelope's return-address line ("weclapp.com | Somestreet 42
    | 08155 Some city" above the recipient): it names the vendor even when the recipient
    below it has the legal form and the letterhead is only a logo."""
    parts = _SENDER_PARTS.split(text.strip())
    if len(parts) < 3 or not _POSTCODE_CITY.match(parts[-1]) or ":" in parts[0]:
        return None  # "Lieferadresse: Lager AG | Weg 3 | 54321 Ort" is another address
    return parts[0] if any(c.isalpha() for c in parts[0]) else None


# France's company register number (SIREN/SIRET) is printed on every invoice, usually
# before the VAT number ("N° TVA"): the VAT number wins when both are there.
_REGISTER_LABEL: Final = re.compile(r"SIRE[NT]\b")


def _vendor_tax_id(lines: Sequence[_Line]) -> str | None:
    register_number = None
    for line in lines:
        matches = zip(_RE_TAX_ID.finditer(line.text), range(_MAX_MATCHES_PER_LINE), strict=False)
        for match, _ in matches:
            rest = line.text[match.end() : match.end() + _VALUE_WINDOW]
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
                if not _REGISTER_LABEL.match(match.group(0)):
                    return value
                register_number = register_number or value
    return register_number


# --- totals and currency -----------------------------------------------------------------


def _totals(
    lines: Sequence[_Line], decimal: DecimalSeparator | None = None
) -> tuple[dict[TotalField, str], DecimalSeparator | None]:
    """The printed amount for each totals label (the last occurrence wins)."""
    found: dict[TotalField, str] = {}
    for pos, line in enumerate(lines):
        if _RE_TAX_ID.search(line.text):
            continue  # "VAT ID: DE123456789" is not a tax amount
        labelled = _total_on_line(line.text)
        if labelled is None and pos + 1 < len(lines):
            # Not inside a stack of values ("20.00" / "4.00" / "24.00"): those go to
            # the stack of labels above them, in order (`_label_stacks`).
            after = lines[pos + 2].text if pos + 2 < len(lines) else ""
            if not _ONLY_AN_AMOUNT.fullmatch(after):
                labelled = _total_under_label(line.text, lines[pos + 1].text)
        if labelled is None and pos > 0 and not found.get("total"):
            # OCR of a bold totals line may put the amount above its label.
            below = lines[pos + 1].text if pos + 1 < len(lines) else ""
            if not _ONLY_AN_AMOUNT.fullmatch(below):
                labelled = _total_under_label(line.text, lines[pos - 1].text)
        if labelled is not None:
            found[labelled[0]] = labelled[1]
    return found, decimal or _decimal_separator(found.values())


_LABEL_TAIL: Final = re.compile(
    r"\s*(?:\(?(?:[A-Z]{3}|[$€£])\)?)?\s*(?:\(\s*\d{1,2}(?:[.,]\d+)?\s?%\s*\))?\s*:?\s*"
)


def _total_under_label(text: str, below: str) -> tuple[TotalField, str] | None:
    """A totals label alone on its line, only an amount on the next ("Rechnungsbetrag" /
    "971,04 EUR"): how summary boxes often come out of text extraction."""
    for field, pattern in _TOTAL_LABELS:
        match = pattern.match(text)
        if match is not None:
            if not _LABEL_TAIL.fullmatch(text, match.end()) or len(below) > 40:
                return None
            if not _ONLY_AN_AMOUNT.fullmatch(below):
                return None
            amounts = _AMOUNT.findall(below)
            return (field, amounts[-1]) if amounts else None
    return None


def _total_on_line(text: str) -> tuple[TotalField, str] | None:
    """(field, printed amount) when `text` is a totals line.

    A label at the start takes the last amount after it; a label further in (a summary
    box beside other text) only counts when nothing but one amount follows it.
    """
    for field, pattern in _TOTAL_LABELS:
        match = pattern.match(text)
        if match is not None:
            if text.rstrip().endswith(":"):
                return None  # "VAT clause 1 :": a label waiting for its value, no amount
            amounts = _AMOUNT.findall(text[match.end() :])
            stated = _stated_amount(field, amounts) if amounts else None
            return (field, stated) if stated else None
    if not _ENDS_WITH_AMOUNT.search(text):
        return None
    # The label sits right before the amount: only the end of the line is searched.
    offset = max(0, len(text) - 90)
    end = text[offset:]
    matches = _TOTAL_LABEL_INLINE.finditer(end)
    for match, _ in zip(matches, range(_MAX_MATCHES_PER_LINE), strict=False):
        tail = end[match.end() :]
        if len(tail) <= 40 and _ONLY_AN_AMOUNT.fullmatch(tail):
            amounts = _AMOUNT.findall(tail)
            field = _INLINE_FIELDS[match.lastgroup or ""]
            if amounts and (stated := _stated_amount(field, amounts)):
                return field, stated
        if _INLINE_FIELDS[match.lastgroup or ""] == "tax_total":
            tax = _summary_row_tax(tail)
            if tax is not None:
                return "tax_total", tax
    return None


# A VAT summary row whose amounts each carry a currency ("756,00 € 143,64 € 899,64 €",
# "£500.00 £100.00 £600.00") is not one amount as `_ONLY_AN_AMOUNT` sees it.
_SUMMARY_ROW: Final = re.compile(
    r"[\s:.)]*(?:\(?\d{1,2}(?:[.,]\d{1,2})?\s?%\)?\s*)?"
    r"(?:(?:[A-Z]{3}|US\$|[$€£¥])?\s?-?\d[\d.,'\u2019]*\s?(?:[A-Z]{3}|[$€£])?\s*){3}"
)


def _summary_row_tax(tail: str) -> str | None:
    """The middle (tax) amount of a net, tax, gross row after a VAT label, with or
    without a currency beside each amount; only when net + tax = gross, as in
    `_stated_amount`, so no other row is misread."""
    if len(tail) > 60 or not _SUMMARY_ROW.fullmatch(tail):
        return None
    amounts = _AMOUNT.findall(tail)
    if len(amounts) != 3:
        return None
    net, tax, gross = (read_amount(amount) for amount in amounts)
    if net is None or tax is None or gross is None or net + tax != gross:
        return None
    return amounts[1]


def _stated_amount(field: TotalField, amounts: Sequence[str]) -> str | None:
    """The amount a totals line states: its last one, except on a VAT summary row
    ("19% MwSt.: 376,37 71,51 447,88"), whose columns are net, tax and gross: the tax
    there is the middle one. Only when the three add up, so no other row is misread;
    a row that does not (an OCR-misread digit) but ends in its largest amount is still
    such a row, and its last amount is the gross: no tax is read from it."""
    if field == "tax_total" and len(amounts) >= 3:
        net, tax, gross = (read_amount(amount) for amount in amounts[-3:])
        if net is not None and tax is not None and gross is not None:
            if net + tax == gross:
                return amounts[-2]
            if 0 < tax < net < gross:
                return None
    return amounts[-1]


def _with_row_totals(
    totals: dict[TotalField, str], rows: dict[str, list[str]]
) -> dict[TotalField, str]:
    """`totals` completed from rows of total labels over a row of amounts."""
    merged = dict(totals)
    for field in ("subtotal", "tax_total", "total", "total_weak", "amount_due"):
        if field not in merged and rows.get(field):
            merged[field] = rows[field][-1]  # type: ignore[index]
    return merged


def _decimal_separator(amounts: Iterable[str]) -> DecimalSeparator | None:
    votes = Counter(m.group(1) for a in amounts if (m := re.search(r"([.,])\d{2}$", a)))
    if not votes:
        return None
    return "," if votes[","] > votes["."] else "."


# One separator followed by two digits: never a thousands group (those have three), so
# "75.04" on a decimal-comma invoice is OCR reading the comma as a point.
_OTHER_DECIMAL: Final = re.compile(r"\D*\d{1,3}[.,]\d{2}\D*")


def _amount(text: str | None, decimal: DecimalSeparator | None, notes: list[str]) -> Decimal | None:
    if text is None:
        return None
    value = read_amount(text, decimal=decimal, notes=notes)
    if value is None and decimal is not None and _OTHER_DECIMAL.fullmatch(text):
        value = read_amount(text, notes=notes)
    if value is None:
        return None
    if not _fits_money(value):
        notes.append(f"ignored {text!r} as an amount: beyond what the schema holds as money")
        return None
    return value


def _fits_money(value: Decimal) -> bool:
    # The schema caps money at 18 digits / 4 places; anything beyond is a misread, and
    # passing it on would make the Invoice itself fail validation.
    return abs(value) < Decimal(10) ** 14 and value == value.quantize(Decimal("0.0001"))


def _currency(
    lines: Sequence[_Line], totals: dict[TotalField, str], vendor_tax_id: str | None
) -> str | None:
    for _, rest in _label_values(lines, _RE_CURRENCY_LABEL):
        for code in _ISO_CODE.findall(rest[:12]):
            if code in _PRINTED_CURRENCIES:
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
                if code in _PRINTED_CURRENCIES:
                    return code
            if scope is total_lines:
                for code in _ISO_CODE.findall(text):
                    if code in _PRINTED_CURRENCIES:
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


# --- the fields the big invoice APIs share ------------------------------------------------


def _more_fields(
    lines: Sequence[_Line], dayfirst: bool, vendor_tax_id: str | None
) -> dict[str, object]:
    """document_type, iban, bic, payment_terms, customer_tax_id and the service period."""
    start, end = _service_period(lines, dayfirst)
    return {
        "document_type": "credit_note" if _is_credit_note(lines) else None,
        "iban": _iban(lines),
        "bic": _labeled_value(lines, _RE_BIC_LABEL, _BIC),
        "payment_terms": _payment_terms(lines),
        "customer_tax_id": _customer_tax_id(lines, vendor_tax_id),
        "service_period_start": start,
        "service_period_end": end,
    }


# A credit note says so in its title, near the top; "invoice" documents stay None.
_CREDIT_NOTE_TITLE: Final = re.compile(
    r"^(?:credit\s*(?:note|memo)|gutschrift|rechnungskorrektur|stornorechnung|avoir"
    r"|facture\s+d['\u2019]avoir|note\s+de\s+cr[ée]dit|creditnota|creditfactuur)(?![\w-])",
    _I,
)


def _is_credit_note(lines: Sequence[_Line]) -> bool:
    return any(_CREDIT_NOTE_TITLE.match(line.text) for line in lines[:25])


_IBAN_START: Final = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?=\s?[A-Z0-9]{4})")
_IBAN_GROUP: Final = re.compile(r"\s?([A-Z0-9]{1,4})(?![a-z])")


def _iban(lines: Sequence[_Line]) -> str | None:
    """The first IBAN-shaped run that passes the mod-97 check, without spaces.

    Groups are added one at a time and the longest valid prefix wins, so text after
    the IBAN ("· BIC ...") is never swallowed. An IBAN failing the check is left out.
    """
    for line in lines:
        if "IBAN" not in line.text.upper() and not _IBAN_START.search(line.text):
            continue
        for match, _ in zip(_IBAN_START.finditer(line.text), range(4), strict=False):
            compact, pos, best = match.group(0), match.end(), None
            while len(compact) < 34 and (group := _IBAN_GROUP.match(line.text, pos)):
                compact, pos = compact + group.group(1), group.end()
                if len(compact) >= 15 and _mod97_ok(compact):
                    best = compact
            if best is not None:
                return best
    return None


def _mod97_ok(iban: str) -> bool:
    rotated = iban[4:] + iban[:4]
    digits = "".join(str(int(ch, 36)) for ch in rotated)
    return int(digits) % 97 == 1


_RE_BIC_LABEL: Final = re.compile(r"(?<![\w])(?:bic|swift(?:[\s/-]*(?:bic|code))?)\s*[:.]?\s*", _I)
_BIC: Final = re.compile(r"[A-Z]{4}[A-Z]{2}[A-Z0-9]{2}(?:[A-Z0-9]{3})?(?![A-Za-z0-9])")


def _labeled_value(
    lines: Sequence[_Line], label: re.Pattern[str], value: re.Pattern[str]
) -> str | None:
    for _, rest in _label_values(lines, label):
        match = value.match(rest)
        if match is not None:
            return match.group(0)
    return None


_TERMS: Final = re.compile(
    r"^(?:payment\s+terms|terms(?:\s+of\s+payment)?|zahlungsbedingungen|zahlungsziel"
    r"|conditions\s+de\s+(?:paiement|r[èe]glement)|betalingstermijn|betalingsvoorwaarden)"
    r"\s*:?\s*"
    r"|^(?=(?:payable|payment\s+due|due)\s+within|zahlbar\s+(?:innerhalb|innert|sofort|bis)"
    r"|net\s+\d{1,3}\s+days|paiement\s+[àa]|te\s+betalen\s+binnen|bitte\s+überweisen)",
    _I,
)


def _payment_terms(lines: Sequence[_Line]) -> str | None:
    for line in lines:
        match = _TERMS.match(line.text)
        if match is not None:
            terms = line.text[match.end() : match.end() + 200].strip(" .;")
            if terms:
                return terms
    return None


def _customer_tax_id(lines: Sequence[_Line], vendor_tax_id: str | None) -> str | None:
    """The buyer's VAT number: a tax-id label qualified as the customer's."""
    for line in lines:
        matches = zip(_RE_TAX_ID.finditer(line.text), range(_MAX_MATCHES_PER_LINE), strict=False)
        for match, _ in matches:
            rest = line.text[match.end() : match.end() + _VALUE_WINDOW]
            qualified = _CUSTOMER_QUALIFIER.search(line.text[: match.start()])
            after = _CUSTOMER_QUALIFIER_AFTER.match(rest)
            if not (qualified or after):
                continue
            rest = rest[after.end() :] if after else rest
            value = re.split(r"\s{2,}", _cut_at_label(rest.lstrip(" .:")))[0]
            if (
                sum(ch.isdigit() for ch in value) >= 5
                and len(value) <= 32
                and value != vendor_tax_id
            ):
                return value
    return None


_PERIOD_LABEL: Final = re.compile(
    r"(?<![\w])(?:service\s+period|billing\s+period|period(?:\s+of\s+service)?"
    r"|leistungszeitraum|abrechnungszeitraum|lieferzeitraum|zeitraum|p[ée]riode(?:\s+de\s+"
    r"(?:facturation|prestation))?|factuurperiode|periode)\s*:?",
    _I,
)


def _service_period(
    lines: Sequence[_Line], dayfirst: bool
) -> tuple[dt.date | None, dt.date | None]:
    """Two dates after a period label: "Leistungszeitraum: 12.01.2026 - 23.01.2026"."""
    for _, rest in _label_values(lines, _PERIOD_LABEL):
        dates: list[dt.date] = []
        for match in itertools.islice(DATE_PATTERN.finditer(rest), 4):
            try:
                dates.append(parse_date(match.group(0), dayfirst=dayfirst))
            except ValueError:
                continue
        if len(dates) >= 2 and dates[0] <= dates[1]:
            return dates[0], dates[1]
    return None, None


# --- currency from the locale, when no amount carries a sign or code ---------------------

_EURO_COUNTRIES: Final = frozenset(
    "AT BE CY DE EE EL ES FI FR GR HR IE IT LT LU LV MT NL PT SI SK".split()  # noqa: SIM905
)
_COUNTRY_CURRENCY: Final = {
    **dict.fromkeys(_EURO_COUNTRIES, "EUR"),
    **{"GB": "GBP", "CH": "CHF", "LI": "CHF", "SE": "SEK", "DK": "DKK", "NO": "NOK"},
    **{"PL": "PLN", "CZ": "CZK", "HU": "HUF", "RO": "RON", "BG": "BGN"},
}
# A VAT number's country: "BTW-nr: NL001234567B02", "TVA BE 0412.345.678", "UID: ATU123".
_VAT_COUNTRY: Final = re.compile(
    r"(?<![A-Za-z])(?:vat|tva|btw|ust|mwst|uid|iva|moms|mva)\b[^A-Za-z\n]{0,15}"
    r"([A-Z]{2})(?=\s?[0-9U])",
    _I,
)
# Words only an invoice in German, French or Dutch prints; with a decimal comma they
# mean euros when nothing else says.
_EURO_LANGUAGE_WORDS: Final = re.compile(
    r"\b(?:rechnung|mwst|umsatzsteuer|gesamtbetrag|facture|tva|montant|factuur|btw|totaal"
    r"|bedrag)\b",
    _I,
)


def _currency_from_locale(
    lines: Sequence[_Line], vendor_tax_id: str | None, decimal: DecimalSeparator | None
) -> str | None:
    """The currency of the vendor's country (VAT number, IBAN), else of the language."""
    countries = [vendor_tax_id[:2].upper()] if vendor_tax_id else []
    head = [line.text for line in lines[:60]]
    countries += [m.group(1).upper() for t in head for m in _VAT_COUNTRY.finditer(t)]
    iban = _iban(lines)
    countries += [iban[:2]] if iban else []
    for country in countries:
        if country in _COUNTRY_CURRENCY:
            return _COUNTRY_CURRENCY[country]
    if decimal == "," and any(_EURO_LANGUAGE_WORDS.search(text) for text in head):
        return "EUR"
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
    notes: list[str],
) -> list[tuple[int, LineItem]]:
    if header_pos is None:
        return []  # without a table header, arithmetic-looking prose is too risky
    columns, has_pos = layout
    items: list[tuple[int, LineItem]] = []
    for line in lines[header_pos + 1 :]:
        item = _parse_item(line.text, columns, has_pos, decimal, notes)
        if item is not None:
            items.append((line.index, item))
            continue
        if _AMOUNT.search(line.text) and any(
            p.match(line.text) for f, p in _TOTAL_LABELS if f in ("subtotal", "total", "total_weak")
        ):
            break  # the totals block ends the table
    return items


_MAX_TOKENS_PER_NUMBER: Final = 3  # "1 234 567,89" spans three tokens


def _parse_item(
    text: str,
    columns: tuple[Column, ...],
    has_pos: bool,
    decimal: DecimalSeparator | None,
    notes: list[str],
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
            value = read_amount(raw, decimal=decimal, notes=notes)
            if value is None:
                break
            values[column] = value
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
