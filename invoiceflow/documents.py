"""Read one untrusted document (PDF or e-invoice XML) into text, pages and images.

`read_document` is pure and in-process: it is what a `DocumentWorkers` process runs
(invoiceflow/sandbox.py), so every budget the operating system enforces there (wall
clock, RLIMIT_AS) covers pypdf, the attachment and XML readers, pdfium and Tesseract.

Imports nothing from Prefect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final, Literal

import pypdfium2 as pdfium
from pypdf import PdfReader

# Loaded here, at import, so the fork server preloads it: pdfium's first use costs ~100 ms.
import invoiceflow.extractors.rules  # noqa: F401  (run via DocumentWorkers.call)
from invoiceflow import ocr
from invoiceflow.extractors import Extraction
from invoiceflow.extractors.einvoice import (
    EInvoiceError,
    EmbeddedRead,
    read_einvoice_xml,
    read_embedded,
)
from invoiceflow.pdf import (
    PAGE_SEPARATOR,
    PdfError,
    has_text_layer,
    is_pdf,
    open_pdf,
    page_text,
    text_operator_count,
)

log = logging.getLogger(__name__)

VisionMode = Literal["auto", "never", "always"]
PageMethod = Literal["text", "ocr", "image"]
ReadAs = Literal["text", "ocr", "vision", "einvoice"]

# The first language leads: with "eng" first, Tesseract dropped accents ("Präzision"
# read as "Prazision", "Lumière" as "Lumiére"); English reads as well in this order.
DEFAULT_OCR_LANGUAGES: Final = "deu+fra+nld+eng"


class DocumentError(Exception):
    """The document cannot be read. ``kind`` is what the manifest records.

    Kinds: the `PdfError` kinds (empty, not_pdf, too_large, corrupt, encrypted, no_pages,
    too_many_pages, needs_ocr), the e-invoice kinds (unsupported_document,
    einvoice_invalid), ocr_failed, too_slow, and worker_crashed.
    """

    def __init__(self, kind: str, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.transient = transient

    def __reduce__(self) -> tuple[type[DocumentError], tuple[str, str, bool]]:
        # Crosses the worker pipe: the default reduce would rebuild it from args[0] only.
        return (type(self), (self.kind, self.message, self.transient))

    def __repr__(self) -> str:
        return f"DocumentError(kind={self.kind!r}, message={self.message!r})"


@dataclass(frozen=True, slots=True)
class DocumentLimits:
    """Budgets for reading one document; flow parameters map onto these fields."""

    max_bytes: int = 20_000_000
    max_pages: int = 50
    time_limit_s: float = 120.0
    """Wall clock per document, enforced by killing its worker process."""
    memory_limit_mb: int = 1024
    """RLIMIT_AS of each worker process (Tesseract, its child, inherits it)."""
    ocr_languages: str = DEFAULT_OCR_LANGUAGES
    ocr_page_time_s: float = 45.0
    """Tesseract's own timeout per page, inside ``time_limit_s``."""
    vision: VisionMode = "never"
    """"auto": pages without a text layer become PNGs instead of being OCR'd;
    "always": every page also becomes a PNG; "never": OCR only."""
    max_image_pixels: int = 2_500_000
    max_images: int = 8
    max_text_operators: int = 200_000
    """Text-showing operators (Tj, TJ, ', ") in all content streams. pypdf's text
    extraction is superlinear in them, so more is refused before extracting."""
    min_ocr_confidence: float = 70.0
    """Mean word confidence (0-100) below which an OCR'd page needs review."""


@dataclass(frozen=True, slots=True)
class PageRead:
    number: int
    """1-based page number."""
    method: PageMethod
    chars: int
    ocr_confidence: float | None = None
    """Mean Tesseract word confidence (0-100) for OCR'd pages, else None."""


@dataclass(frozen=True, slots=True)
class ReadDocument:
    text: str
    pages: int
    page_reads: tuple[PageRead, ...] = ()
    einvoice: Extraction | None = None
    images: tuple[bytes, ...] = ()
    """PNG pages for a vision LLM (vision "auto"/"always")."""
    read_as: ReadAs = "text"
    review_reasons: tuple[str, ...] = ()


