"""The e-invoice fast path: embedded CII/UBL XML read exactly, no extractor call."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fpdf import FPDF
from pypdf import PdfReader, PdfWriter
from typer.testing import CliRunner

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow.evaluate import extract_file
from invoiceflow.extractors.einvoice import (
    EInvoiceError,
    embedded_xml_files,
    parse_einvoice_xml,
    read_einvoice,
)
from invoiceflow.extractors.openai import OpenAIExtractor
from invoiceflow.extractors.rules import RulesExtractor, extract_invoice
from invoiceflow.manifest import GroupCommitter, ManifestStore
from invoiceflow.pdf import PdfError, parse_pdf
from invoiceflow.pipeline import InvoicePipeline, PipelineConfig
from invoiceflow.samples import EINVOICE_FLAVORS, generate_corpus, generate_invoice
from invoiceflow.schema import ExtractionResult
from invoiceflow.storage import S3Store

EXPECTED_FORMAT = {
    "factur-x": "factur-x",
    "zugferd": "zugferd",
    "xrechnung-cii": "xrechnung-cii",
    "xrechnung-ubl": "xrechnung-ubl",
}


@pytest.mark.parametrize("flavor", EINVOICE_FLAVORS)
@pytest.mark.parametrize("language", ["en", "de", "fr", "nl"])
def test_embedded_xml_is_read_exactly(flavor: str, language: str) -> None:
    pdf, truth = generate_invoice(101, language=language, einvoice=flavor)  # type: ignore[arg-type]
    extraction = read_einvoice(pdf)

    assert extraction is not None
    assert extraction.invoice == truth  # every field and every line, Decimal-exact
    assert (extraction.source, extraction.extractor) == ("einvoice", "einvoice")
    assert extraction.einvoice_format == EXPECTED_FORMAT[flavor]
    assert extraction.usage.total_tokens == 0 and extraction.cost is None
    # The printed twin says the same thing.
    assert extract_invoice(parse_pdf(pdf).text) == truth


def test_many_generated_einvoices_round_trip() -> None:
    found = 0
    for stem, pdf, truth in generate_corpus(60, seed=5, varied=True, einvoice_share=0.5):
        extraction = read_einvoice(pdf)
        if any(stem.endswith(f"-{flavor}") for flavor in EINVOICE_FLAVORS):
            assert extraction is not None and extraction.invoice == truth, stem
            found += 1
        else:
            assert extraction is None, stem
    assert 15 <= found <= 45


def test_pdf_without_attachments_has_no_einvoice() -> None:
    pdf, _ = generate_invoice(3)
    assert embedded_xml_files(pdf) == []
    assert read_einvoice(pdf) is None


@pytest.mark.parametrize("data", [b"", b"not a pdf", b"%PDF-1.7\n garbage"])
def test_broken_pdf_has_no_einvoice_and_does_not_raise(data: bytes) -> None:
    assert read_einvoice(data) is None


def _with_attachment(pdf: bytes, name: str, data: bytes) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.add_attachment(name, data)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<rsm:CrossIndustryInvoice xmlns:rsm="urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100">
&lol2;</rsm:CrossIndustryInvoice>"""


@pytest.mark.parametrize(
    "xml",
    [
        pytest.param(b"<not-closed", id="malformed"),
        pytest.param(b"<order><id>1</id></order>", id="foreign"),
        pytest.param(BILLION_LAUGHS, id="entity-expansion"),
    ],
)
def test_unusable_xml_falls_back_to_the_text(xml: bytes) -> None:
    pdf, truth = generate_invoice(8)
    hybrid = _with_attachment(pdf, "factur-x.xml", xml)
    assert [f.name for f in embedded_xml_files(hybrid)] == ["factur-x.xml"]
    assert read_einvoice(hybrid) is None
    done = asyncio.run(extract_file(hybrid, RulesExtractor()))
    assert done.extraction.source == "rules"
    assert done.validated.invoice == truth


