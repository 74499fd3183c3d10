"""The rules extractor on layouts real invoices use (issue 9 section 4).

`rules_handmade` holds hand-written invoice texts of different vendors and layouts; they
were written (with their expected fields) before the rules were adjusted to them.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal as D
from typing import Any

import pytest
from rules_handmade import CASES, CASES_ROUND_2, CASES_ROUND_3, CASES_ROUND_4, HEADER_FIELDS

from invoiceflow.extractors.rules import extract_invoice
from invoiceflow.pdf import parse_pdf
from invoiceflow.samples import (
    LANGUAGES,
    LAYOUTS,
    Language,
    Layout,
    generate_invoice,
    stated_fields,
)

Cases = dict[str, tuple[str, dict[str, Any]]]


def header_scores(cases: Cases = CASES) -> tuple[int, int, list[tuple[str, str, Any, Any]]]:
    """(correct, total, mismatches) over the header fields of hand-made cases."""
    correct, total, misses = 0, 0, []
    for name, (text, expected) in cases.items():
        invoice = extract_invoice(text)
        for field in HEADER_FIELDS:
            got = getattr(invoice, field)
            total += 1
            if got == expected[field]:
                correct += 1
            else:
                misses.append((name, field, got, expected[field]))
    return correct, total, misses


@pytest.mark.parametrize(
    "cases", [CASES, CASES_ROUND_2, CASES_ROUND_3], ids=["round-1", "round-2", "round-3"]
)
def test_handmade_set_header_fields_are_at_least_90_percent_exact(cases: Cases) -> None:
    # Each round was written before the rules were changed for it. Before: round 1
    # 58.9% (the rules as they were), round 2 71.9%, round 3 85.0% (each after the
    # previous round's changes).
    correct, total, misses = header_scores(cases)
    assert len(cases) >= 5
    assert correct / total >= 0.9, misses


@pytest.mark.parametrize("name", sorted(CASES_ROUND_4))
def test_round_4_reads_every_field_it_states(name: str) -> None:
    # Too few cases for a score: each states only what the rules must read exactly.
    text, expected = CASES_ROUND_4[name]
    invoice = extract_invoice(text)
    assert {field: getattr(invoice, field) for field in expected} == expected


ALL_CASES: Cases = {**CASES, **CASES_ROUND_2, **CASES_ROUND_3, **CASES_ROUND_4}


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_handmade_newer_fields_when_printed(name: str) -> None:
    text, expected = ALL_CASES[name]
    invoice = extract_invoice(text)
    for field, value in expected.items():
        if field not in HEADER_FIELDS:
            assert getattr(invoice, field) == value, field


# --- each layout on its own -------------------------------------------------------------


def test_value_on_the_line_under_its_label() -> None:
    invoice = extract_invoice(
        "Acme Ltd\nCredit Note No.\nCN-7\nDate\n9 January 2026\nDue\n8 February 2026\n"
        "Total Credit GBP 12.00\n"
    )
    assert (invoice.invoice_number, invoice.invoice_date) == ("CN-7", dt.date(2026, 1, 9))
    assert invoice.due_date == dt.date(2026, 2, 8)
    assert invoice.document_type == "credit_note" and invoice.total == D("12.00")


def test_row_of_labels_over_a_row_of_values() -> None:
    invoice = extract_invoice(
        "Factuur\nFactuurnummer Factuurdatum Vervaldatum Klantnummer\n"
        "2026-00412 14-01-2026 13-02-2026 10233\nTotaal te betalen € 1.512,50\n"
    )
    assert invoice.invoice_number == "2026-00412"
    assert (invoice.invoice_date, invoice.due_date) == (dt.date(2026, 1, 14), dt.date(2026, 2, 13))
    assert (invoice.total, invoice.currency) == (D("1512.50"), "EUR")


def test_two_column_header_reads_the_right_hand_column() -> None:
    invoice = extract_invoice(
        "GREEN VALLEY LANDSCAPING INVOICE\n4410 Orchard Ln DATE INVOICE #\n"
        "Fresno, CA 93722 3/14/2026 10482\nTOTAL $ 2,375.50\n"
    )
    assert (invoice.invoice_number, invoice.invoice_date) == ("10482", dt.date(2026, 3, 14))
    assert invoice.vendor_name == "GREEN VALLEY LANDSCAPING"


def test_a_stack_of_labels_then_a_stack_of_values() -> None:
    invoice = extract_invoice(
        "Acme Widgets Ltd\nINVOICE\nInvoice Number:\nInvoice Date:\nINV-20931\n3 March 2026\n"
        "Subtotal\nVAT 20%\nTotal GBP\n20.00\n4.00\n24.00\n"
    )
    assert (invoice.invoice_number, invoice.invoice_date) == ("INV-20931", dt.date(2026, 3, 3))
    assert (invoice.subtotal, invoice.tax_total, invoice.total) == (D(20), D(4), D(24))


@pytest.mark.parametrize(
    ("title", "number"),
    [
        ("Rechnung Nr. 2026-0042", "2026-0042"),
        ("Handelsrechnung (380) 05.03.2026 Nr. 471102", "471102"),
        ("FACTURE N° F-2026-0342", "F-2026-0342"),
        ("Gutschrift Nr. GS-2026-031", "GS-2026-031"),
        ("INVOICE #0042", "0042"),
        ("FACTUUR 2026-118", "2026-118"),
    ],
)
def test_number_after_the_document_title(title: str, number: str) -> None:
    assert extract_invoice(f"Acme GmbH\n{title}\nTotal 1,00 EUR\n").invoice_number == number


def test_reference_to_another_invoice_is_not_the_number() -> None:
    text = "Gutschrift\nZu Rechnung Nr. 2026-1187 vom 10.02.2026\nGutschrift Nr. GS-4\n"
    assert extract_invoice(text).invoice_number == "GS-4"


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("Gesamtbetrag 1.190,00 €", "total"),
        ("Zahlbetrag 1.190,00 €", "amount_due"),
        ("Rechnungsbetrag 1.190,00 €", "total"),
        ("Endbetrag 1.190,00 €", "total"),
        ("Total TTC 1 190,00 €", "total"),
        ("Net à payer 1 190,00 €", "amount_due"),
        ("Montant TTC 1 190,00 €", "total"),
        ("Factuur totaal € 1.190,00", "total"),
        ("Te betalen € 1.190,00", "amount_due"),
        ("Totaal te betalen € 1.190,00", "amount_due"),
        ("Grand total €1,190.00", "total"),
        ("Balance due €1,190.00", "amount_due"),
        ("Thank you for your business! TOTAL € 1,190.00", "total"),
    ],
)
def test_totals_as_real_invoices_label_them(line: str, field: str) -> None:
    invoice = extract_invoice(f"Invoice No. 5\nSubtotal 1.000,00\n{line}\n")
    assert getattr(invoice, field) == D("1190.00")
    assert invoice.total == D("1190.00")  # the payable amount stands in for a missing total
    assert invoice.subtotal == D("1000.00")


def test_small_print_above_the_header_is_not_the_vendor() -> None:
    invoice = extract_invoice(
        "Registered office: 4 Quay Street, Bristol. Company no. 08123456.\n"
        "Kestrel Print Works\nUnit 7, Avonmouth\nInvoice No: KPW-1\nTotal £5.00\n"
    )
    assert invoice.vendor_name == "Kestrel Print Works"
    assert invoice.invoice_number == "KPW-1"


@pytest.mark.parametrize(
    ("text", "currency"),
    [
        ("Rechnung Nr. 1\nUSt-IdNr.: DE811569869\nGesamtbetrag 10,00\n", "EUR"),
        ("Invoice No. 1\nVAT No: GB123456789\nTotal 10.00\n", "GBP"),
        ("Facture n° 1\nTVA BE 0412.345.678\nTotal TTC 10,00\n", "EUR"),
        ("Factuur nr. 1\nTotaal 10,00\n", "EUR"),
        ("Invoice No. 1\nTotal 10.00\n", None),  # nothing says which dollar, pound or euro
    ],
)
def test_currency_from_the_locale_when_no_amount_carries_one(
    text: str, currency: str | None
) -> None:
    assert extract_invoice(text).currency == currency


def test_ocr_letter_o_in_numbers_is_read_as_zero() -> None:
    invoice = extract_invoice("Rechnung\nRechnungsnummer: RE-2O26-O117\nGesamtbetrag 1.19O,OO €\n")
    assert (invoice.invoice_number, invoice.total) == ("RE-2026-0117", D("1190.00"))
    # Words keep their O: "Oct", "PO", "SO12" are not numbers.
    assert extract_invoice("Invoice No.: SO12\nDate: 1 Oct 2026\n").invoice_number == "SO12"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("language", LANGUAGES)
def test_generated_layouts_read_right(layout: Layout, language: Language) -> None:
    pdf, truth = generate_invoice(5, language=language, layout=layout)
    got = extract_invoice(parse_pdf(pdf).text)
    assert stated_fields(got) == truth


def test_more_label_variants() -> None:
    invoice = extract_invoice(
        "Beleg-Nr.: B-77\nDate de la facture : 14-Mar-26\nMWST-Nr. CHE-123.456.789\n"
        "Total (excl. VAT) 100.00\nTotal (incl. VAT) 119.00\n"
    )
    assert (invoice.invoice_number, invoice.invoice_date) == ("B-77", dt.date(2026, 3, 14))
    assert (invoice.subtotal, invoice.total) == (D("100.00"), D("119.00"))
    assert invoice.currency == "CHF"  # from the Swiss VAT number, not ISO "CHE"


def test_totals_stack_with_a_label_we_do_not_know() -> None:
    invoice = extract_invoice(
        "Factuurnummer: 7\nSubtotaal\nVerzendkosten\nBTW (21%)\nTotaal\n"
        "€ 82,64\n€ 0,00\n€ 17,36\n€ 100,00\n"
    )
    assert (invoice.subtotal, invoice.tax_total, invoice.total) == (
        D("82.64"),
        D("17.36"),
        D("100.00"),
    )


def test_number_on_the_line_under_the_title_and_ocr_l_for_i() -> None:
    assert extract_invoice("Acme Pte. Ltd.\nTAX INVOICE\n# INV-000112\n").invoice_number == (
        "INV-000112"
    )
    assert extract_invoice("lnvoice No: 2O26-118\n").invoice_number == "2026-118"


def test_ocr_of_a_bold_totals_line_puts_the_amount_above_its_label() -> None:
    text = "Rechnung Nr. 5\nNettobetrag 394.848,47\nMwSt. 7% 27.639,39\n422.487 ,86\nSumme brutto\n"
    invoice = extract_invoice(text)
    assert (invoice.subtotal, invoice.total) == (D("394848.47"), D("422487.86"))


def test_ocr_label_confusions() -> None:
    assert extract_invoice("Factuumummer: VDB-1\n").invoice_number == "VDB-1"
    assert extract_invoice("Facture.n° : FA-9\n").invoice_number == "FA-9"


def test_ocr_dot_read_as_colon_in_a_date() -> None:
    assert extract_invoice("Ausstellungsdatum: 30.08:2025\n").invoice_date == dt.date(2025, 8, 30)
    assert extract_invoice("Datum: 12:30 Uhr\n").invoice_date is None
