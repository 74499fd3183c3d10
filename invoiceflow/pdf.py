"""Turn PDF bytes into plain text, or fail with a typed, permanent `PdfError`.

Everything pypdf can throw (its own errors, but also KeyError/ValueError/zlib errors on
malformed input) is translated here, so callers only ever have to handle `PdfError`.

Imports nothing from Prefect.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Final, Literal

from pypdf import PdfReader
from pypdf.errors import (
    DependencyError,
    FileNotDecryptedError,
    LimitReachedError,
    PdfReadWarning,
)

PdfErrorKind = Literal[
    "empty",
    "not_pdf",
    "too_large",
    "corrupt",
    "encrypted",
    "no_pages",
    "too_many_pages",
    "needs_ocr",
]

PAGE_SEPARATOR: Final = "\n\f\n"

# The PDF spec wants the header at offset 0, but real-world files (and Acrobat) tolerate
# junk before it; 1024 bytes is the tolerance Acrobat documents.
_HEADER_WINDOW: Final = 1024
_MAGIC: Final = b"%PDF-"

# A page counts as having a text layer only above this many letters/digits, so that a
# scanned page carrying nothing but "Page 1 of 3" still counts as needing OCR.
_MIN_TEXT_CHARS_PER_PAGE: Final = 16

# pypdf reports recoverable damage ("EOF marker not found", "incorrect startxref") as log
# warnings, and unknown font encodings as log *errors*, even though it carries on. We
# surface damage through PdfError instead, so all of it is noise. Done once at import
# rather than per call: logging configuration is process-global and changing it from
# worker threads would race. An explicit level set by the application is respected.
_pypdf_logger = logging.getLogger("pypdf")
if _pypdf_logger.level == logging.NOTSET:
    _pypdf_logger.setLevel(logging.CRITICAL)
# Same reasoning for the few paths that use `warnings.warn`; `catch_warnings` is not
# thread-safe, so a category filter installed once is the only safe option.
warnings.filterwarnings("ignore", category=PdfReadWarning)


class PdfError(Exception):
    """The PDF cannot be turned into text. Always permanent: retrying cannot help."""

    transient: Final = False

    def __init__(self, kind: PdfErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: PdfErrorKind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"PdfError(kind={self.kind!r}, message={self.message!r})"


@dataclass(frozen=True, slots=True)
class ParsedPdf:
    text: str
    """Text of all pages, joined with `PAGE_SEPARATOR`."""
    pages: int


def parse_pdf(data: bytes, *, max_bytes: int = 20_000_000, max_pages: int = 50) -> ParsedPdf:
    """Extract the text layer of a PDF.

    Raises `PdfError` (and nothing else) when the document is empty, not a PDF, too
    large, corrupt, password-protected, has no or too many pages, or has no text layer.
    """
    reader, page_count = open_pdf(data, max_bytes=max_bytes, max_pages=max_pages)
    texts = [page_text(reader, index) for index in range(page_count)]
    if not any(has_text_layer(text) for text in texts):
        raise PdfError("needs_ocr", f"none of the {page_count} page(s) has a text layer")
    return ParsedPdf(text=PAGE_SEPARATOR.join(texts), pages=page_count)


def open_pdf(data: bytes, *, max_bytes: int, max_pages: int) -> tuple[PdfReader, int]:
    """(reader, page count) after the size, header, encryption and page-count checks."""
    size = len(data)
    if size == 0:
        raise PdfError("empty", "the file is empty (0 bytes)")
    if size > max_bytes:
        raise PdfError("too_large", f"the file has {size} bytes, the limit is {max_bytes}")
    if not is_pdf(data):
        raise PdfError(
            "not_pdf", f"no {_MAGIC.decode()} header in the first {_HEADER_WINDOW} bytes"
        )
    reader = _open(data)
    page_count = _page_count(reader)
    if page_count == 0:
        raise PdfError("no_pages", "the document has no pages")
    if page_count > max_pages:
        raise PdfError(
            "too_many_pages", f"the document has {page_count} pages, the limit is {max_pages}"
        )
    return reader, page_count


def is_pdf(data: bytes) -> bool:
    return _MAGIC in data[:_HEADER_WINDOW]


def text_operator_count(reader: PdfReader, page_count: int) -> int:
    """Text-showing operators (Tj, TJ, ', ") in the pages' content streams, approximately.

    pypdf's `extract_text` is superlinear in these (5 MB of them on one page took
    111 s), so callers refuse documents with too many before extracting. Counted per
    page, as extraction works per page even when pages share one stream. Form XObjects
    are not counted: the caller's wall-clock limit still covers those.
    """
    total = 0
    for index in range(page_count):
        try:
            contents = reader.pages[index].get_contents()
            data = contents.get_data() if contents is not None else b""
        except Exception:
            continue  # extraction itself reports the damage as PdfError
        total += data.count(b"Tj") + data.count(b"TJ") + data.count(b"'") + data.count(b'"')
    return total


def _open(data: bytes) -> PdfReader:
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
    except LimitReachedError as exc:
        raise PdfError("too_large", f"the document exceeds a parser limit: {exc}") from exc
    except Exception as exc:  # pypdf raises far more than PyPdfError on malformed input
        raise PdfError("corrupt", f"unreadable PDF: {_describe(exc)}") from exc

    if reader.is_encrypted:
        # Many "encrypted" PDFs only carry an owner password (restricting printing or
        # editing) and open with the empty user password; those are perfectly readable.
        try:
            opened = reader.decrypt("")
        except (DependencyError, NotImplementedError) as exc:
            raise PdfError("encrypted", f"unsupported encryption: {exc}") from exc
        except Exception as exc:
            raise PdfError("encrypted", f"cannot decrypt: {_describe(exc)}") from exc
        if not opened:
            raise PdfError("encrypted", "the document is protected by a user password")
    return reader


def _page_count(reader: PdfReader) -> int:
    try:
        return len(reader.pages)
    except FileNotDecryptedError as exc:
        raise PdfError("encrypted", "the document is protected by a user password") from exc
    except LimitReachedError as exc:
        raise PdfError("too_large", f"the document exceeds a parser limit: {exc}") from exc
    except Exception as exc:
        raise PdfError("corrupt", f"cannot read the page tree: {_describe(exc)}") from exc


def page_text(reader: PdfReader, index: int) -> str:
    """The text layer of page ``index`` (0-based); raises PdfError."""
    try:
        return reader.pages[index].extract_text() or ""
    except LimitReachedError as exc:
        raise PdfError("too_large", f"page {index + 1} exceeds a parser limit: {exc}") from exc
    except Exception as exc:
        # One unreadable page makes the whole text untrustworthy (totals are usually on
        # the last page), so we fail rather than return a partial document.
        raise PdfError(
            "corrupt", f"cannot extract text of page {index + 1}: {_describe(exc)}"
        ) from exc


def has_text_layer(text: str) -> bool:
    return sum(ch.isalnum() for ch in text) >= _MIN_TEXT_CHARS_PER_PAGE


def _describe(exc: BaseException) -> str:
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
