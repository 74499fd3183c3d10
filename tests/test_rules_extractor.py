"""RulesExtractor against generated ground truth, plus the normalisation helpers."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from invoiceflow.evaluate import HEADER_FIELDS
from invoiceflow.extractors import Extractor
from invoiceflow.extractors.rules import (
    RulesExtractor,
    extract_invoice,
    extract_invoice_with_notes,
)
from invoiceflow.normalize import AmountTooLarge, parse_amount, parse_date, read_amount
from invoiceflow.pdf import parse_pdf
from invoiceflow.samples import generate_corpus, generate_invoice, write_corpus
from invoiceflow.schema import Invoice, LineItem

NEWER_FIELDS = ("iban", "bic", "payment_terms", "customer_tax_id", "document_type")
CORPUS_SIZE = 60
CENT = Decimal("0.01")


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str, int, Invoice]]:
    """(stem, extracted text, pages, truth) for a fixed corpus."""
    rows = []
    for stem, pdf, truth in generate_corpus(CORPUS_SIZE, seed=0):
        parsed = parse_pdf(pdf)
        rows.append((stem, parsed.text, parsed.pages, truth))
    return rows


# --- the corpus itself is varied enough for the accuracy tests to mean something --------


def test_corpus_covers_the_hard_cases(corpus: list[tuple[str, str, int, Invoice]]) -> None:
    truths = [truth for _, _, _, truth in corpus]
    texts = [text for _, text, _, _ in corpus]
    assert max(pages for _, _, pages, _ in corpus) >= 2
    assert len({t.vendor_name for t in truths}) >= 10
    assert len({t.currency for t in truths}) >= 5
    assert any(t.po_number is None for t in truths) and any(t.po_number for t in truths)
    assert any(t.amount_due is None for t in truths)
    assert any(t.amount_due is not None and t.amount_due != t.total for t in truths)
    assert any(t.due_date is None for t in truths)
    assert any(len(t.line_items) >= 25 for t in truths)
    # Both decimal conventions and space-grouped thousands appear in the printed text.
    assert any("," in t and "." in t for t in texts)
    assert any(re.search(r"\d \d{3},\d{2}\b", t) for t in texts)
    # Two-column layouts interleave the customer with the invoice details on one line.
    assert any(
        re.search(rf"^{re.escape(t.customer_name or '?')} .*date", text, re.M | re.I)
        for text, t in zip(texts, truths, strict=True)
    )


def test_ground_truth_is_arithmetically_consistent(
    corpus: list[tuple[str, str, int, Invoice]],
) -> None:
    for stem, _, _, truth in corpus:
        assert 1 <= len(truth.line_items) <= 40, stem
        for item in truth.line_items:
            assert item.quantity is not None and item.unit_price is not None
            assert item.amount == (item.quantity * item.unit_price).quantize(CENT, ROUND_HALF_UP), (
                stem
            )
        assert truth.subtotal == sum(item.amount or 0 for item in truth.line_items), stem
        assert truth.total == (truth.subtotal or 0) + (truth.tax_total or 0), stem
        for money in (truth.subtotal, truth.tax_total, truth.total, truth.amount_due):
            assert money is None or money == money.quantize(CENT), stem


# --- accuracy ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", HEADER_FIELDS)
def test_header_field_matches_ground_truth(
    field: str, corpus: list[tuple[str, str, int, Invoice]]
) -> None:
    mismatches = [
        (stem, getattr(got, field), getattr(truth, field))
        for stem, text, _, truth in corpus
        if getattr(got := extract_invoice(text), field) != getattr(truth, field)
    ]
    assert mismatches == []


def test_line_items_match_ground_truth(corpus: list[tuple[str, str, int, Invoice]]) -> None:
    expected = sum(len(truth.line_items) for _, _, _, truth in corpus)
    correct = 0
    wrong_documents = []
    for stem, text, _, truth in corpus:
        items = extract_invoice(text).line_items
        correct += sum(a == b for a, b in zip(items, truth.line_items, strict=False))
        if items != truth.line_items:
            wrong_documents.append(stem)
    assert expected > 300
    assert wrong_documents == []
    assert correct == expected


async def test_async_extract_is_the_sync_result(
    corpus: list[tuple[str, str, int, Invoice]],
) -> None:
    extractor = RulesExtractor()
    assert isinstance(extractor, Extractor)
    assert extractor.name == "rules"
    _, text, _, truth = corpus[0]
    # The generator's truth states the classic fields; the page also prints an IBAN,
    # BIC and payment terms, which the rules read on top.
    got = await extractor.extract(text)
    assert got.model_copy(update=dict.fromkeys(NEWER_FIELDS)) == truth
    assert got.iban == "DE89370400440532013000" and got.bic == "COBADEFFXXX"


# --- text not produced by our generator ----------------------------------------------------

US_INVOICE = """\
INVOICE
Acme Widgets LLC
123 Main St, Springfield, IL 62701
Tax ID: 12-3456789
Invoice # 10045
Date: 03/04/2026
Due date: 04/03/2026
P.O. No. 7781-A
Bill To:
Jane's Bakery
Description Qty Rate Amount
Flour 25kg bag 2 30.00 60.00
Industrial oven 1 1,200.00 1,200.00
Subtotal $1,260.00
Sales Tax (8%) $100.80
Total $1,360.80
Balance Due $1,360.80
"""

EU_INVOICE = """\
Müller & Söhne GmbH · Hauptstraße 5 · 80331 München
USt-IdNr / VAT No.: DE129273398
Rechnung
Customer: Café Central KG
Invoice no.: 2026-0815      Invoice date: 14. März 2026
Pos. Item Quantity Price Amount
1 Beratung 2,5 120,00 300,00
2 Reisekosten 1 1.234,56 1.234,56
Net amount 1.534,56
VAT 19% 291,57
Total EUR 1.826,13
"""


def test_hand_written_us_invoice_reads_dates_month_first() -> None:
    invoice = extract_invoice(US_INVOICE)
    assert invoice.invoice_number == "10045"
    assert invoice.invoice_date == dt.date(2026, 3, 4)
    assert invoice.due_date == dt.date(2026, 4, 3)
    assert invoice.vendor_name == "Acme Widgets LLC"
    assert invoice.vendor_tax_id == "12-3456789"
    assert invoice.customer_name == "Jane's Bakery"
    assert invoice.po_number == "7781-A"
    assert invoice.currency == "USD"
    assert (invoice.subtotal, invoice.tax_total, invoice.total, invoice.amount_due) == (
        Decimal("1260.00"),
        Decimal("100.80"),
        Decimal("1360.80"),
        Decimal("1360.80"),
    )
    assert invoice.line_items == [
        LineItem(
            description="Flour 25kg bag", quantity=2, unit_price=Decimal(30), amount=Decimal(60)
        ),
        LineItem(
            description="Industrial oven",
            quantity=1,
            unit_price=Decimal(1200),
            amount=Decimal(1200),
        ),
    ]


def test_hand_written_eu_invoice_uses_comma_decimals() -> None:
    invoice = extract_invoice(EU_INVOICE)
    assert invoice.invoice_number == "2026-0815"
    assert invoice.invoice_date == dt.date(2026, 3, 14)
    assert invoice.due_date is None
    assert invoice.vendor_name == "Müller & Söhne GmbH"
    assert invoice.vendor_tax_id == "DE129273398"
    assert invoice.customer_name == "Café Central KG"
    assert invoice.currency == "EUR"
    assert invoice.subtotal == Decimal("1534.56")
    assert invoice.tax_total == Decimal("291.57")
    assert invoice.total == Decimal("1826.13")
    assert invoice.amount_due is None
    assert [(i.description, i.quantity, i.amount) for i in invoice.line_items] == [
        ("Beratung", Decimal("2.5"), Decimal("300.00")),
        ("Reisekosten", Decimal(1), Decimal("1234.56")),
    ]


def test_customer_vat_id_is_not_taken_for_the_vendor() -> None:
    text = (
        "Bill to:\nGlobex Ltd\nCustomer VAT ID: GB999999973\n"
        "Invoice No.: 7\nSeller VAT ID: GB123456789\n"
    )
    assert extract_invoice(text).vendor_tax_id == "GB123456789"


def test_unknown_currency_code_is_none_not_an_error() -> None:
    invoice = extract_invoice("Currency: XYZ\nTotal XYZ 12.00\n")
    assert invoice.currency is None
    assert invoice.total == Decimal("12.00")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\f\n  ",
        "lorem ipsum dolor sit amet\nconsectetur adipiscing elit",
        "Total: lots\nInvoice No.: none\nDate: yesterday\nCurrency: money",
        "Subtotal 99999999999999999999.99\nTotal 1,2,3,4\nVAT 12.03.2026",
        "\x00\x01\ufffd" * 50,
        "Description Qty Price Amount\nWidget 1 99999999999999999999.99 99999999999999999999.99",
        "Description Qty Price Amount\nWidget 1 1.00001 1.00001",
    ],
)
def test_garbage_gives_an_empty_valid_invoice(text: str) -> None:
    invoice = extract_invoice(text)
    assert Invoice.model_validate(invoice.model_dump()) == invoice
    assert invoice == Invoice()


def test_mangled_real_text_never_raises(corpus: list[tuple[str, str, int, Invoice]]) -> None:
    rng = random.Random(3)
    alphabet = "0123456789.,' :/-€$£abcXYZ\n"
    for _, text, _, _ in corpus[:20]:
        for _ in range(10):
            chars = list(text)
            for _ in range(rng.randint(1, 60)):
                chars[rng.randrange(len(chars))] = rng.choice(alphabet)
            invoice = extract_invoice("".join(chars))
            assert Invoice.model_validate(invoice.model_dump()) == invoice


# --- generator determinism and corpus files ----------------------------------------------


def test_generator_is_deterministic() -> None:
    first_pdf, first_truth = generate_invoice(42)
    second_pdf, second_truth = generate_invoice(42)
    assert first_pdf == second_pdf
    assert first_truth == second_truth
    other_pdf, other_truth = generate_invoice(43)
    assert other_pdf != first_pdf and other_truth != first_truth


def test_corpus_is_deterministic_across_processes() -> None:
    # A fresh interpreter with a different hash seed must produce identical bytes.
    code = (
        "import hashlib; from invoiceflow.samples import generate_corpus; "
        "h = hashlib.sha256(); "
        "[h.update(s.encode() + p + t.model_dump_json().encode())"
        " for s, p, t in generate_corpus(8, 3)]; "
        "print(h.hexdigest())"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, check=True
    )
    local = hashlib.sha256()
    for stem, pdf, truth in generate_corpus(8, 3):
        local.update(stem.encode() + pdf + truth.model_dump_json().encode())
    assert out.stdout.strip() == local.hexdigest()


def test_corpus_seeds_give_different_documents() -> None:
    a = {pdf for _, pdf, _ in generate_corpus(5, seed=0)}
    b = {pdf for _, pdf, _ in generate_corpus(5, seed=1)}
    stems = [stem for stem, _, _ in generate_corpus(5, seed=1)]
    assert stems == [f"invoice-{i:04d}" for i in range(5)]
    assert len(a) == len(b) == 5
    assert not a & b


def test_write_corpus_round_trips(tmp_path: Path) -> None:
    written = write_corpus(tmp_path / "corpus", 4, seed=9)
    assert [p.name for p in written] == [f"invoice-{i:04d}.pdf" for i in range(4)]
    for (stem, pdf, truth), path in zip(generate_corpus(4, seed=9), written, strict=True):
        assert path.read_bytes() == pdf
        stored = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        assert Invoice.model_validate(stored) == truth
        assert path.stem == stem


# --- normalisation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234.56", "1234.56"),
        ("1.234,56", "1234.56"),
        ("1 234,56", "1234.56"),
        ("1\u00a0234,56", "1234.56"),
        ("1\u202f234,56", "1234.56"),
        ("1'234.56", "1234.56"),
        ("1\u2019234.56", "1234.56"),
        ("1,234,567.89", "1234567.89"),
        ("1.234.567,89", "1234567.89"),
        ("12,34,567.00", "1234567.00"),
        ("1,234", "1234"),
        ("1.234", "1234"),
        ("2,5", "2.5"),
        ("0.75", "0.75"),
        (".5", "0.5"),
        ("42", "42"),
        ("EUR 1.234,56", "1234.56"),
        ("1.234,56 €", "1234.56"),
        ("£3,086.40", "3086.40"),
        ("US$ 9.99", "9.99"),
        ("CHF 1'234.50", "1234.50"),
        ("kr 1 234,50", "1234.50"),
        ("-€5.00", "-5.00"),
        ("(1,234.50)", "-1234.50"),
        ("1.234,56-", "-1234.56"),
    ],
)
def test_parse_amount(text: str, expected: str) -> None:
    value = parse_amount(text)
    assert value == Decimal(expected)
    assert str(value) == expected  # the printed precision is kept


def test_parse_amount_decimal_hint_resolves_ambiguity() -> None:
    assert parse_amount("1,234") == Decimal(1234)
    assert parse_amount("1,234", decimal=",") == Decimal("1.234")
    assert parse_amount("1.234", decimal=".") == Decimal("1.234")
    assert parse_amount("1.234,5", decimal=",") == Decimal("1234.5")


@pytest.mark.parametrize(
    "text",
    ["", "abc", "12abc34", "12.03.2026", "1.234.56", "1,2,3", "1 23,45", "1,234.5.6", "-", "€"],
)
def test_parse_amount_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_amount(text)


@pytest.mark.parametrize(
    ("text", "dayfirst", "expected"),
    [
        ("2026-03-14", True, dt.date(2026, 3, 14)),
        ("14.03.2026", False, dt.date(2026, 3, 14)),
        ("14/03/2026", False, dt.date(2026, 3, 14)),
        ("03/14/2026", True, dt.date(2026, 3, 14)),
        ("03/04/2026", True, dt.date(2026, 4, 3)),
        ("03/04/2026", False, dt.date(2026, 3, 4)),
        ("04-03-2026", True, dt.date(2026, 3, 4)),
        ("March 14, 2026", True, dt.date(2026, 3, 14)),
        ("Mar 4th, 2026", True, dt.date(2026, 3, 4)),
        ("14 March 2026", True, dt.date(2026, 3, 14)),
        ("14-Mar-2026", True, dt.date(2026, 3, 14)),
        ("1. März 2026", True, dt.date(2026, 3, 1)),
        ("Date: 2026/03/14 (issued)", True, dt.date(2026, 3, 14)),
        ("05.01.26", True, dt.date(2026, 1, 5)),
    ],
)
def test_parse_date(text: str, dayfirst: bool, expected: dt.date) -> None:
    assert parse_date(text, dayfirst=dayfirst) == expected


@pytest.mark.parametrize("text", ["", "soon", "31.02.2026", "13/13/2026", "Foo 12, 2026"])
def test_parse_date_rejects_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        parse_date(text)


def test_generated_number_styles_parse_back() -> None:
    from invoiceflow.samples import format_amount

    rng = random.Random(1)
    styles = Counter[str]()
    for _ in range(500):
        value = Decimal(rng.randrange(0, 10**9)) / 100
        for style in ("en", "de", "ch", "sv"):
            decimal = "," if style in ("de", "sv") else "."
            assert parse_amount(format_amount(value, style), decimal=decimal) == value  # type: ignore[arg-type]
            styles[style] += 1
    assert len(styles) == 4


# --- numbers too large to be money (issue 11 item 1) ---------------------------------------

HUGE = "12345678901234567890123456789"  # 29 digits, e.g. a parcel tracking number


@pytest.mark.parametrize(
    "text", [HUGE, f"{HUGE}.00", f"EUR {HUGE}", f"-{HUGE},50", f"({HUGE})", "9" * 16, "1" * 5000]
)
def test_parse_amount_refuses_numbers_too_large_to_be_money(text: str) -> None:
    with pytest.raises(AmountTooLarge) as caught:
        parse_amount(text)
    assert "cannot be money" in caught.value.review_reason
    assert read_amount(text) is None
    notes: list[str] = []
    assert read_amount(text, notes=notes) is None
    assert read_amount(text, notes=notes) is None
    assert len(notes) == 1 and "digit number" in notes[0]


def test_parse_amount_keeps_the_largest_plausible_amount() -> None:
    assert parse_amount("999,999,999,999,999.99") == Decimal("999999999999999.99")
    assert parse_amount("000000000000000000042.00") == Decimal("42.00")
    assert read_amount("not money") is None


HUGE_POSITIONS = {
    "total": f"Invoice No.: 7\nTotal {HUGE}\n",
    "total_with_decimals": f"Invoice No.: 7\nTotal EUR {HUGE}.00\n",
    "subtotal": f"Invoice No.: 7\nSubtotal {HUGE}.00\nTotal 10.00\n",
    "tax_total": f"Invoice No.: 7\nVAT 19% {HUGE},00\nTotal 10,00\n",
    "amount_due": f"Invoice No.: 7\nTotal 10.00\nAmount due {HUGE}.00\n",
    "item_quantity": f"Description Qty Price Amount\nWidget {HUGE} 1.00 1.00\nTotal 1.00\n",
    "item_unit_price": f"Description Qty Price Amount\nWidget 1 {HUGE}.00 1.00\nTotal 1.00\n",
    "item_amount": f"Description Qty Price Amount\nWidget 1 1.00 {HUGE}.00\nTotal 1.00\n",
    "item_all": f"Description Qty Price Amount\nWidget {HUGE} {HUGE}.00 {HUGE}.00\n",
    "tracking_number": f"Invoice No.: 7\nTracking {HUGE}\nTotal 10.00\n",
}


@pytest.mark.parametrize("position", sorted(HUGE_POSITIONS))
def test_29_digit_token_in_any_amount_position_is_ignored(position: str) -> None:
    text = HUGE_POSITIONS[position]
    invoice, notes = extract_invoice_with_notes(text)  # used to raise InvalidOperation
    assert Invoice.model_validate(invoice.model_dump()) == invoice
    amounts = [invoice.subtotal, invoice.tax_total, invoice.total, invoice.amount_due]
    amounts += [v for item in invoice.line_items for v in (item.unit_price, item.amount)]
    assert all(value is None or abs(value) < 10**15 for value in amounts)
    if position != "tracking_number":
        assert any("cannot be money" in note for note in notes), notes


async def test_rules_extraction_carries_the_review_reason() -> None:
    extraction = await RulesExtractor().extract_document(HUGE_POSITIONS["total"])
    assert extraction.invoice.total is None
    assert any("29-digit" in note for note in extraction.notes)


async def test_29_digit_token_reaches_a_review_reason_through_validation() -> None:
    from invoiceflow.validate import validate_extraction

    text = f"Invoice No.: 7\nTracking {HUGE}\nTotal 10.00 EUR\nAmount due {HUGE}.00\n"
    extraction = await RulesExtractor().extract_document(text)
    validated = validate_extraction(extraction, text)  # its evidence parses every number
    assert validated.invoice.total == Decimal("10.00")
    assert validated.invoice.amount_due is None
    assert any("29-digit" in reason for reason in validated.reasons)


# --- linear time (issue 11 item 4) -----------------------------------------------------------


def _seconds(text: str) -> float:
    """CPU seconds of one extraction: other processes on a shared machine do not count."""
    started = time.process_time()
    invoice = extract_invoice(text)
    elapsed = time.process_time() - started
    assert Invoice.model_validate(invoice.model_dump()) == invoice
    return elapsed


def _best_of(text: str, runs: int = 5) -> float:
    # The best of several runs: the machine is shared, and a slow run is noise, not cost.
    return min(_seconds(text) for _ in range(runs))


@pytest.mark.parametrize(
    "unit",
    [
        "Date: ",  # the reported case: 8,000 repeats took 31 s
        "Invoice No.: ",
        "Rechnung Nr. 5 Date: Total ",
        "Bill to: VAT ID: ",
        "Total\n",
        "Invoice date:\n",
    ],
)
def test_repeated_labels_take_linear_time(unit: str) -> None:
    small, large = unit * 2_000, unit * 8_000
    ratio = _best_of(large) / max(_best_of(small), 5e-3)
    assert ratio < 8, f"4x the input took {ratio:.1f}x the time"
    assert _best_of(large, runs=1) < 1.5


def test_reported_date_label_case_is_fast() -> None:
    assert _seconds("Date: " * 8_000) < 1.0  # was 31 s
    assert _seconds("Date: " * 10_000) < 1.0


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("one 5 MB line", "Total 12.00 Date: 01.02.2026 " * 180_000),
        ("100k lines", "Invoice No.: 5 Date: 01.02.2026 Total 3.00\n" * 100_000),
        ("5 MB of one digit", "1" * 5_000_000),
        ("5 MB of spaces after a month", "1 Jan" + " " * 5_000_000 + "2026"),
    ],
)
def test_adversarial_inputs_finish_in_bounded_time(name: str, text: str) -> None:
    assert _seconds(text) < 5, name


def test_overlong_text_is_flagged_for_review() -> None:
    text = "Invoice No.: 5\n" + "filler line\n" * 60_000 + "Total EUR 3.00\n"
    invoice, notes = extract_invoice_with_notes(text)
    assert invoice.invoice_number == "5" and invoice.total == Decimal("3.00")
    assert any("60002 lines" in note for note in notes), notes
    assert _seconds(text) < 3


def test_amount_beyond_the_schema_is_left_out_with_a_reason() -> None:
    # 15 integer digits parse as a number, but money holds 14: still no raise, and a note.
    invoice, notes = extract_invoice_with_notes("Invoice No.: 7\nTotal 123456789012345.00\n")
    assert invoice.total is None
    assert any("beyond what the schema holds" in note for note in notes), notes


@pytest.mark.parametrize(
    "text",
    [
        # A field line above the letterhead-free header: not a name.
        "Kd.-Nr.: 4471\nAuftrag vom 02.03.2026\nRechnung Nr. 88\nSumme brutto 119,00 €\n",
        # The issue date printed under the title, no label: not a name either.
        "Invoice 2231\nMarch 4, 2026\nTotal $ 50.00\n",
    ],
)
def test_a_field_or_a_date_at_the_top_is_not_the_vendor(text: str) -> None:
    assert extract_invoice(text).vendor_name is None


def test_the_letterhead_above_a_field_line_is_still_the_vendor() -> None:
    text = "Hofmann Elektro\nTel.: 0711 123456\nRechnung Nr. 88\nSumme brutto 119,00 €\n"
    assert extract_invoice(text).vendor_name == "Hofmann Elektro"


@pytest.mark.parametrize(
    ("row", "tax"),
    [
        # VAT summary rows print net, tax and gross: the tax is the middle column.
        ("VAT 20% 150.00 30.00 180.00", Decimal("30.00")),
        ("USt. 7 % 1.200,00 84,00 1.284,00", Decimal("84.00")),
        ("MwSt. 19 % 84,03 15,97", Decimal("15.97")),  # rate, net, tax: the last one
        # The same rows with a currency sign or code beside each amount.
        ("19 % MwSt. 756,00 € 143,64 € 899,64 €", Decimal("143.64")),
        ("Summe 19 % MwSt. EUR 756,00 EUR 143,64 EUR 899,64", Decimal("143.64")),
        ("Tax summary: VAT 20% £500.00 £100.00 £600.00", Decimal("100.00")),
        ("Davon 8,1 % MWST CHF 1'000.00 CHF 81.00 CHF 1'081.00", Decimal("81.00")),
        ("Sales tax 5% $200.00 $10.00 $210.00", Decimal("10.00")),
        # Columns that do not add up are no summary row.
        ("19 % MwSt. 756,00 € 143,64 € 900,00 €", None),
    ],
)
def test_tax_from_a_vat_summary_row(row: str, tax: Decimal | None) -> None:
    assert extract_invoice(f"Invoice No. 7\n{row}\nTotal 9,99\n").tax_total == tax


def test_a_date_labelled_as_the_referenced_invoices_is_not_the_issue_date() -> None:
    invoice = extract_invoice(
        "Atelier Brun SARL\nDate de facture initiale : 02/02/2026\n"
        "Numéro de facture initiale : FA-2026-301\nAvoir n° AV-12\n"
        "Date d'émission : 15/03/2026\nTotal TTC 120,00 €\n"
    )
    assert (invoice.invoice_number, invoice.invoice_date) == ("AV-12", dt.date(2026, 3, 15))
    only_reference = "Facture n° F-9\nDate de facture associée : 30/11/2025\nTotal TTC 1,00 €\n"
    assert extract_invoice(only_reference).invoice_date is None


@pytest.mark.parametrize("label", ["N° de client :", "Code client :", "Customer ID:"])
def test_a_customer_number_label_does_not_name_the_customer(label: str) -> None:
    text = f"Facture n° F-31\n{label} C-00412\nClient : Boulangerie Martin\nTotal TTC 60,00 €\n"
    assert extract_invoice(text).customer_name == "Boulangerie Martin"
    assert extract_invoice(f"Facture n° F-31\n{label} C-00412\n").customer_name is None


@pytest.mark.parametrize(
    "title",
    [
        "Rechnung Nr. 2026-77 von 09.03.2026",
        "Rechnungs-Nr. 2026-77 vom 09.03.2026",
        "Rechnungsnummer 2026-77 vom 09.03.2026",
        "Invoice number 2026-77 of 09.03.2026",
    ],
)
def test_issue_date_after_the_number_label(title: str) -> None:
    invoice = extract_invoice(f"Kessler Bau GmbH\n{title}\nGesamtbetrag 10,00 €\n")
    assert (invoice.invoice_number, invoice.invoice_date) == ("2026-77", dt.date(2026, 3, 9))


@pytest.mark.parametrize(
    ("sentence", "due"),
    [
        ("Bitte überweisen Sie den Betrag bis zum 20.03.2026.", dt.date(2026, 3, 20)),
        ("Bitte zahlen Sie bis spätestens 20.03.2026 ohne Abzug.", dt.date(2026, 3, 20)),
        ("Zahlen Sie mit Skonto bis zum 10.03.2026.", None),  # a discount date
    ],
)
def test_due_date_in_a_german_payment_request(sentence: str, due: dt.date | None) -> None:
    assert extract_invoice(f"Rechnung Nr. 4\n{sentence}\n").due_date == due


@pytest.mark.parametrize("label", ["USt-ID:", "VAT-ID:", "MwSt-ID"])
def test_hyphenated_vat_id_labels(label: str) -> None:
    text = f"Rechnung Nr. 4\n{label} DE287654321\nGesamtbetrag 10,00 €\n"
    invoice = extract_invoice(text)
    assert invoice.vendor_tax_id == "DE287654321"
    assert invoice.tax_total is None


def test_net_and_gross_invoice_sums() -> None:
    invoice = extract_invoice(
        "Rechnung Nr. 4\nRechnungsbetrag netto 200,00 €\nzzgl. 19 % USt. 38,00 €\n"
        "Rechnungsbetrag brutto 238,00 €\n"
    )
    assert (invoice.subtotal, invoice.tax_total, invoice.total) == (
        Decimal("200.00"),
        Decimal("38.00"),
        Decimal("238.00"),
    )
    # The net sum alone is not the total.
    assert extract_invoice("Rechnungssumme netto 845,00\n").total is None


@pytest.mark.parametrize(
    ("sender_line", "vendor"),
    [
        ("Praxis Dr. Lena Vogt • Am Anger 2 • 99084 Erfurt", "Praxis Dr. Lena Vogt"),
        ("studio nord | Seefeldstrasse 5 | CH-8008 Zürich", "studio nord"),
    ],
)
def test_the_return_address_line_names_the_vendor_not_the_recipient(
    sender_line: str, vendor: str
) -> None:
    text = (
        f"{sender_line}\nMüller Haustechnik GmbH\nz. Hd. Herrn Müller\nRingstraße 4\n"
        "99086 Erfurt\nRechnung Nr. 2026-14\nGesamtbetrag 300,00 €\n"
    )
    assert extract_invoice(text).vendor_name == vendor


def test_the_vat_number_wins_over_the_french_company_register_number() -> None:
    head = "Atelier Garnier SAS\nSIREN : 552 100 554\n"
    text = f"{head}N° TVA intracom. : FR40552100554\nFacture n° 88\nTotal TTC 120,00 €\n"
    assert extract_invoice(text).vendor_tax_id == "FR40552100554"
    # Without a VAT number the register number is still what is printed.
    assert extract_invoice(f"{head}Facture n° 88\n").vendor_tax_id == "552 100 554"


def test_a_return_address_line_out_of_reading_order_still_names_the_vendor() -> None:
    # Text extraction put the window-envelope block after the totals.
    text = (
        "Kundennummer: 4410\nRechnung Nr. 2026-14\nGesamtbetrag: 300,00 €\n"
        "Lieferadresse: Lager Ost KG | Hafenweg 3 | 18055 Rostock\n"
        "Elektro Sommer ● Lindenallee 7 ● 18057 Rostock\nJana Krüger\nBreite Str. 2\n"
    )
    assert extract_invoice(text).vendor_name == "Elektro Sommer"
    no_sender = text.replace("Elektro Sommer ● Lindenallee 7 ● 18057 Rostock\n", "")
    assert extract_invoice(no_sender).vendor_name is None  # never the delivery address


def test_the_letterhead_above_a_return_address_line_stays_the_vendor() -> None:
    text = (
        "Fotostudio Licht\nInh. Mara Licht · Domplatz 1 · 39104 Magdeburg\nHerrn\nOle Brandt\n"
        "Rechnung Nr. 77\nGesamtbetrag 80,00 €\n"
    )
    assert extract_invoice(text).vendor_name == "Fotostudio Licht"


@pytest.mark.parametrize(
    ("block", "customer"),
    [
        ("Herrn\nOle Brandt\nSchulstraße 3\n39108 Magdeburg\n", "Ole Brandt"),
        (
            "Zahnarztpraxis Dr. Ilse Kern\nLange Reihe 8\n20099 Hamburg\n",
            "Zahnarztpraxis Dr. Ilse Kern",
        ),
        ("Kundennummer: 10023\nRechnungsdatum: 03.03.2026\n", None),  # no address block: no guess
    ],
)
def test_the_recipient_under_the_return_address_line_is_the_customer(
    block: str, customer: str | None
) -> None:
    sender = "Druckerei Sand | Am Hafen 2 | 39104 Magdeburg\n"
    text = f"{sender}{block}Rechnung Nr. 7\nGesamtbetrag 9,00 €\n"
    assert extract_invoice(text).customer_name == customer


def test_an_ocr_point_for_the_decimal_comma_still_reads_the_amount() -> None:
    # OCR often reads a decimal comma as a point; "64.12" cannot be a thousands group.
    text = (
        "Factuur 2026-118\nFactuurdatum 04-05-2026\n"
        "Subtotaal: 1.234,50 €\nBTW 21% 64.12 €\nTotaal: 1.298,62 €\n"
    )
    invoice = extract_invoice(text)
    assert (invoice.subtotal, invoice.tax_total, invoice.total) == (
        Decimal("1234.50"),
        Decimal("64.12"),
        Decimal("1298.62"),
    )


def test_a_vat_summary_row_that_does_not_add_up_gives_no_tax() -> None:
    # OCR misread a digit of the tax column (38,00 -> 33,00): the row's last amount is
    # its gross, never the tax, so the tax stays unknown rather than wrong.
    text = "Facture FA-5521\nTotal HT 200,00\nTVA 19% : 200,00 33,00 238,00\nTotal TTC 238,00\n"
    invoice = extract_invoice(text)
    assert invoice.tax_total is None
    assert (invoice.subtotal, invoice.total) == (Decimal("200.00"), Decimal("238.00"))


def test_a_totals_label_line_ending_in_a_colon_states_no_amount() -> None:
    # "Tax exemption 2 :" is a numbered label with an empty value (OCR may add the
    # digit, too); it must not replace the tax stated above it.
    text = (
        "Invoice 55120\nSubtotal 240.00\nSales tax 19.80\nTotal 259.80\n"
        "Tax exemption 2 :\nTax reference :\n"
    )
    assert extract_invoice(text).tax_total == Decimal("19.80")
