"""Every kind of invoice a business receives, through the real flow on the local stack.

A scan, a mixed PDF (text page, scanned page), bare XRechnung UBL / CII / Factur-X XML,
ZUGFeRD 1.0 (bare and in a PDF) and a UBL credit note each end `done` with the header
fields and document type of their truth, and their result says how each was read.
The extractor is the offline rules extractor (the default block): e-invoices never reach it.
"""

from __future__ import annotations

from typing import Any

import pytest
from support import create_lock, direct_s3, flow_params, run_flow, save_llm_block, unique

from devtools.llm_server import running_llm_server
from invoiceflow import stack
from invoiceflow.einvoice_samples import einvoice_sample
from invoiceflow.evaluate import HEADER_FIELDS
from invoiceflow.manifest import ManifestStore, Status
from invoiceflow.samples import generate_invoice
from invoiceflow.scans import mixed_pdf, scanned_pdf
from invoiceflow.schema import ExtractionResult, Invoice

pytestmark = pytest.mark.documents


def documents() -> dict[str, tuple[bytes, Invoice, str]]:
    """name -> (body, truth, how it must be read)."""
    docs: dict[str, tuple[bytes, Invoice, str]] = {}
    pdf, truth = generate_invoice(11)  # the seeds test_ocr.py reads exactly
    docs["scan.pdf"] = (scanned_pdf(pdf, seed=1), truth, "ocr")
    pdf, truth = generate_invoice(12, language="de")
    mixed = mixed_pdf(pdf, seed=3, sender=truth.vendor_name or "")
    docs["mixed.PDF"] = (mixed, truth, "ocr")
    for kind in (
        "xrechnung-ubl.xml",
        "xrechnung-cii.xml",
        "factur-x.xml",
        "ubl-credit-note.xml",
        "zugferd-1.xml",
        "zugferd-1.pdf",
    ):
        stem, body, truth = einvoice_sample(31, kind)  # type: ignore[arg-type]
        suffix = kind.rsplit(".", 1)[1]
        docs[f"{stem}.{suffix.upper() if kind.startswith('zugferd') else suffix}"] = (
            body,
            truth,
            "einvoice",
        )
    return docs


# The four fields every reader must get right (the held-out goal is stated on them).
KEY_FIELDS = ("invoice_number", "invoice_date", "currency", "total", "document_type")


def header(invoice: Invoice, read_as: str) -> dict[str, Any]:
    """E-invoices are read exactly: all header fields; text and OCR: the key fields."""
    names = (*HEADER_FIELDS, "document_type") if read_as == "einvoice" else KEY_FIELDS
    return {name: getattr(invoice, name) for name in names}


async def test_every_kind_of_invoice_ends_done_with_its_header_and_how_it_was_read(
    local_stack: stack.StackInfo,
) -> None:
    s3 = direct_s3(local_stack.s3_endpoint, local_stack.bucket)
    prefix = f"{unique('documents')}/"
    docs = documents()
    for name, (body, _, _) in docs.items():
        s3.put(f"{prefix}{name}", body)
    s3.put(f"{prefix}notes.txt", b"not an invoice")  # not listed
    params = flow_params(prefix, await create_lock(unique("lock")))

    summary = await run_flow(params)

    assert not isinstance(summary, BaseException), summary
    assert summary.done == len(docs) and summary.failed == 0
    entries = ManifestStore(s3, params["manifest_key"], lock=_no_lock).read_sync().entries
    assert set(entries) == {f"{prefix}{name}" for name in docs}
    for name, (_, truth, read_as) in docs.items():
        entry = entries[f"{prefix}{name}"]
        assert entry["status"] == Status.done, (name, entry)
        result = ExtractionResult.model_validate_json(s3.get(entry["result_key"]).body)
        assert result.read_as == read_as, name
        expected = header(truth, read_as)
        if expected["document_type"] is None:  # the generator's text invoices state none
            expected["document_type"] = result.invoice.document_type
        assert header(result.invoice, read_as) == expected, name
    credit = next(k for k in docs if "credit-note" in k)
    assert entries[f"{prefix}{credit}"].get("source") == "einvoice"


async def test_a_scan_goes_to_the_vision_model_as_page_images(
    local_stack: stack.StackInfo,
) -> None:
    """vision=auto: the scan's page reaches the model as a PNG image part (checked and
    recorded by the loopback server), the text PDF as text only; results say `vision`."""
    s3 = direct_s3(local_stack.s3_endpoint, local_stack.bucket)
    prefix = f"{unique('vision')}/"
    pdf, _ = generate_invoice(11)
    s3.put(f"{prefix}scan.pdf", scanned_pdf(pdf, seed=1))
    s3.put(f"{prefix}text.pdf", pdf)
    with running_llm_server(latency_s=0.01, api_key="sk-vision-test") as llm:
        block = save_llm_block(llm.base_url, "sk-vision-test", vision="auto")
        params = flow_params(prefix, await create_lock(unique("lock")), extractor_block=block)
        await run_flow(params)
        scan_images = llm.images(f"{prefix}scan.pdf")
        text_images = llm.images(f"{prefix}text.pdf")
        calls = llm.stats()["by_key"]
    assert len(scan_images) == 1 and scan_images[0]["media_type"] == "image/png"
    assert text_images == []
    assert calls[f"{prefix}scan.pdf"] == 1 and calls[f"{prefix}text.pdf"] == 1
    entries = ManifestStore(s3, params["manifest_key"], lock=_no_lock).read_sync().entries
    scan = ExtractionResult.model_validate_json(
        s3.get(entries[f"{prefix}scan.pdf"]["result_key"]).body
    )
    assert scan.read_as == "vision" and scan.source == "llm"


def _no_lock() -> Any:
    raise AssertionError("the test only reads the manifest")
