"""parse_pdf: every PdfError kind, produced from real (if broken) documents."""

from __future__ import annotations

import io
import logging
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fpdf import FPDF
from pypdf import PdfReader, PdfWriter

from invoiceflow.pdf import PAGE_SEPARATOR, ParsedPdf, PdfError, parse_pdf
from invoiceflow.samples import generate_corpus, generate_invoice


def _text_pdf(pages: int, lines_per_page: int = 3) -> bytes:
    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for page in range(pages):
        pdf.add_page()
        for line in range(lines_per_page):
            pdf.cell(0, 8, f"Page {page + 1} line {line + 1}: lorem ipsum dolor sit amet")
            pdf.ln(8)
    return bytes(pdf.output())


def _multi_page_invoice() -> tuple[bytes, str]:
    for _, data, truth in generate_corpus(200):
        if len(PdfReader(io.BytesIO(data)).pages) >= 2:
            assert truth.invoice_number
            return data, truth.invoice_number
    raise AssertionError("the sample corpus has no multi-page invoice")


def _kind(data: bytes, **limits: int) -> str:
    with pytest.raises(PdfError) as info:
        parse_pdf(data, **limits)
    assert info.value.transient is False
    assert str(info.value), "PdfError needs a human-readable message"
    return info.value.kind


def test_valid_multi_page_pdf() -> None:
    data, invoice_number = _multi_page_invoice()
    parsed = parse_pdf(data)
    assert isinstance(parsed, ParsedPdf)
    assert parsed.pages >= 2
    assert parsed.text.count(PAGE_SEPARATOR) == parsed.pages - 1
    assert invoice_number in parsed.text
    assert "Page 1 of" in parsed.text and f"Page {parsed.pages} of" in parsed.text
    with pytest.raises(AttributeError):
        parsed.pages = 1  # type: ignore[misc]  # frozen: results are shared across threads


def test_empty() -> None:
    assert _kind(b"") == "empty"


def test_random_bytes_are_not_pdf() -> None:
    assert _kind(random.Random(7).randbytes(4096)) == "not_pdf"


def test_magic_must_be_in_first_kilobyte() -> None:
    data = _text_pdf(1)
    assert _kind(b"\0" * 1100 + data) == "not_pdf"
    # Junk *within* the first kilobyte is tolerated, like Acrobat does.
    assert parse_pdf(b"\0" * 100 + data).pages == 1


def test_too_large() -> None:
    data = _text_pdf(1)
    assert _kind(data, max_bytes=len(data) - 1) == "too_large"
    assert parse_pdf(data, max_bytes=len(data)).pages == 1


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_pdf_is_corrupt(fraction: float) -> None:
    data, _ = generate_invoice(3)
    assert _kind(data[: int(len(data) * fraction)]) == "corrupt"


def test_header_only_is_corrupt() -> None:
    assert _kind(b"%PDF-1.7\n" + b"garbage " * 200) == "corrupt"


def test_user_password_is_encrypted() -> None:
    writer = PdfWriter(clone_from=io.BytesIO(_text_pdf(1)))
    writer.encrypt(user_password="s3cret", owner_password="owner")
    buffer = io.BytesIO()
    writer.write(buffer)
    assert _kind(buffer.getvalue()) == "encrypted"


def test_owner_password_only_opens_with_empty_user_password() -> None:
    writer = PdfWriter(clone_from=io.BytesIO(_text_pdf(1)))
    writer.encrypt(user_password="", owner_password="owner-only")
    buffer = io.BytesIO()
    writer.write(buffer)
    assert PdfReader(io.BytesIO(buffer.getvalue())).is_encrypted
    parsed = parse_pdf(buffer.getvalue())
    assert "lorem ipsum" in parsed.text


def test_no_pages() -> None:
    buffer = io.BytesIO()
    PdfWriter().write(buffer)
    assert _kind(buffer.getvalue()) == "no_pages"


def test_too_many_pages() -> None:
    assert _kind(_text_pdf(51, lines_per_page=1)) == "too_many_pages"
    data = _text_pdf(3)
    assert _kind(data, max_pages=2) == "too_many_pages"
    assert parse_pdf(data, max_pages=3).pages == 3


def test_image_only_page_needs_ocr() -> None:
    pdf = FPDF()
    pdf.add_page()
    pdf.set_fill_color(40, 40, 40)
    pdf.rect(20, 20, 170, 250, style="F")
    assert _kind(bytes(pdf.output())) == "needs_ocr"


def test_page_numbers_alone_still_need_ocr() -> None:
    # A scanned document often carries a stamped page number and nothing else.
    pdf = FPDF()
    pdf.set_font("helvetica", size=9)
    for page in range(2):
        pdf.add_page()
        pdf.rect(20, 20, 170, 250)
        pdf.text(100, 290, f"Page {page + 1} of 2")
    assert _kind(bytes(pdf.output())) == "needs_ocr"


def test_mutated_pdfs_only_ever_raise_pdf_error() -> None:
    original, _ = generate_invoice(11)
    outcomes: set[str] = set()
    for seed in range(150):
        rng = random.Random(seed)
        data = bytearray(original)
        for _ in range(rng.randint(1, 25)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            parse_pdf(bytes(data))
            outcomes.add("ok")
        except PdfError as exc:
            outcomes.add(exc.kind)
    # Proves the fuzzing reached pypdf's parser rather than stopping at the header check.
    assert "corrupt" in outcomes


def test_pypdf_log_noise_is_silenced(caplog: pytest.LogCaptureFixture) -> None:
    data, _ = generate_invoice(3)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PdfError):
        parse_pdf(data[: len(data) // 2])
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]


def test_parallel_parsing_matches_sequential() -> None:
    documents = [pdf for _, pdf, _ in generate_corpus(16, seed=5)]
    documents += [b"", b"not a pdf", documents[0][:500]]

    def outcome(data: bytes) -> tuple[str, str | int]:
        try:
            parsed = parse_pdf(data)
        except PdfError as exc:
            return ("error", exc.kind)
        return (parsed.text, parsed.pages)

    sequential = [outcome(d) for d in documents]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(outcome, documents * 3))
    assert parallel == sequential * 3


def test_domain_modules_do_not_import_prefect() -> None:
    code = (
        "import sys, invoiceflow.pdf, invoiceflow.samples, invoiceflow.normalize, "
        "invoiceflow.extractors.rules; "
        "sys.exit(1 if any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules) else 0)"
    )
    repo = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo, check=False).returncode == 0
