"""Scanned and mixed PDFs: per-page decision, Tesseract OCR, confidence, vision images.

Needs the Debian packages tesseract-ocr and its deu/fra/nld language packs (the
Makefile's system-deps target installs them).
"""

from __future__ import annotations

import io
import random
from functools import cache
from pathlib import Path

import pytest
from fpdf import FPDF
from PIL import Image, ImageDraw

from invoiceflow import ocr
from invoiceflow.documents import DocumentError, DocumentLimits, ReadDocument, read_document
from invoiceflow.evaluate import evaluate_scans, scan_summary
from invoiceflow.extractors.rules import RulesExtractor, extract_invoice
from invoiceflow.samples import generate_invoice, write_scanned_corpus
from invoiceflow.sandbox import DocumentWorkers
from invoiceflow.scans import mixed_pdf, scanned_pdf
from invoiceflow.schema import Invoice

HEADER = ("invoice_number", "invoice_date", "currency", "total")
LIMITS = DocumentLimits()


@cache
def sample(seed: int = 11, language: str = "en") -> tuple[bytes, Invoice]:
    return generate_invoice(seed, language=language)  # type: ignore[arg-type]


def header(invoice: Invoice) -> dict[str, object]:
    return {name: getattr(invoice, name) for name in HEADER}


def image_pdf(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG")
    pdf = FPDF(unit="pt", format=(595, 842))
    pdf.add_page()
    pdf.image(io.BytesIO(out.getvalue()), x=0, y=0, w=595, h=842)
    return bytes(pdf.output())


def test_scanned_invoice_is_read_by_ocr_with_the_right_header_fields() -> None:
    pdf, truth = sample()
    scan = scanned_pdf(pdf, seed=1)
    doc = read_document(scan, "scan.pdf", LIMITS)
    assert doc.read_as == "ocr"
    assert doc.pages == 1
    (page,) = doc.page_reads
    assert page.method == "ocr"
    assert page.ocr_confidence is not None and 70 <= page.ocr_confidence <= 100
    assert page.chars > 200
    assert doc.review_reasons == ()
    assert header(extract_invoice(doc.text)) == header(truth)


def test_mixed_pdf_reads_page_one_as_text_and_page_two_by_ocr() -> None:
    pdf, truth = sample(12, "de")
    mixed = mixed_pdf(pdf, seed=3, sender=truth.vendor_name or "")
    doc = read_document(mixed, "mixed.pdf", LIMITS)
    assert doc.pages == 3  # a cover letter, then the two-page invoice scanned
    assert [p.method for p in doc.page_reads] == ["text", "ocr", "ocr"]
    assert doc.page_reads[0].ocr_confidence is None
    assert all(p.ocr_confidence is not None for p in doc.page_reads[1:])
    assert doc.read_as == "ocr"
    assert "Dear Sir or Madam" in doc.text  # page 1, from its text layer
    assert header(extract_invoice(doc.text)) == header(truth)


def test_text_pdf_is_not_ocrd() -> None:
    pdf, _ = sample()
    doc = read_document(pdf, "text.pdf", LIMITS)
    assert doc.read_as == "text"
    assert [(p.method, p.ocr_confidence) for p in doc.page_reads] == [("text", None)]


def test_blank_page_fails_ocr_failed_with_the_confidence() -> None:
    blank = image_pdf(Image.new("L", (1240, 1754), 255))
    with pytest.raises(DocumentError) as caught:
        read_document(blank, "blank.pdf", LIMITS)
    assert caught.value.kind == "ocr_failed"
    assert caught.value.transient is False
    assert "confidence 0%" in str(caught.value)


def test_page_of_blots_fails_ocr_failed_with_the_confidence() -> None:
    """Ink, but no text: Tesseract reads the blots as stray characters."""
    rng = random.Random(7)
    page = Image.new("L", (620, 877), 255)
    draw = ImageDraw.Draw(page)
    for _ in range(200):
        x, y = rng.randrange(600), rng.randrange(850)
        draw.ellipse((x, y, x + rng.randrange(2, 15), y + rng.randrange(2, 15)), fill=0)
    with pytest.raises(DocumentError) as caught:
        read_document(image_pdf(page), "blots.pdf", LIMITS)
    assert caught.value.kind == "ocr_failed"
    assert "confidence" in str(caught.value)


def test_low_confidence_gives_a_review_reason() -> None:
    pdf, _ = sample()
    doc = read_document(
        scanned_pdf(pdf, seed=1), "scan.pdf", DocumentLimits(min_ocr_confidence=99.5)
    )
    assert any("low confidence" in reason for reason in doc.review_reasons)


def test_vision_auto_keeps_image_pages_as_bounded_pngs() -> None:
    pdf, truth = sample(12, "de")
    mixed = mixed_pdf(pdf, seed=2, sender=truth.vendor_name or "")
    limits = DocumentLimits(vision="auto", max_image_pixels=1_000_000)
    doc = read_document(mixed, "mixed.pdf", limits)
    assert doc.read_as == "vision"
    assert [p.method for p in doc.page_reads] == ["text", "image", "image"]
    assert len(doc.images) == 2
    for png in doc.images:
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG"
        assert 500_000 < image.width * image.height <= 1_000_000


def test_vision_always_sends_every_page_up_to_max_images() -> None:
    pdf, truth = sample(12, "de")
    mixed = mixed_pdf(pdf, seed=2, sender=truth.vendor_name or "")
    doc = read_document(mixed, "mixed.pdf", DocumentLimits(vision="always", max_images=1))
    assert len(doc.images) == 1
    # Pages past max_images are OCR'd instead.
    assert [p.method for p in doc.page_reads] == ["image", "ocr", "ocr"]


@pytest.mark.documents
def test_scan_is_read_inside_a_worker_under_its_memory_limit() -> None:
    """Tesseract inherits the worker's RLIMIT_AS; the default limit must leave it room."""
    pdf, truth = sample()
    with DocumentWorkers(1, LIMITS) as workers:
        doc = workers.read(scanned_pdf(pdf, seed=1), "scan.pdf")
    assert isinstance(doc, ReadDocument)
    assert doc.read_as == "ocr"
    assert header(extract_invoice(doc.text)) == header(truth)


async def test_eval_scanned_compares_scans_with_the_same_invoices_text(tmp_path: Path) -> None:
    write_scanned_corpus(tmp_path, 2, seed=3, mixed_share=1.0)
    assert len(list(tmp_path.glob("*.pdf"))) == 6  # text, scan and mixed of each
    reports = await evaluate_scans(tmp_path, RulesExtractor())
    assert set(reports) == {"text", "scan", "mixed"}
    assert all(report.documents == 2 for report in reports.values())
    assert reports["scan"].read_as["ocr"] == 2 and reports["text"].read_as["text"] == 2
    lines = scan_summary(reports)
    assert any(line.startswith("scan header fields:") and "of text" in line for line in lines)


def ruled_table_pdf() -> bytes:
    """A letterhead in large bold type over a bordered table: labels in one row of cells,
    values in the row below (a common real layout, not the generator's)."""
    pdf = FPDF(unit="mm", format="A4")
    pdf.add_page()
    pdf.set_font("helvetica", "B", 30)
    pdf.cell(0, 14, "HEAVY METAL WORKS", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(6)
    rows = (
        ("Rechnungsnummer", "Rechnungsdatum", "Kundennummer"),
        ("RE-2026-4417", "14.03.2026", "K-20931"),
    )
    for style, row in zip(("B", ""), rows, strict=True):
        pdf.set_font("helvetica", style, 9)
        for text in row:
            pdf.cell(pdf.epw / 3, 7, text, border=1)
        pdf.ln(7)
    pdf.ln(6)
    pdf.set_font("helvetica", "", 10)
    pdf.cell(0, 6, "Gesamtbetrag: 1.234,56 EUR", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def test_scan_of_a_ruled_table_keeps_the_value_row_under_its_labels() -> None:
    # Before table rules were removed, Tesseract (psm 6) dropped the values under the
    # labels and the rules turned into letters ("[mvoicenumber").
    doc = read_document(scanned_pdf(ruled_table_pdf(), seed=3), "ruled.pdf", LIMITS)
    rows = doc.text.splitlines()
    assert any("RE-2026-4417" in row and "14.03.2026" in row for row in rows), doc.text
    invoice = extract_invoice(doc.text)
    assert (invoice.invoice_number, str(invoice.invoice_date)) == ("RE-2026-4417", "2026-03-14")


def test_rules_are_painted_white_and_thick_bars_are_kept() -> None:
    image = Image.new("L", (2480, 3508), 255)
    draw = ImageDraw.Draw(image)
    draw.rectangle((200, 400, 2200, 430), fill=0)  # a filled bar: bold type, a shaded header
    draw.line((200, 800, 2200, 800), fill=0, width=3)  # a table rule
    draw.line((200, 800, 200, 1200), fill=0, width=3)  # a cell border
    cleaned = ocr.without_rules(image)
    assert cleaned.getpixel((1200, 415)) == 0
    assert cleaned.getpixel((1200, 800)) == 255
    assert cleaned.getpixel((200, 1000)) == 255


def test_page_without_long_rules_goes_to_tesseract_unchanged() -> None:
    image = Image.new("L", (1240, 1754), 255)
    draw = ImageDraw.Draw(image)
    draw.rectangle((100, 100, 1100, 140), fill=0)  # a thick bar: a bold stroke, not a rule
    draw.line((100, 300, 300, 300), fill=0, width=2)  # an underline shorter than a rule
    assert ocr.without_rules(image) is image
