"""Render PDF pages with pdfium and read them with Tesseract.

pypdfium2 (BSD-3/Apache-2.0) renders; PyMuPDF would do too but is AGPL-3.0.
Tesseract 5 runs as a subprocess through pytesseract, so it holds no GIL; in a
`DocumentWorkers` process it inherits the worker's RLIMIT_AS and process group, so the
pool's limits cover it, and ``OMP_THREAD_LIMIT=1`` there keeps it to one core.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import pypdfium2 as pdfium
import pytesseract
from PIL import Image

OCR_DPI: Final = 300
"""Tesseract is trained on ~300 dpi text; measured here, 200 dpi loses small print."""
MAX_RENDER_PIXELS: Final = 12_000_000
"""A4 at 300 dpi is 8.7 Mpx; a page with a giant MediaBox is rendered smaller."""
# Share of dark pixels under which a rendered page counts as blank (a scanned empty
# sheet carries some speckle; a page of text is several percent ink).
_BLANK_INK_SHARE: Final = 0.002


class OcrError(Exception):
    """Tesseract failed; ``kind`` is "too_slow", "ocr_unavailable" or "ocr_failed"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class OcrPage:
    text: str
    confidence: float
    """Mean word confidence, 0-100, weighted by word length; 0 when no words."""


def render(document: pdfium.PdfDocument, index: int, *, dpi: float, max_pixels: int) -> Image.Image:
    """Page ``index`` as a grayscale image at ``dpi``, scaled down to ``max_pixels``."""
    page = document[index]
    try:
        width, height = page.get_size()  # points
        scale = dpi / 72
        pixels = width * scale * height * scale
        if pixels > max_pixels:
            scale *= math.sqrt(max_pixels / pixels)
        bitmap = page.render(scale=scale, grayscale=True)
        return bitmap.to_pil().convert("L")
    finally:
        page.close()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def is_blank(image: Image.Image) -> bool:
    histogram = image.convert("L").histogram()
    dark = sum(histogram[:128])
    return dark < _BLANK_INK_SHARE * image.width * image.height


def ocr(image: Image.Image, *, languages: str, timeout_s: float) -> OcrPage:
    """Tesseract's text of ``image`` (lines in reading order) and its confidence."""
    try:
        data = pytesseract.image_to_data(
            image, lang=languages, timeout=timeout_s, output_type=pytesseract.Output.DICT
        )
    except pytesseract.TesseractNotFoundError as exc:
        raise OcrError(
            "ocr_unavailable", "tesseract is not installed (Debian: tesseract-ocr)"
        ) from exc
    except pytesseract.TesseractError as exc:
        kind = "ocr_unavailable" if "language" in str(exc.message).lower() else "ocr_failed"
        raise OcrError(kind, f"tesseract failed: {exc.message}") from exc
    except RuntimeError as exc:  # pytesseract's timeout (it kills tesseract)
        raise OcrError("too_slow", f"OCR took longer than the {timeout_s:g} s page limit") from exc
    lines: dict[tuple[int, int, int], list[str]] = {}
    weighted = weight = 0.0
    for word, conf, key in _words(data):
        lines.setdefault(key, []).append(word)
        size = sum(ch.isalnum() for ch in word)
        weighted += conf * size
        weight += size
    text = "\n".join(" ".join(words) for words in lines.values())
    return OcrPage(text=text, confidence=round(weighted / weight, 1) if weight else 0.0)


def _words(data: dict[str, list[Any]]) -> Iterator[tuple[str, float, tuple[int, int, int]]]:
    """(word, confidence, (block, paragraph, line)) for each recognised word, in order."""
    for i, word in enumerate(data["text"]):
        conf = float(data["conf"][i])
        if conf < 0 or not str(word).strip():
            continue  # layout rows (blocks, lines) carry conf -1
        key = (int(data["block_num"][i]), int(data["par_num"][i]), int(data["line_num"][i]))
        yield str(word).strip(), conf, key
