"""Render PDF pages with pdfium and read them with Tesseract.

pypdfium2 (BSD-3/Apache-2.0) renders; PyMuPDF would do too but is AGPL-3.0.
Tesseract 5 runs as a subprocess through pytesseract, so it holds no GIL; in a
`DocumentWorkers` process it inherits the worker's RLIMIT_AS and process group, so the
pool's limits cover it, and ``OMP_THREAD_LIMIT=1`` there keeps it to one core.

Imports nothing from Prefect.
"""

from __future__ import annotations

import io
import math
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import pypdfium2 as pdfium
import pytesseract
from PIL import Image, ImageDraw

OCR_DPI: Final = 300
"""Tesseract is trained on ~300 dpi text; measured here, 200 dpi loses small print."""
PSM: Final = 6
"""Tesseract page segmentation "one uniform block": with the default (3, automatic),
Tesseract sometimes drops a whole right-hand amount column as non-text (measured on
the generated scans: a lost total); rows are rebuilt from word positions either way."""
MAX_RENDER_PIXELS: Final = 12_000_000
"""A4 at 300 dpi is 8.7 Mpx; a page with a giant MediaBox is rendered smaller."""
# Words Tesseract is at least this sure of count as confidently read.
CONFIDENT_WORD: Final = 60.0
# Table rules, underlines and speckle come out as lone punctuation ("|", "_", ".")
# that would end up as a label's value ("Invoice #: . OV-2026-9624").
_RULE_NOISE: Final = frozenset("|_.,;'`\"~=!\u00a6")
_RULE_EDGES: Final = "|_\u00a6"
_MIN_SYMBOL_CONF: Final = 30.0
_WORD_CHARS: Final = 3
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
    confident_chars: int
    """Letters and digits in words of 3+ of them read with `CONFIDENT_WORD` confidence.

    Specks and blobs come out as confident single characters ("e", "°", "5"); a page
    of text has dozens of longer words (labels, numbers, names)."""


def render(document: pdfium.PdfDocument, index: int, *, dpi: float, max_pixels: int) -> Image.Image:
    """Page ``index`` as a grayscale image at ``dpi``, scaled down to ``max_pixels``."""
    page = document[index]
    try:
        width, height = page.get_size()  # points
        scale = dpi / 72
        pixels = width * scale * height * scale
        if pixels > max_pixels:
            scale *= math.sqrt(max_pixels / pixels)
            while math.ceil(width * scale) * math.ceil(height * scale) > max_pixels:
                scale *= 0.995  # pdfium rounds the bitmap's sides up
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


