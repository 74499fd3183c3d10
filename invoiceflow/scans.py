"""Scanned and mixed versions of sample PDFs, for OCR tests, demos and `eval --scanned`.

A scan here is what an office scanner makes of a printed invoice: the page rendered
(pypdfium2) at 150-200 dpi in grayscale, rotated by up to ±1.5°, with speckle and a
slight blur, JPEG-compressed, and written back as an image-only PDF (no text layer).
A mixed PDF has a text page 1 (a cover letter) and the scanned invoice as page 2.
Everything random comes from the seed, so the same seed gives the same bytes.

Imports nothing from Prefect.
"""

from __future__ import annotations

import datetime as dt
import io
import random
from typing import Final

import pypdfium2 as pdfium
from fpdf import FPDF
from PIL import Image, ImageFilter

_PDF_EPOCH: Final = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
_MM_PER_PT: Final = 25.4 / 72
# Dark specks per million pixels, and the JPEG quality range of cheap office scanners.
_SPECKS_PER_MPX: Final = 400
_JPEG_QUALITY: Final = (55, 80)


def scanned_page(image: Image.Image, rng: random.Random) -> Image.Image:
    """``image`` (grayscale) as a scanner would see it: rotated, speckled and blurred."""
    angle = rng.uniform(-1.5, 1.5)
    page = image.convert("L").rotate(
        angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=255
    )
    pixels = page.load()
    assert pixels is not None
    width, height = page.size
    for _ in range(int(_SPECKS_PER_MPX * width * height / 1_000_000)):
        x, y = rng.randrange(width), rng.randrange(height)
        pixels[x, y] = rng.randrange(0, 110)
    return page.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.4, 0.9)))


def _jpeg(image: Image.Image, rng: random.Random) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=rng.randint(*_JPEG_QUALITY))
    return out.getvalue()


def _scanned_pages(pdf: bytes, rng: random.Random) -> list[tuple[bytes, float, float]]:
    """(JPEG, width pt, height pt) for every page of ``pdf``."""
    dpi = rng.choice((150, 175, 200))
    document = pdfium.PdfDocument(pdf)
    pages: list[tuple[bytes, float, float]] = []
    try:
        for page in document:
            width, height = page.get_size()
            image = page.render(scale=dpi / 72, grayscale=True).to_pil()
            page.close()
            pages.append((_jpeg(scanned_page(image, rng), rng), width, height))
    finally:
        document.close()
    return pages


def _new_pdf() -> FPDF:
    pdf = FPDF(unit="pt")
    pdf.set_creation_date(_PDF_EPOCH)
    pdf.set_auto_page_break(auto=False)
    return pdf


def _add_image_page(pdf: FPDF, jpeg: bytes, width: float, height: float) -> None:
    pdf.add_page(format=(width, height))
    pdf.image(io.BytesIO(jpeg), x=0, y=0, w=width, h=height)


def scanned_pdf(pdf: bytes, seed: int) -> bytes:
    """An image-only PDF of every page of ``pdf``, scanned (see the module docstring)."""
    out = _new_pdf()
    for jpeg, width, height in _scanned_pages(pdf, random.Random(seed)):
        _add_image_page(out, jpeg, width, height)
    return bytes(out.output())


def mixed_pdf(pdf: bytes, seed: int, *, sender: str) -> bytes:
    """A cover letter from ``sender`` as text page 1, then ``pdf`` scanned as page 2+."""
    out = _new_pdf()
    out.core_fonts_encoding = "windows-1252"
    pages = _scanned_pages(pdf, random.Random(seed))
    width, height = pages[0][1], pages[0][2]
    out.add_page(format=(width, height))
    out.set_margins(51, 43, 51)
    out.set_font("helvetica", "B", 14)
    out.cell(0, 20, sender, new_x="LMARGIN", new_y="NEXT")
    out.set_font("helvetica", "", 10)
    out.ln(30)
    for paragraph in (
        "Dear Sir or Madam,",
        "Please find enclosed the documents for your records. Do not hesitate to contact "
        "us if you have any questions.",
        "Kind regards,",
        sender,
    ):
        out.multi_cell(0, 14, paragraph, new_x="LMARGIN", new_y="NEXT")
        out.ln(8)
    for jpeg, page_width, page_height in pages:
        _add_image_page(out, jpeg, page_width, page_height)
    return bytes(out.output())
