"""Extraction of local PDFs (the `extract` and `eval` commands) and its scoring.

`extract_file` is what `invoiceflow extract FILE.pdf` does: the e-invoice fast path
when the PDF embeds CII/UBL XML, else text extraction plus the extractor, then the same
validation the pipeline applies. `evaluate_dir` runs it over a folder of PDFs with
expected JSON next to them (same stem) and scores exact matches per field.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from invoiceflow.extractors import DocumentExtractor, Extraction, ExtractionError, Extractor
from invoiceflow.extractors.einvoice import read_einvoice
from invoiceflow.pdf import PdfError, parse_pdf
from invoiceflow.schema import Invoice
from invoiceflow.validate import Validated, validate_extraction

HEADER_FIELDS: Final = (
    "invoice_number",
    "invoice_date",
    "due_date",
    "vendor_name",
    "vendor_tax_id",
    "customer_name",
    "po_number",
    "currency",
    "subtotal",
    "tax_total",
    "total",
    "amount_due",
)
FIELDS: Final = (*HEADER_FIELDS, "line_items")


@dataclass(frozen=True)
class FileExtraction:
    extraction: Extraction
    validated: Validated
    pages: int


async def extract_file(
    data: bytes, extractor: Extractor, *, einvoice: bool = True, invoice_key: str | None = None
) -> FileExtraction:
    """Extract one PDF's fields; raises `PdfError` or `ExtractionError`."""
    fast = await asyncio.to_thread(read_einvoice, data) if einvoice else None
    text, pages = "", 0
    try:
        parsed = await asyncio.to_thread(parse_pdf, data)
        text, pages = parsed.text, parsed.pages
    except PdfError:
        if fast is None:
            raise  # a scanned hybrid invoice still has its XML
    if fast is not None:
        extraction = fast
    elif isinstance(extractor, DocumentExtractor):
        extraction = await extractor.extract_document(text, pages=pages, invoice_key=invoice_key)
    else:
        extraction = Extraction(
            invoice=await extractor.extract(text), source="rules", extractor=extractor.name
        )
    return FileExtraction(extraction, validate_extraction(extraction, text), pages)


@dataclass
class FieldScore:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class EvalReport:
    documents: int = 0
    fields: dict[str, FieldScore] = field(default_factory=lambda: {f: FieldScore() for f in FIELDS})
    exact_documents: int = 0
    line_items_correct: int = 0
    line_items_total: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    needs_review: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    mismatches: dict[str, list[tuple[str, Any, Any]]] = field(default_factory=dict)

    @property
    def header_accuracy(self) -> float:
        scores = [self.fields[f] for f in HEADER_FIELDS]
        total = sum(s.total for s in scores)
        return sum(s.correct for s in scores) / total if total else 0.0


def pairs(directory: Path) -> list[tuple[str, Path, Path]]:
    """(stem, pdf, expected json) for every PDF that has its expected JSON."""
    return [
        (pdf.stem, pdf, pdf.with_suffix(".json"))
        for pdf in sorted(directory.glob("*.pdf"))
        if pdf.with_suffix(".json").is_file()
    ]


def score(report: EvalReport, stem: str, got: Invoice | None, expected: Invoice) -> None:
    """Add one document's outcome (``got`` None: extraction failed) to ``report``."""
    report.documents += 1
    all_right = got is not None
    for name in FIELDS:
        wanted = getattr(expected, name)
        value = getattr(got, name) if got is not None else None
        right = got is not None and value == wanted
        report.fields[name].total += 1
        report.fields[name].correct += right
        if not right:
            all_right = False
            report.mismatches.setdefault(name, []).append((stem, value, wanted))
    report.exact_documents += all_right
    report.line_items_total += len(expected.line_items)
    if got is not None:
        report.line_items_correct += sum(
            a == b for a, b in zip(got.line_items, expected.line_items, strict=False)
        )


async def evaluate_dir(
    directory: Path,
    extractor: Extractor,
    *,
    einvoice: bool = True,
    concurrency: int = 8,
    only: Sequence[str] | None = None,
) -> EvalReport:
    """Score ``extractor`` (behind the e-invoice fast path) on ``directory``."""
    report = EvalReport()
    gate = asyncio.Semaphore(concurrency)

    async def one(stem: str, pdf: Path) -> tuple[str, FileExtraction | str]:
        async with gate:
            try:
                return stem, await extract_file(
                    pdf.read_bytes(), extractor, einvoice=einvoice, invoice_key=pdf.name
                )
            except (PdfError, ExtractionError) as exc:
                return stem, f"{type(exc).__name__} {getattr(exc, 'kind', '')}: {exc}"

    found = [(s, p, j) for s, p, j in pairs(directory) if only is None or s in only]
    results = await asyncio.gather(*(one(stem, pdf) for stem, pdf, _ in found))
    for (stem, _, expected_path), (_, outcome) in zip(found, results, strict=True):
        expected = Invoice.model_validate(json.loads(expected_path.read_text(encoding="utf-8")))
        if isinstance(outcome, str):
            report.failures[stem] = outcome
            score(report, stem, None, expected)
            continue
        report.sources[outcome.extraction.source] += 1
        report.needs_review += outcome.validated.needs_review
        score(report, stem, outcome.validated.invoice, expected)
    return report