# An OCR'd page below this confidence, or with fewer confidently read letters/digits
# than a text layer needs, yielded nothing usable (a page of noise reads at ~39%).
_MIN_USABLE_CONFIDENCE: Final = 45.0
_MIN_CONFIDENT_CHARS: Final = 16
_UTF8_BOM: Final = b"\xef\xbb\xbf"


def read_document(body: bytes, name: str, limits: DocumentLimits) -> ReadDocument:
    """Read one PDF or e-invoice XML; pure, in-process (a `DocumentWorkers` job).

    PDF pages with a text layer are read as text; the others are rendered with pdfium
    and OCR'd with Tesseract, or kept as PNGs for a vision model (``limits.vision``).
    A PDF carrying e-invoice XML is taken from its XML, and its image pages are not
    OCR'd. Raises DocumentError, and only that, for anything the document is to blame.
    """
    if len(body) > limits.max_bytes:
        raise DocumentError(
            "too_large", f"the file has {len(body)} bytes, the limit is {limits.max_bytes}"
        )
    if not is_pdf(body) and _looks_like_xml(body, name):
        return _read_xml(body, name)
    return _read_pdf(body, limits)


def _looks_like_xml(body: bytes, name: str) -> bool:
    if name.lower().endswith(".xml"):
        return True
    return body.removeprefix(_UTF8_BOM).lstrip()[:1] == b"<"


def _read_xml(body: bytes, name: str) -> ReadDocument:
    try:
        extraction = read_einvoice_xml(body, name)
    except EInvoiceError as exc:
        raise DocumentError(exc.kind, str(exc)) from None
    return ReadDocument(text="", pages=0, einvoice=extraction, read_as="einvoice")


def _read_embedded(body: bytes) -> EmbeddedRead:
    """The PDF's e-invoice attachment; its size is checked before it is decoded."""
    try:
        return read_embedded(body)
    except EInvoiceError as exc:  # too_large, or a business document that is no invoice
        raise DocumentError(exc.kind, str(exc)) from None


@dataclass
class _PdfRead:
    """What reading a PDF's pages has found so far."""

    texts: list[str] = field(default_factory=list)
    page_reads: list[PageRead] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    review_reasons: list[str] = field(default_factory=list)
    ocr_failure: str | None = None


def _read_pdf(body: bytes, limits: DocumentLimits) -> ReadDocument:
    embedded = _read_embedded(body)
    einvoice = embedded.extraction
    try:
        reader, page_count = open_pdf(body, max_bytes=limits.max_bytes, max_pages=limits.max_pages)
        _check_text_operators(reader, page_count, limits)
        found = _read_pages(body, reader, page_count, limits, einvoice)
    except (PdfError, DocumentError) as exc:
        if einvoice is None or getattr(exc, "kind", "") in ("too_large", "too_slow"):
            raise _document_error(exc) from None
        # A hybrid e-invoice whose visible part is unreadable still has its XML.
        return ReadDocument(text="", pages=0, einvoice=einvoice, read_as="einvoice")
    # Page images go to the vision model, which reads what has no text layer.
    if einvoice is None and not found.images and not any(has_text_layer(t) for t in found.texts):
        raise DocumentError("ocr_failed", found.ocr_failure or _no_text(page_count))
    return ReadDocument(
        text=PAGE_SEPARATOR.join(found.texts),
        pages=page_count,
        page_reads=tuple(found.page_reads),
        einvoice=einvoice,
        images=tuple(found.images),
        read_as=_read_as(found, einvoice),
        review_reasons=(*embedded.notes, *found.review_reasons),
    )


def _document_error(exc: PdfError | DocumentError) -> DocumentError:
    if isinstance(exc, DocumentError):
        return exc
    return DocumentError(exc.kind, exc.message)


def _no_text(page_count: int) -> str:
    return (
        f"none of the {page_count} page(s) has readable text: every page is blank "
        "(OCR confidence 0%)"
    )


