"""Locale-tolerant parsing of amounts and dates as they are printed on invoices.

Imports nothing from Prefect.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal, InvalidOperation
from typing import Final, Literal

DecimalSeparator = Literal[".", ","]

# Characters that only ever group thousands. U+00A0/U+202F are what French and Swedish
# typesetting put between groups; the apostrophes are Swiss.
_GROUP_ONLY: Final = " \u00a0\u202f'\u2019"
_MINUS_SIGNS: Final = "-\u2212\u2013"
_SYMBOLS: Final = "$€£¥₹₽₩₺"
# Currency codes/symbols glued to either end ("US$", "CHF", "kr.", "€"); never inside.
_CURRENCY_PREFIX: Final = re.compile(rf"^(?:[A-Za-z]+\.?\s*|[{_SYMBOLS}]\s*)+")
_CURRENCY_SUFFIX: Final = re.compile(rf"(?:\s*[A-Za-z]+\.?|\s*[{_SYMBOLS}])+$")
_DIGIT_GROUP: Final = re.compile(r"\d{1,3}")
_INDIAN_GROUPS: Final = re.compile(r"\d{1,2}(?:,\d{2})*,\d{3}")
# No invoice amount has more integer digits than this (10^15 is a thousand trillion);
# a longer run of digits is a tracking number or IBAN misread as money. Checking the
# length before building a Decimal also keeps the work bounded: Decimal's default
# context (28 digits) raises InvalidOperation on quantize() beyond it.
MAX_INTEGER_DIGITS: Final = 15
# Longer inputs are never one printed amount; refuse them before any regex runs.
_MAX_AMOUNT_CHARS: Final = 64


class AmountTooLarge(ValueError):
    """A well-formed number with more than `MAX_INTEGER_DIGITS` integer digits."""

    def __init__(self, text: str, digits: int) -> None:
        super().__init__(f"number too large to be money ({digits} integer digits): {text!r}")
        self.digits = digits
        self.review_reason = (
            f"ignored a {digits}-digit number as an amount (more than {MAX_INTEGER_DIGITS} "
            "integer digits cannot be money)"
        )


def read_amount(
    text: str, *, decimal: DecimalSeparator | None = None, notes: list[str] | None = None
) -> Decimal | None:
    """`parse_amount` that never raises: None for anything that is not money.

    A number too large to be money appends its review reason to ``notes`` (once per
    reason), so a caller can flag the document instead of silently dropping the value.
    """
    try:
        return parse_amount(text, decimal=decimal)
    except AmountTooLarge as exc:
        if notes is not None and exc.review_reason not in notes:
            notes.append(exc.review_reason)
        return None
    except ValueError:
        return None


def parse_amount(text: str, *, decimal: DecimalSeparator | None = None) -> Decimal:
    """Parse a printed amount such as "1,234.56", "1.234,56 €", "1 234,56", "CHF 1'234.50".

    `decimal` is the document's decimal separator when the caller knows it; without it
    a lone separator followed by exactly three digits ("1,234", "1.234") is read as a
    thousands separator, which is the more common meaning on invoices.

    Raises ValueError when the text is not a single well-formed number, and its
    subclass `AmountTooLarge` when it has more than `MAX_INTEGER_DIGITS` integer digits;
    never any other exception (decimal.InvalidOperation included).
    """
    if len(text) > _MAX_AMOUNT_CHARS:
        digits = sum(ch.isdigit() for ch in text)
        if digits > MAX_INTEGER_DIGITS and not any(ch.isspace() for ch in text.strip()):
            raise AmountTooLarge(text[:_MAX_AMOUNT_CHARS] + "…", digits)
        raise ValueError(f"too long to be an amount: {text[:_MAX_AMOUNT_CHARS]!r}…")
    raw = text.strip()
    negative = False
    if raw.startswith("(") and raw.endswith(")"):  # accounting notation for negatives
        negative, raw = True, raw[1:-1]
    for _ in range(2):  # the sign may sit on either side of a currency: "-€5", "€-5"
        if raw[:1] in _MINUS_SIGNS:
            negative, raw = True, raw[1:].lstrip()
        elif raw[-1:] in _MINUS_SIGNS:  # SAP-style trailing minus: "1.234,56-"
            negative, raw = True, raw[:-1].rstrip()
        elif raw[:1] == "+":
            raw = raw[1:].lstrip()
        raw = _CURRENCY_SUFFIX.sub("", _CURRENCY_PREFIX.sub("", raw)).strip()
    if not raw or (not raw[0].isdigit() and raw[0] not in ".,"):
        raise ValueError(f"not an amount: {text!r}")

    grouped_by_space = any(ch in raw for ch in _GROUP_ONLY)
    if grouped_by_space:
        groups = re.split(f"[{_GROUP_ONLY}]+", raw)
        if not all(g for g in groups):
            raise ValueError(f"not an amount: {text!r}")
        # Only the last group may carry decimals; every later group is exactly 3 digits.
        *head, last = groups
        if not (
            _DIGIT_GROUP.fullmatch(head[0]) and all(re.fullmatch(r"\d{3}", g) for g in head[1:])
        ):
            raise ValueError(f"malformed digit grouping: {text!r}")
        if not re.fullmatch(r"\d{3}(?:[.,]\d+)?", last):
            raise ValueError(f"malformed digit grouping: {text!r}")
        raw = "".join(groups)

    integer, fraction = _split(raw, decimal, text, allow_grouping=not grouped_by_space)
    significant = len(integer.lstrip("0"))
    if significant > MAX_INTEGER_DIGITS:
        raise AmountTooLarge(text, significant)
    if len(fraction) > MAX_INTEGER_DIGITS:
        raise ValueError(f"too many decimals for an amount: {text!r}")
    try:
        value = Decimal(f"{integer or '0'}.{fraction or '0'}")
    except InvalidOperation as exc:  # pragma: no cover - bounded above
        raise ValueError(f"not an amount: {text!r}") from exc
    if not fraction:
        value = value.quantize(Decimal(1))
    return -value if negative else value


def _split(
    raw: str, decimal: DecimalSeparator | None, original: str, *, allow_grouping: bool
) -> tuple[str, str]:
    """Split into integer digits and fraction digits, validating any grouping."""
    if not re.fullmatch(r"[\d.,]+", raw):
        raise ValueError(f"not an amount: {original!r}")
    dots, commas = raw.count("."), raw.count(",")
    if dots and commas:
        dec = "." if raw.rfind(".") > raw.rfind(",") else ","
    elif dots + commas == 0:
        return raw, ""
    else:
        sep = "." if dots else ","
        if decimal is not None:
            dec = decimal
        elif dots + commas > 1:
            dec = "," if sep == "." else "."  # repeated => it groups thousands
        else:
            after = raw.split(sep)[1]
            dec = ("," if sep == "." else ".") if len(after) == 3 and raw[0] != sep else sep
    group = "," if dec == "." else "."

    if raw.count(dec) > 1:
        raise ValueError(f"more than one decimal separator: {original!r}")
    integer, _, fraction = raw.partition(dec)
    if group in fraction:
        raise ValueError(f"grouping after the decimal separator: {original!r}")
    if group in integer:
        if not allow_grouping:
            raise ValueError(f"mixed digit grouping: {original!r}")
        if not (
            re.fullmatch(rf"\d{{1,3}}(?:\{group}\d{{3}})+", integer)
            or (group == "," and _INDIAN_GROUPS.fullmatch(integer))
        ):
            raise ValueError(f"malformed digit grouping: {original!r}")
        integer = integer.replace(group, "")
    if not integer and not fraction:
        raise ValueError(f"not an amount: {original!r}")
    return integer, fraction


_MONTHS: Final[dict[str, int]] = {
    name: number
    for number, names in enumerate(
        [
            (
                "january",
                "jan",
                "januar",
                "jän",
                "jaen",
                "janvier",
                "janv",
                "enero",
                "gennaio",
                "januari",
            ),
            (
                "february",
                "feb",
                "febr",
                "februar",
                "février",
                "fevrier",
                "févr",
                "fevr",
                "febrero",
                "febbraio",
                "februari",
            ),
            ("march", "mar", "märz", "maerz", "mrz", "mars", "marzo", "maart", "mrt"),
            ("april", "apr", "avril", "avr", "abril", "aprile"),
            ("may", "mai", "mayo", "maggio", "mei", "maj"),
            ("june", "jun", "juni", "juin", "junio", "giugno"),
            ("july", "jul", "juli", "juillet", "juil", "julio", "luglio"),
            ("august", "aug", "août", "aout", "agosto", "augusti", "augustus"),
            ("september", "sep", "sept", "septembre", "septiembre", "settembre"),
            ("october", "oct", "oktober", "okt", "octobre", "octubre", "ottobre"),
            ("november", "nov", "novembre", "noviembre"),
            (
                "december",
                "dec",
                "dezember",
                "dez",
                "décembre",
                "decembre",
                "déc",
                "diciembre",
                "dicembre",
            ),
        ],
        start=1,
    )
    for name in names
}

_ORDINALS: Final = frozenset(("st", "nd", "rd", "th", "er"))
_MONTH_WORD: Final = r"[A-Za-zÀ-ÿ]{3,10}\.?"
# Order matters: the ISO form must win over the numeric forms it contains.
DATE_PATTERN: Final = re.compile(
    r"(?P<iso>\d{4}-\d{1,2}-\d{1,2})"
    r"|(?P<ymd>\d{4}[./]\d{1,2}[./]\d{1,2})"
    r"|(?P<num>\d{1,2}[./-]\d{1,2}[./-]\d{2,4})"
    rf"|(?P<dmy>\d{{1,2}}(?:er|st|nd|rd|th)?\.?[ -]{_MONTH_WORD}"
    r"(?:[\s,-]{0,3}\d{4}|-\d{2}(?!\d)))"
    rf"|(?P<mdy>{_MONTH_WORD} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}})"
)


def parse_date(text: str, *, dayfirst: bool = True) -> dt.date:
    """Parse a printed date: "2026-03-14", "14.03.2026", "14/03/2026", "March 14, 2026",
    "14 March 2026", "14-Mar-2026".

    `dayfirst` only decides numeric dates with "/" or "-" where both leading parts could
    be a day ("03/04/2026"); dotted dates are always day-first, and a part above 12
    settles the order on its own.

    Raises ValueError when the text holds no valid date.
    """
    match = DATE_PATTERN.search(text.strip())
    if match is None:
        raise ValueError(f"no date in {text!r}")
    token = match.group(0)
    kind = match.lastgroup
    try:
        if kind in ("iso", "ymd"):
            year, month, day = (int(p) for p in re.split(r"[-./]", token))
            return dt.date(year, month, day)
        if kind == "num":
            sep = re.search(r"[./-]", token).group(0)  # type: ignore[union-attr]
            first, second, year = (int(p) for p in token.split(sep))
            year = _full_year(year)
            if sep == "." or first > 12:
                day, month = first, second
            elif second > 12:
                month, day = first, second
            else:
                day, month = (first, second) if dayfirst else (second, first)
            return dt.date(year, month, day)
        words = re.findall(r"[A-Za-zÀ-ÿ]+|\d+", token)
        numbers = [int(w) for w in words if w.isdigit()]
        names = [w for w in words if not w.isdigit() and w.lower() not in _ORDINALS]
        month = _MONTHS.get(names[0].lower()) if names else None
        if month is None or len(numbers) != 2:
            raise ValueError(f"unknown month in {text!r}")
        day, year = numbers
        return dt.date(_full_year(year), month, day)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"invalid date {token!r}: {exc}") from exc


def _full_year(year: int) -> int:
    # Two-digit years on invoices are always recent; pivot like most ERP exports do.
    if year < 100:
        return 2000 + year if year < 70 else 1900 + year
    return year