def ocr(image: Image.Image, *, languages: str, timeout_s: float, psm: int = PSM) -> OcrPage:
    """Tesseract's text of ``image`` (lines in reading order) and its confidence."""
    image = without_rules(image)
    try:
        data = pytesseract.image_to_data(
            image,
            lang=languages,
            config=f"--psm {psm}",
            timeout=timeout_s,
            output_type=pytesseract.Output.DICT,
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
    words = [word for word in _words(data) if _keeps(word)]
    weight = sum(word.size for word in words)
    weighted = sum(word.conf * word.size for word in words)
    confident = sum(
        word.size for word in words if word.conf >= CONFIDENT_WORD and word.size >= _WORD_CHARS
    )
    confidence = round(weighted / weight, 1) if weight else 0.0
    return OcrPage(text=_layout(words), confidence=confidence, confident_chars=confident)


@dataclass(frozen=True, slots=True)
class _Word:
    text: str
    conf: float
    line: tuple[int, int, int]
    """Tesseract's (block, paragraph, line)."""
    x: float
    """Centre, in pixels."""
    y: float
    height: int

    @property
    def size(self) -> int:
        return sum(ch.isalnum() for ch in self.text)


def _keeps(word: _Word) -> bool:
    """Whether a word is text rather than a table rule or speck read as punctuation."""
    return bool(word.size) or (word.conf >= _MIN_SYMBOL_CONF and not set(word.text) <= _RULE_NOISE)


def _words(data: dict[str, list[Any]]) -> Iterator[_Word]:
    """Each recognised word with its confidence, Tesseract line and position."""
    for i, text in enumerate(data["text"]):
        conf = float(data["conf"][i])
        # A table rule touching a word sticks to it: "_Rechnungs-Nr.:", "|EUR".
        word = str(text).strip().strip(_RULE_EDGES)
        if conf < 0 or not word:
            continue  # layout rows (blocks, lines) carry conf -1
        height = int(data["height"][i])
        yield _Word(
            text=word,
            conf=conf,
            line=(int(data["block_num"][i]), int(data["par_num"][i]), int(data["line_num"][i])),
            x=int(data["left"][i]) + int(data["width"][i]) / 2,
            y=int(data["top"][i]) + height / 2,
            height=height,
        )


def _layout(words: list[_Word]) -> str:
    """Text in visual rows, left to right, the way a PDF's text layer reads.

    Tesseract segments a page into blocks, so a table comes out column by column and a
    two-column header as two separate runs. Rows are rebuilt from word positions
    instead: Tesseract lines whose (deskewed) centres are within half a line height of
    each other form one row.
    """
    lines: dict[tuple[int, int, int], list[_Word]] = {}
    for word in words:
        lines.setdefault(word.line, []).append(word)
    slope = _skew(list(lines.values()))
    placed = sorted(
        (
            statistics.fmean(w.y - slope * w.x for w in line),
            statistics.median(w.height for w in line),
            line,
        )
        for line in lines.values()
    )
    rows: list[tuple[float, float, list[_Word]]] = []
    for y, height, line in placed:
        if rows and abs(y - rows[-1][0]) < 0.5 * min(height, rows[-1][1]):
            rows[-1][2].extend(line)
        else:
            rows.append((y, height, list(line)))
    return "\n".join(" ".join(w.text for w in sorted(row, key=lambda w: w.x)) for _, _, row in rows)


def _skew(lines: list[list[_Word]]) -> float:
    """The page's skew as dy/dx: the median slope of Tesseract's longer lines."""
    slopes = []
    for line in lines:
        if len(line) < 3:
            continue
        xs, ys = [w.x for w in line], [w.y for w in line]
        spread = max(xs) - min(xs)
        if spread > 0:
            slopes.append(statistics.linear_regression(xs, ys).slope)
    return max(-0.05, min(0.05, statistics.median(slopes))) if slopes else 0.0


# --- table rules ----------------------------------------------------------------------------
# Ruled tables ("Invoice number | Date" over a row of values, each in a bordered cell)
# throw Tesseract's line finding: measured on generated scans, psm 6 reads the label row
# as "[mvoicenumber [suite" and drops the value row under it. Long thin rules are found
# on the deskewed page and painted white; glyphs stay, because a rule is both far longer
# than any letter stroke and thinner than a bold one (whitening every long dark run
# garbled bold letterheads).
_INK: Final = 150
_RULE_SHARE_OF_WIDTH: Final = 0.3
"""A horizontal rule spans at least this share of the page width."""
_VERTICAL_RULE_PER_WIDTH: Final = 1 / 20
"""A vertical rule is at least this long (0.4 in on A4): taller than any text glyph."""
_MAX_RULE_THICKNESS_PER_WIDTH: Final = 1 / 500
"""A rule is at most this thick (5 px on A4 at 300 dpi); a bold letter stroke is thicker."""
_SKEW_DEGREES: Final = tuple(x / 4 for x in range(-12, 13))
_RULE_GAP_PX: Final = 3
"""Speckle and JPEG leave light pixels inside a scanned rule."""


def without_rules(image: Image.Image) -> Image.Image:
    """``image`` deskewed with its long thin table rules painted white, if it has any;
    else ``image`` itself (a page without rules is read as scanned)."""
    gray = image.convert("L")
    angle = _skew_degrees(gray)
    ink = gray.point(lambda v: 1 if v < _INK else 0)
    if angle:
        ink = ink.rotate(angle, resample=Image.Resampling.NEAREST, fillcolor=0)
    thick = max(2, round(gray.width * _MAX_RULE_THICKNESS_PER_WIDTH))
    across = _rules(ink, round(gray.width * _RULE_SHARE_OF_WIDTH), thick)
    if not across:
        return image
    turned = ink.transpose(Image.Transpose.TRANSPOSE)
    down = _rules(turned, round(gray.width * _VERTICAL_RULE_PER_WIDTH), thick)
    if angle:
        gray = gray.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=255)
    draw = ImageDraw.Draw(gray)
    for y0, y1, x0, x1 in across:
        draw.rectangle((x0, y0 - 2, x1, y1 + 2), fill=255)
    for x0, x1, y0, y1 in down:
        draw.rectangle((x0 - 2, y0, x1 + 2, y1), fill=255)
    return gray


def _skew_degrees(gray: Image.Image) -> float:
    """The rotation that makes the page's rows of ink sharpest (a projection profile):
    coarse steps with cheap nearest-pixel rotations, then fine ones with smooth ones."""
    small = gray.reduce(4).point(lambda v: 255 if v < _INK else 0)

    def sharpness(angle: float, resample: Image.Resampling) -> float:
        turned = small.rotate(angle, resample=resample, fillcolor=0)
        profile = turned.resize((1, turned.height), Image.Resampling.BOX).tobytes()
        return sum(v * v for v in profile)

    best = max(_SKEW_DEGREES, key=lambda a: sharpness(a, Image.Resampling.NEAREST))
    fine = (best + step / 20 for step in range(-5, 6))
    return max(fine, key=lambda a: sharpness(a, Image.Resampling.BILINEAR))


def _rules(
    mask: Image.Image, min_length: int, max_thickness: int
) -> list[tuple[int, int, int, int]]:
    """Bands of long runs of ink (1) along the mask's rows: (first row, last row, start,
    end), at most ``max_thickness`` rows thick."""
    ink = mask.tobytes()
    run = re.compile(rb"\x01(?:\x00{0,%d}\x01){%d,}" % (_RULE_GAP_PX, min_length - 1))
    open_bands: list[list[int]] = []  # [first row, last row, start, end]
    done: list[list[int]] = []
    for y in range(mask.height):
        row = ink[y * mask.width : (y + 1) * mask.width]
        if row.count(1) < min_length:
            continue
        for match in run.finditer(row):
            x0, x1 = match.span()
            band = next((b for b in open_bands if b[1] >= y - 1 and b[2] < x1 and x0 < b[3]), None)
            if band is None:
                open_bands.append([y, y, x0, x1])
            else:
                band[1], band[2], band[3] = y, min(band[2], x0), max(band[3], x1)
        done += [b for b in open_bands if b[1] < y - 1]
        open_bands = [b for b in open_bands if b[1] >= y - 1]
    return [(b[0], b[1], b[2], b[3]) for b in done + open_bands if b[1] - b[0] + 1 <= max_thickness]