def _read_as(found: _PdfRead, einvoice: Extraction | None) -> ReadAs:
    if einvoice is not None:
        return "einvoice"
    if found.images:
        return "vision"
    if any(page.method == "ocr" for page in found.page_reads):
        return "ocr"
    return "text"


def _check_text_operators(reader: PdfReader, page_count: int, limits: DocumentLimits) -> None:
    count = text_operator_count(reader, page_count)
    if count > limits.max_text_operators:
        raise DocumentError(
            "too_large",
            f"the document has about {count} text operators, the limit is "
            f"{limits.max_text_operators} (text extraction time grows faster than their number)",
        )


def _read_pages(
    body: bytes,
    reader: PdfReader,
    page_count: int,
    limits: DocumentLimits,
    einvoice: Extraction | None,
) -> _PdfRead:
    found = _PdfRead()
    rendered: pdfium.PdfDocument | None = None
    try:
        for index in range(page_count):
            text = page_text(reader, index)
            has_text = has_text_layer(text)
            wants_image = limits.vision == "always" or (limits.vision == "auto" and not has_text)
            if einvoice is not None or (has_text and not wants_image):
                found.texts.append(text)
                found.page_reads.append(PageRead(index + 1, "text", len(text)))
                continue
            if rendered is None:
                rendered = _open_for_rendering(body)
            if wants_image and len(found.images) < limits.max_images:
                _keep_image(found, rendered, index, text, limits)
            else:
                _ocr_page(found, rendered, index, limits)
    finally:
        if rendered is not None:
            rendered.close()
    return found


def _open_for_rendering(body: bytes) -> pdfium.PdfDocument:
    try:
        return pdfium.PdfDocument(body)
    except pdfium.PdfiumError as exc:
        raise DocumentError("corrupt", f"pdfium cannot open the document: {exc}") from None


def _render(
    rendered: pdfium.PdfDocument, index: int, dpi: float, max_pixels: int
) -> ocr.Image.Image:
    try:
        return ocr.render(rendered, index, dpi=dpi, max_pixels=max_pixels)
    except pdfium.PdfiumError as exc:
        raise DocumentError("corrupt", f"cannot render page {index + 1}: {exc}") from None


def _keep_image(
    found: _PdfRead, rendered: pdfium.PdfDocument, index: int, text: str, limits: DocumentLimits
) -> None:
    """Page ``index`` as a PNG for the vision model (its text layer, if any, is kept too)."""
    image = _render(rendered, index, ocr.OCR_DPI, limits.max_image_pixels)
    found.images.append(ocr.png(image))
    found.texts.append(text)
    found.page_reads.append(PageRead(index + 1, "image", len(text)))


def _ocr_page(
    found: _PdfRead, rendered: pdfium.PdfDocument, index: int, limits: DocumentLimits
) -> None:
    number = index + 1
    image = _render(rendered, index, ocr.OCR_DPI, ocr.MAX_RENDER_PIXELS)
    if ocr.is_blank(image):
        found.texts.append("")
        found.page_reads.append(PageRead(number, "ocr", 0, 0.0))
        found.review_reasons.append(f"page {number} is blank (no text found by OCR)")
        return
    try:
        page = ocr.ocr(image, languages=limits.ocr_languages, timeout_s=limits.ocr_page_time_s)
    except ocr.OcrError as exc:
        raise DocumentError(
            exc.kind, f"page {number}: {exc}", transient=exc.kind == "ocr_unavailable"
        ) from None
    found.page_reads.append(PageRead(number, "ocr", len(page.text), page.confidence))
    if page.confident_chars < _MIN_CONFIDENT_CHARS or page.confidence < _MIN_USABLE_CONFIDENCE:
        raise DocumentError(
            "ocr_failed",
            f"page {number}: OCR found nothing usable (confidence {page.confidence:.0f}%, "
            f"{page.confident_chars} letters/digits read with confidence)",
        )
    found.texts.append(page.text)
    if page.confidence < limits.min_ocr_confidence:
        found.review_reasons.append(
            f"page {number} was read by OCR with low confidence ({page.confidence:.0f}%, "
            f"below {limits.min_ocr_confidence:.0f}%)"
        )