def test_xml_values_beyond_the_schema_are_refused() -> None:
    pdf, _ = generate_invoice(9, einvoice="xrechnung-ubl")
    (embedded,) = embedded_xml_files(pdf)
    assert parse_einvoice_xml(embedded.data)[1] == "xrechnung-ubl"
    text = embedded.data.decode()
    start = text.index("<cbc:PayableAmount")
    end = text.index("</cbc:PayableAmount>")
    broken = text[:start] + '<cbc:PayableAmount currencyID="EUR">12.345678' + text[end:]
    # Rounding would change a legally binding amount: refuse, and use the text instead.
    with pytest.raises(EInvoiceError, match="4 decimal places"):
        parse_einvoice_xml(broken.encode())


def test_scanned_hybrid_invoice_is_read_from_its_xml() -> None:
    """No text layer at all (an image-only scan), but the XML is there."""
    source, truth = generate_invoice(12, einvoice="factur-x")
    (embedded,) = embedded_xml_files(source)
    blank = FPDF()
    blank.add_page()
    blank.embed_file(bytes=embedded.data, basename="factur-x.xml")
    scan = bytes(blank.output())
    with pytest.raises(PdfError):
        parse_pdf(scan)
    done = asyncio.run(extract_file(scan, RulesExtractor()))
    assert done.extraction.source == "einvoice"
    assert done.validated.invoice == truth


def test_cli_extract_uses_the_fast_path(tmp_path: Path) -> None:
    from flows.cli import app

    pdf, truth = generate_invoice(14, language="de", einvoice="zugferd")
    path = tmp_path / "hybrid.pdf"
    path.write_bytes(pdf)
    result = CliRunner().invoke(app, ["extract", str(path)])

    assert result.exit_code == 0, result.output
    assert "source: einvoice (zugferd)" in result.output
    start = result.output.index("{")
    assert json.loads(result.output[start:]) == json.loads(truth.model_dump_json())


# --- the pipeline never calls the LLM for an e-invoice ----------------------------------


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMServerHandle]:
    with running_llm_server(api_key="k") as handle:
        yield handle


@pytest.mark.llm
async def test_pipeline_skips_the_llm_for_einvoices(
    s3_store: S3Store, llm: LLMServerHandle, unique_prefix: str
) -> None:
    llm.reset()
    hybrid, hybrid_truth = generate_invoice(21, language="fr", einvoice="xrechnung-cii")
    plain, _ = generate_invoice(22)
    keys = {f"{unique_prefix}hybrid.pdf": hybrid, f"{unique_prefix}plain.pdf": plain}
    for key, body in keys.items():
        s3_store.put(key, body, content_type="application/pdf")

    store = ManifestStore(s3_store, f"{unique_prefix}manifest.json", lock=asyncio.Lock)
    config = PipelineConfig(unique_prefix, f"{unique_prefix}results/", "run-1")
    async with (
        GroupCommitter(store, max_wait_s=0.05) as committer,
        OpenAIExtractor(base_url=llm.base_url, api_key="k") as extractor,
    ):
        pipeline = InvoicePipeline(s3_store, committer, extractor, config)
        items = await pipeline.claim()
        assert len(items) == 2
        outcomes = {
            o.key: o
            for o in await asyncio.gather(
                *(pipeline.process(pipeline.parse(item)) for item in items)
            )
        }

    hybrid_key = f"{unique_prefix}hybrid.pdf"
    assert outcomes[hybrid_key].source == "einvoice"
    assert outcomes[hybrid_key].usage == {}
    # Exactly one LLM request: the plain PDF's.
    assert llm.stats()["by_key"] == {f"{unique_prefix}plain.pdf": 1}
    result_key = outcomes[hybrid_key].result_key
    assert result_key is not None
    result = ExtractionResult.model_validate_json(s3_store.get(result_key).body)
    assert result.invoice == hybrid_truth
    assert (result.source, result.extractor, result.einvoice_format) == (
        "einvoice",
        "einvoice",
        "xrechnung-cii",
    )
    assert result.usage is None and result.cost is None and not result.needs_review
    entry = (await store.read()).entry(hybrid_key)
    assert entry is not None
    assert (entry.source, entry.extractor, entry.tokens_in) == ("einvoice", "einvoice", None)
