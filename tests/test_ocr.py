"""Scanned and mixed PDFs: per-page decision, Tesseract OCR, confidence, vision images.

Needs the Debian packages tesseract-ocr and its deu/fra/nld language packs (the
Makefile's system-deps target installs them).
"""

from __future__ import annotations

import io
import random
from functools import cache

import pytest
from fpdf import FPDF
from PIL import Image

from invoiceflow.documents import DocumentError, DocumentLimits, ReadDocument, read_document
from invoiceflow.extractors.rules import extract_invoice
from invoiceflow.samples import generate_invoice
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
    mixed = mixed_pdf(pdf, seed=2, sender=truth.vendor_name or "")
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


def test_page_of_noise_fails_ocr_failed_with_the_confidence() -> None:
    rng = random.Random(7)
    noise = Image.frombytes("L", (620, 877), bytes(rng.choice((0, 255)) for _ in range(620 * 877)))
    with pytest.raises(DocumentError) as caught:
        read_document(image_pdf(noise.resize((1240, 1754))), "noise.pdf", LIMITS)
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
