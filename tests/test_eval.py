"""`invoiceflow eval` and the offline rules in English, German, French and Dutch."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from invoiceflow.evaluate import FIELDS, HEADER_FIELDS, evaluate_dir, pairs
from invoiceflow.extractors.rules import RulesExtractor, extract_invoice
from invoiceflow.pdf import parse_pdf
from invoiceflow.samples import LANGUAGES, generate_corpus, write_corpus
from invoiceflow.schema import Invoice

D = Decimal


@pytest.fixture(scope="module")
def varied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("varied")
    write_corpus(directory, 80, seed=11, varied=True, einvoice_share=0.15)
    return directory


def test_varied_corpus_mixes_languages_layouts_and_number_formats(varied_dir: Path) -> None:
    stems = [stem for stem, _, _ in pairs(varied_dir)]
    languages = Counter(stem.split("-")[2] for stem in stems)
    assert set(languages) == set(LANGUAGES) and min(languages.values()) >= 10
    assert any(stem.endswith(("-factur-x", "-zugferd", "-xrechnung-cii", "-xrechnung-ubl"))
               for stem in stems)  # fmt: skip
    texts = [parse_pdf(pdf.read_bytes()).text for _, pdf, _ in pairs(varied_dir)]
    joined = "\n".join(texts)
    for label in ("Rechnungsnummer", "Facture", "Factuur", "Invoice", "Gesamtbetrag", "TTC"):
        assert label in joined
    # 1.234,56 / 1,234.56 / 1 234,56 / 1'234.56
    for pattern in (r"\d\.\d{3},\d{2}", r"\d,\d{3}\.\d{2}", r"\d \d{3},\d{2}", r"\d'\d{3}\.\d{2}"):
        assert any(re.search(pattern, t) for t in texts), pattern


async def test_rules_score_every_field_on_the_varied_set(varied_dir: Path) -> None:
    report = await evaluate_dir(varied_dir, RulesExtractor())

    assert report.documents == 80 and not report.failures
    for name in FIELDS:
        score = report.fields[name]
        assert score.total == 80
        assert score.accuracy == 1.0, (name, report.mismatches.get(name, [])[:3])
    assert report.sources["einvoice"] >= 5
    assert report.sources["rules"] + report.sources["einvoice"] == 80
    assert report.exact_documents == 80 and report.needs_review == 0


async def test_without_the_fast_path_the_text_of_einvoices_is_read_too(varied_dir: Path) -> None:
    report = await evaluate_dir(varied_dir, RulesExtractor(), einvoice=False)
    assert report.sources == Counter({"rules": 80})
    assert report.header_accuracy == 1.0


async def test_scores_count_wrong_and_failed_documents(tmp_path: Path) -> None:
    write_corpus(tmp_path, 3, seed=2)
    # One expected file lies about the total; one "PDF" is not a PDF.
    first = tmp_path / "invoice-0000.json"
    truth = json.loads(first.read_text())
    first.write_text(json.dumps({**truth, "total": "0.01"}))
    (tmp_path / "broken.pdf").write_bytes(b"not a pdf")
    (tmp_path / "broken.json").write_text(Invoice().model_dump_json())
    (tmp_path / "orphan.pdf").write_bytes(b"no expected json: ignored")

    report = await evaluate_dir(tmp_path, RulesExtractor())
    assert report.documents == 4
    assert report.fields["total"].correct == 2  # two right; the liar and the failure wrong
    assert report.fields["invoice_number"].correct == 3
    assert set(report.failures) == {"broken"}
    assert "not_pdf" in report.failures["broken"]
    assert sorted(m[0] for m in report.mismatches["total"]) == ["broken", "invoice-0000"]


def test_cli_eval_generates_and_prints_per_field_accuracy(tmp_path: Path) -> None:
    from flows.cli import app

    target = tmp_path / "set"
    result = CliRunner().invoke(
        app, ["eval", str(target), "--generate", "12", "--seed", "4"], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    for name in HEADER_FIELDS:
        assert name in result.output
    assert "100.0%" in result.output
    assert "documents fully right: 12/12" in result.output
    assert len(list(target.glob("*.pdf"))) == 12


def test_cli_eval_on_an_empty_folder_fails(tmp_path: Path) -> None:
    from flows.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2


def test_generated_languages_are_deterministic() -> None:
    first = [(s, p) for s, p, _ in generate_corpus(6, seed=3, varied=True, einvoice_share=0.5)]
    again = [(s, p) for s, p, _ in generate_corpus(6, seed=3, varied=True, einvoice_share=0.5)]
    assert first == again


# --- text the generator never produced ----------------------------------------------------

GERMAN = """\
Bäckerei Schmidt GmbH & Co. KG · Lindenallee 3 · 50968 Köln
USt-IdNr.: DE811569869
RECHNUNG
Kunde: Hotel Adler GmbH
Rechnungs-Nr.: 2026/0117
Rechnungsdatum: 3. Februar 2026
Zahlbar bis: 17.02.2026
Ihre Bestellung: B-5521
Pos. Bezeichnung Anzahl Einzelpreis Gesamt
1 Brötchen (Kiste) 40 12,50 500,00
2 Laugenbrezel 120 0,85 102,00
Summe netto 602,00
MwSt. 7% 42,14
Rechnungsbetrag 644,14 €
"""

FRENCH = """\
Fromagerie Dubois SAS
12 rue de la Paix, 75002 Paris
N° TVA : FR12345678901
FACTURE
Numéro de facture : FD-2026-311
Date d'émission : 28/01/2026
Échéance : 27/02/2026
Client : Brasserie du Port SARL
Désignation Qté Prix unitaire Montant
Comté 18 mois (kg) 12,5 24,00 300,00
Brie de Meaux 6 18,40 110,40
Total HT 410,40
TVA 5,5 % 22,57
Total TTC 432,97
Net à payer 432,97 EUR
"""

DUTCH = """\
Bloemenkwekerij De Vries B.V.
Dorpsstraat 8, 1431 AB Aalsmeer
BTW-nummer: NL001234567B02
Factuur
Factuurnummer: DV-88012
Factuurdatum: 9 maart 2026
Vervaldatum: 23-03-2026
Klant: Tuincentrum Groen VOF
Omschrijving Aantal Prijs Bedrag
Tulpen (bos) 200 1,95 390,00
Rozen (bos) 50 4,50 225,00
Subtotaal 615,00
BTW 9% 55,35
Totaal € 670,35
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GERMAN,
            {
                "invoice_number": "2026/0117",
                "invoice_date": dt.date(2026, 2, 3),
                "due_date": dt.date(2026, 2, 17),
                "vendor_name": "Bäckerei Schmidt GmbH & Co. KG",
                "vendor_tax_id": "DE811569869",
                "customer_name": "Hotel Adler GmbH",
                "po_number": "B-5521",
                "currency": "EUR",
                "subtotal": D("602.00"),
                "tax_total": D("42.14"),
                "total": D("644.14"),
            },
        ),
        (
            FRENCH,
            {
                "invoice_number": "FD-2026-311",
                "invoice_date": dt.date(2026, 1, 28),
                "due_date": dt.date(2026, 2, 27),
                "vendor_name": "Fromagerie Dubois SAS",
                "vendor_tax_id": "FR12345678901",
                "customer_name": "Brasserie du Port SARL",
                "currency": "EUR",
                "subtotal": D("410.40"),
                "tax_total": D("22.57"),
                "total": D("432.97"),
                "amount_due": D("432.97"),
            },
        ),
        (
            DUTCH,
            {
                "invoice_number": "DV-88012",
                "invoice_date": dt.date(2026, 3, 9),
                "due_date": dt.date(2026, 3, 23),
                "vendor_name": "Bloemenkwekerij De Vries B.V.",
                "vendor_tax_id": "NL001234567B02",
                "customer_name": "Tuincentrum Groen VOF",
                "currency": "EUR",
                "subtotal": D("615.00"),
                "tax_total": D("55.35"),
                "total": D("670.35"),
            },
        ),
    ],
    ids=["de", "fr", "nl"],
)
def test_hand_written_invoices_in_other_languages(text: str, expected: dict[str, object]) -> None:
    invoice = extract_invoice(text)
    got = {name: getattr(invoice, name) for name in expected}
    assert got == expected
    assert len(invoice.line_items) == 2
    assert sum((item.amount or D(0) for item in invoice.line_items), D(0)) == invoice.subtotal


def test_eval_concurrency_does_not_change_scores(varied_dir: Path) -> None:
    one = asyncio.run(evaluate_dir(varied_dir, RulesExtractor(), concurrency=1))
    many = asyncio.run(evaluate_dir(varied_dir, RulesExtractor(), concurrency=16))
    assert {f: s.correct for f, s in one.fields.items()} == {
        f: s.correct for f, s in many.fields.items()
    }
