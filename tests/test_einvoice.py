"""The e-invoice fast path: embedded CII/UBL XML read exactly, no extractor call."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import pickle
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from fpdf import FPDF
from typer.testing import CliRunner

from devtools.llm_server import LLMServerHandle, running_llm_server
from invoiceflow.einvoice_samples import SAMPLE_KINDS, SampleKind, einvoice_sample, with_attachment
from invoiceflow.evaluate import extract_file
from invoiceflow.extractors import Extraction
from invoiceflow.extractors.einvoice import (
    MAX_XML_BYTES,
    EInvoiceError,
    embedded_xml_files,
    parse_einvoice_xml,
    read_einvoice,
    read_einvoice_xml,
    read_embedded,
)
from invoiceflow.extractors.openai import OpenAIExtractor
from invoiceflow.extractors.rules import RulesExtractor, extract_invoice
from invoiceflow.manifest import GroupCommitter, ManifestStore
from invoiceflow.pdf import PdfError, parse_pdf
from invoiceflow.pipeline import InvoicePipeline, PipelineConfig
from invoiceflow.samples import EINVOICE_FLAVORS, generate_corpus, generate_invoice
from invoiceflow.schema import ExtractionResult, Invoice, TaxBreakdown
from invoiceflow.storage import S3Store
from invoiceflow.validate import (
    check_invoice,
    iban_is_valid,
    tax_breakdown_reasons,
    validate_extraction,
)

# Fields the e-invoice reader fills that the generator's truth does not state.
READER_ONLY_FIELDS = (
    "document_type",
    "customer_tax_id",
    "payment_terms",
    "iban",
    "bic",
    "tax_breakdown",
    "vendor_address",
    "customer_address",
    "service_period_start",
    "service_period_end",
)


def as_generated(invoice: Invoice) -> Invoice:
    """The invoice with only the fields the sample generator states."""
    defaults = {
        name: Invoice.model_fields[name].get_default(call_default_factory=True)
        for name in READER_ONLY_FIELDS
    }
    return invoice.model_copy(update=defaults)


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
    # Every field and every line, Decimal-exact.
    assert as_generated(extraction.invoice) == truth
    assert extraction.invoice.document_type == "invoice"
    assert (extraction.source, extraction.extractor) == ("einvoice", "einvoice")
    assert extraction.einvoice_format == EXPECTED_FORMAT[flavor]
    assert extraction.usage.total_tokens == 0 and extraction.cost is None
    # The printed twin says the same thing.
    assert as_generated(extract_invoice(parse_pdf(pdf).text)) == truth


def test_many_generated_einvoices_round_trip() -> None:
    found = 0
    for stem, pdf, truth in generate_corpus(60, seed=5, varied=True, einvoice_share=0.5):
        extraction = read_einvoice(pdf)
        if any(stem.endswith(f"-{flavor}") for flavor in EINVOICE_FLAVORS):
            assert extraction is not None and as_generated(extraction.invoice) == truth, stem
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
    hybrid = with_attachment(pdf, "factur-x.xml", xml)
    assert [f.name for f in embedded_xml_files(hybrid)] == ["factur-x.xml"]
    assert read_einvoice(hybrid) is None
    done = asyncio.run(extract_file(hybrid, RulesExtractor()))
    assert done.extraction.source == "rules"
    assert as_generated(done.validated.invoice) == truth


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
    assert as_generated(done.validated.invoice) == truth


def test_cli_extract_uses_the_fast_path(tmp_path: Path) -> None:
    from flows.cli import app

    pdf, truth = generate_invoice(14, language="de", einvoice="zugferd")
    path = tmp_path / "hybrid.pdf"
    path.write_bytes(pdf)
    result = CliRunner().invoke(app, ["extract", str(path)])

    assert result.exit_code == 0, result.output
    assert "source: einvoice (zugferd)" in result.output
    start = result.output.index("{")
    assert as_generated(Invoice.model_validate_json(result.output[start:])) == truth


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
    assert as_generated(result.invoice) == hybrid_truth
    assert (result.source, result.extractor, result.einvoice_format) == (
        "einvoice",
        "einvoice",
        "xrechnung-cii",
    )
    assert result.usage is None and result.cost is None and not result.needs_review
    entry = (await store.read()).entry(hybrid_key)
    assert entry is not None
    assert (entry.source, entry.extractor, entry.tokens_in) == ("einvoice", "einvoice", None)


# --- bare XML: what is read, and how everything else is refused -------------------------------


def generated_xml(flavor: str, seed: int = 31) -> tuple[bytes, Invoice]:
    pdf, truth = generate_invoice(seed, einvoice=flavor)  # type: ignore[arg-type]
    (embedded,) = embedded_xml_files(pdf)
    return embedded.data, truth


@pytest.mark.parametrize("flavor", EINVOICE_FLAVORS)
def test_bare_xml_is_read_like_the_embedded_one(flavor: str) -> None:
    xml, truth = generated_xml(flavor)
    extraction = read_einvoice_xml(xml, f"invoice-{flavor}.xml")
    assert as_generated(extraction.invoice) == truth
    assert extraction.invoice.document_type == "invoice"
    assert (extraction.source, extraction.einvoice_format) == ("einvoice", EXPECTED_FORMAT[flavor])
    assert extraction.notes == ()


def test_cii_type_381_is_a_credit_note_with_the_amounts_as_stated() -> None:
    xml, truth = generated_xml("factur-x")
    credit = xml.replace(b"<ram:TypeCode>380</ram:TypeCode>", b"<ram:TypeCode>381</ram:TypeCode>")
    assert credit != xml
    invoice = read_einvoice_xml(credit, "credit.xml").invoice
    assert invoice.document_type == "credit_note"
    # CII states a credit note's amounts positive; the type code carries the meaning.
    assert invoice.total == truth.total and truth.total is not None and truth.total > 0


def test_ubl_credit_note_root_is_a_credit_note() -> None:
    xml, truth = generated_xml("xrechnung-ubl")
    text = xml.decode()
    for invoice_name, credit_name in [
        ("xsd:Invoice-2", "xsd:CreditNote-2"),
        ("<Invoice ", "<CreditNote "),
        ("</Invoice>", "</CreditNote>"),
        ("cbc:InvoiceTypeCode>380<", "cbc:CreditNoteTypeCode>381<"),
        ("cbc:InvoiceTypeCode>", "cbc:CreditNoteTypeCode>"),
        ("cac:InvoiceLine>", "cac:CreditNoteLine>"),
        ("cbc:InvoicedQuantity", "cbc:CreditedQuantity"),
    ]:
        assert invoice_name in text
        text = text.replace(invoice_name, credit_name)
    extraction = read_einvoice_xml(text.encode(), "credit.xml")
    assert extraction.invoice.document_type == "credit_note"
    assert extraction.invoice.total == truth.total
    assert [i.amount for i in extraction.invoice.line_items] == [i.amount for i in truth.line_items]


def _without_header(xml: bytes, tag: bytes) -> bytes:
    start = xml.index(b"<" + tag)
    end = xml.index(b"</" + tag + b">") + len(tag) + 3
    return xml[:start] + xml[end:]


@pytest.mark.parametrize(
    ("xml", "kind", "message"),
    [
        pytest.param(b"<not-closed", "einvoice_invalid", "not well-formed", id="malformed"),
        pytest.param(b"", "einvoice_invalid", "not well-formed", id="empty"),
        pytest.param(BILLION_LAUGHS, "einvoice_invalid", "forbidden", id="entity-expansion"),
        pytest.param(
            b'<Order xmlns="urn:oasis:names:specification:ubl:schema:xsd:Order-2"/>',
            "unsupported_document",
            "Order-2}Order' is a UBL order",
            id="ubl-order",
        ),
        pytest.param(b"<html><body/></html>", "unsupported_document", "'html'", id="html"),
    ],
)
def test_bare_xml_refusals_have_a_kind(xml: bytes, kind: str, message: str) -> None:
    with pytest.raises(EInvoiceError, match=message) as caught:
        read_einvoice_xml(xml, "x.xml")
    assert caught.value.kind == kind


def test_bare_xml_without_a_header_field_is_invalid() -> None:
    xml, _ = generated_xml("xrechnung-cii")
    broken = _without_header(xml, b"ram:InvoiceCurrencyCode")
    with pytest.raises(EInvoiceError, match="states no currency") as caught:
        read_einvoice_xml(broken, "x.xml")
    assert caught.value.kind == "einvoice_invalid"


def test_oversized_xml_is_refused_before_parsing() -> None:
    xml, _ = generated_xml("factur-x")
    padding = b"<!--" + b"x" * (MAX_XML_BYTES + 1) + b"-->"
    with pytest.raises(EInvoiceError, match="over the 10000000 byte limit") as caught:
        read_einvoice_xml(xml + padding, "big.xml")
    assert caught.value.kind == "too_large"


def test_einvoice_error_keeps_its_kind_across_processes() -> None:
    error = pickle.loads(pickle.dumps(EInvoiceError("root 'x'", kind="unsupported_document")))
    assert (error.kind, str(error)) == ("unsupported_document", "root 'x'")


def _disagreeing(xml: bytes) -> bytes:
    """The generated CII with a grand total one euro off its tax basis + tax."""
    start = xml.index(b"<ram:GrandTotalAmount>") + len(b"<ram:GrandTotalAmount>")
    end = xml.index(b"</ram:GrandTotalAmount>")
    wrong = Decimal(xml[start:end].decode()) + 1
    return xml[:start] + str(wrong).encode() + xml[end:]


def test_bare_xml_that_disagrees_with_itself_is_read_for_review() -> None:
    xml, truth = generated_xml("factur-x")
    extraction = read_einvoice_xml(_disagreeing(xml), "x.xml")
    assert extraction.invoice.total == truth.total + 1  # type: ignore[operator]
    assert extraction.notes and "its grand total is" in extraction.notes[0]
    # The notes become review reasons like any extractor's.
    assert validate_extraction(extraction, "").needs_review


@pytest.mark.parametrize(
    ("mutate", "note"),
    [
        pytest.param(_disagreeing, "disagrees with itself", id="disagrees"),
        pytest.param(lambda x: x[: len(x) // 2], "not well-formed", id="truncated"),
        pytest.param(
            lambda x: _without_header(x, b"ram:InvoiceCurrencyCode"), "states no", id="no-currency"
        ),
    ],
)
def test_embedded_xml_that_is_invalid_is_not_used_and_says_why(
    mutate: Callable[[bytes], bytes], note: str
) -> None:
    xml, _ = generated_xml("factur-x", seed=8)
    pdf, truth = generate_invoice(8)
    hybrid = with_attachment(pdf, "factur-x.xml", mutate(xml))
    read = read_embedded(hybrid)
    assert read.extraction is None
    assert len(read.notes) == 1 and note in read.notes[0] and "factur-x.xml" in read.notes[0]
    assert read_einvoice(hybrid) is None
    done = asyncio.run(extract_file(hybrid, RulesExtractor()))
    assert (done.extraction.source, as_generated(done.validated.invoice)) == ("rules", truth)


def test_pdf_carrying_an_order_is_not_an_invoice() -> None:
    pdf, _ = generate_invoice(8)
    order = (
        b'<Order xmlns="urn:oasis:names:specification:ubl:schema:xsd:Order-2"><ID>1</ID></Order>'
    )
    with pytest.raises(EInvoiceError, match=r"order\.xml is a UBL order") as caught:
        read_embedded(with_attachment(pdf, "order.xml", order))
    assert caught.value.kind == "unsupported_document"


# --- the new fields, and the checks on them --------------------------------------------------

CII_PAYMENT = b"""<ram:SpecifiedTradeSettlementPaymentMeans><ram:TypeCode>58</ram:TypeCode>
<ram:PayeePartyCreditorFinancialAccount><ram:IBANID>%s</ram:IBANID>
</ram:PayeePartyCreditorFinancialAccount><ram:PayeeSpecifiedCreditorFinancialInstitution>
<ram:BICID>COBADEFFXXX</ram:BICID></ram:PayeeSpecifiedCreditorFinancialInstitution>
</ram:SpecifiedTradeSettlementPaymentMeans>"""


def _with_payee(xml: bytes, iban: bytes) -> bytes:
    anchor = xml.index(
        b"<ram:ApplicableTradeTax>", xml.index(b"<ram:ApplicableHeaderTradeSettlement")
    )
    return xml[:anchor] + CII_PAYMENT % iban + xml[anchor:]


def test_iban_is_read_and_checked_mod_97() -> None:
    xml, _ = generated_xml("factur-x")
    good = read_einvoice_xml(_with_payee(xml, b"DE89 3704 0044 0532 0130 00"), "x.xml")
    assert (good.invoice.iban, good.invoice.bic) == ("DE89370400440532013000", "COBADEFFXXX")
    assert not validate_extraction(good, "").needs_review

    bad = read_einvoice_xml(_with_payee(xml, b"DE89370400440532013001"), "x.xml")
    reasons = validate_extraction(bad, "").reasons
    assert reasons == ("IBAN 'DE89370400440532013001' fails the ISO 13616 mod-97 check",)


@pytest.mark.parametrize(
    ("iban", "valid"),
    [
        ("GB82 WEST 1234 5698 7654 32", True),
        ("NL91ABNA0417164300", True),
        ("NL91ABNA0417164301", False),
        ("DE8576040061XXXXXXXXXX", False),  # masked
        ("1234 5678 9012", False),
    ],
)
def test_iban_mod_97(iban: str, valid: bool) -> None:
    assert iban_is_valid(iban) is valid


def test_tax_breakdown_must_add_up_to_the_tax_total() -> None:
    invoice = Invoice(
        tax_total=Decimal("26.60"),
        tax_breakdown=[
            TaxBreakdown(rate=Decimal(19), taxable_amount=Decimal(100), tax_amount=Decimal(19)),
            TaxBreakdown(rate=Decimal(7), taxable_amount=Decimal(100), tax_amount=Decimal(7)),
        ],
    )
    assert tax_breakdown_reasons(invoice) == ["tax breakdown sums to 26, tax total is 26.60"]
    assert "tax breakdown sums to 26, tax total is 26.60" in check_invoice(invoice)
    fixed = invoice.model_copy(update={"tax_total": Decimal("26.00")})
    assert tax_breakdown_reasons(fixed) == []


UBL_WITH_NEW_FIELDS = b"""<?xml version="1.0"?>
<Invoice xmlns="urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
 xmlns:cac="urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
 xmlns:cbc="urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2">
 <cbc:ID>INV-7</cbc:ID><cbc:IssueDate>2025-03-01+01:00</cbc:IssueDate>
 <cbc:InvoiceTypeCode>380</cbc:InvoiceTypeCode>
 <cbc:DocumentCurrencyCode>EUR</cbc:DocumentCurrencyCode>
 <cac:InvoicePeriod><cbc:StartDate>2025-02-01</cbc:StartDate><cbc:EndDate>2025-02-28</cbc:EndDate>
 </cac:InvoicePeriod>
 <cac:AccountingSupplierParty><cac:Party><cac:PostalAddress>
 <cbc:StreetName>Hauptstr. 1</cbc:StreetName>
 <cbc:CityName>Berlin</cbc:CityName><cbc:PostalZone>10115</cbc:PostalZone>
 <cac:Country><cbc:IdentificationCode>DE</cbc:IdentificationCode></cac:Country></cac:PostalAddress>
 <cac:PartyTaxScheme><cbc:CompanyID>DE123456789</cbc:CompanyID><cac:TaxScheme><cbc:ID>VAT</cbc:ID>
 </cac:TaxScheme></cac:PartyTaxScheme>
 <cac:PartyLegalEntity><cbc:RegistrationName>Seller GmbH</cbc:RegistrationName>
 </cac:PartyLegalEntity>
 </cac:Party></cac:AccountingSupplierParty>
 <cac:AccountingCustomerParty><cac:Party><cac:PostalAddress><cbc:StreetName>Rue 2</cbc:StreetName>
 <cbc:CityName>Paris</cbc:CityName><cbc:PostalZone>75001</cbc:PostalZone>
 <cac:Country><cbc:IdentificationCode>FR</cbc:IdentificationCode></cac:Country></cac:PostalAddress>
 <cac:PartyTaxScheme><cbc:CompanyID>FR12345678901</cbc:CompanyID><cac:TaxScheme><cbc:ID>VAT</cbc:ID>
 </cac:TaxScheme></cac:PartyTaxScheme>
 <cac:PartyLegalEntity><cbc:RegistrationName>Buyer SA</cbc:RegistrationName></cac:PartyLegalEntity>
 </cac:Party></cac:AccountingCustomerParty>
 <cac:PaymentMeans><cbc:PaymentMeansCode>58</cbc:PaymentMeansCode><cac:PayeeFinancialAccount>
 <cbc:ID>DE89 3704 0044 0532 0130 00</cbc:ID><cac:FinancialInstitutionBranch>
 <cbc:ID>COBADEFFXXX</cbc:ID>
 </cac:FinancialInstitutionBranch></cac:PayeeFinancialAccount></cac:PaymentMeans>
 <cac:PaymentTerms><cbc:Note>30 days net</cbc:Note></cac:PaymentTerms>
 <cac:TaxTotal><cbc:TaxAmount currencyID="EUR">26.00</cbc:TaxAmount>
 <cac:TaxSubtotal><cbc:TaxableAmount currencyID="EUR">100.00</cbc:TaxableAmount>
 <cbc:TaxAmount currencyID="EUR">19.00</cbc:TaxAmount><cac:TaxCategory><cbc:ID>S</cbc:ID>
 <cbc:Percent>19</cbc:Percent></cac:TaxCategory></cac:TaxSubtotal>
 <cac:TaxSubtotal><cbc:TaxableAmount currencyID="EUR">100.00</cbc:TaxableAmount>
 <cbc:TaxAmount currencyID="EUR">7.00</cbc:TaxAmount><cac:TaxCategory><cbc:ID>S</cbc:ID>
 <cbc:Percent>7</cbc:Percent></cac:TaxCategory></cac:TaxSubtotal></cac:TaxTotal>
 <cac:LegalMonetaryTotal><cbc:LineExtensionAmount currencyID="EUR">200.00</cbc:LineExtensionAmount>
 <cbc:TaxExclusiveAmount currencyID="EUR">200.00</cbc:TaxExclusiveAmount>
 <cbc:TaxInclusiveAmount currencyID="EUR">226.00</cbc:TaxInclusiveAmount>
 <cbc:PayableAmount currencyID="EUR">226.00</cbc:PayableAmount></cac:LegalMonetaryTotal>
 <cac:InvoiceLine><cbc:ID>1</cbc:ID><cbc:InvoicedQuantity unitCode="C62">2</cbc:InvoicedQuantity>
 <cbc:LineExtensionAmount currencyID="EUR">200.00</cbc:LineExtensionAmount>
 <cac:Item><cbc:Name>Work</cbc:Name></cac:Item>
 <cac:Price><cbc:PriceAmount currencyID="EUR">1.00</cbc:PriceAmount>
 <cbc:BaseQuantity unitCode="C62">0.01</cbc:BaseQuantity></cac:Price></cac:InvoiceLine>
</Invoice>"""

CII_WITH_NEW_FIELDS = b"""<?xml version="1.0"?>
<rsm:CrossIndustryInvoice xmlns:rsm="urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100"
 xmlns:ram="urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100"
 xmlns:udt="urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100">
 <rsm:ExchangedDocument><ram:ID>INV-7</ram:ID><ram:TypeCode>380</ram:TypeCode>
 <ram:IssueDateTime><udt:DateTimeString format="102">20250301</udt:DateTimeString>
 </ram:IssueDateTime>
 </rsm:ExchangedDocument>
 <rsm:SupplyChainTradeTransaction>
 <ram:IncludedSupplyChainTradeLineItem><ram:AssociatedDocumentLineDocument>
 <ram:LineID>1</ram:LineID>
 </ram:AssociatedDocumentLineDocument><ram:SpecifiedTradeProduct><ram:Name>Work</ram:Name>
 </ram:SpecifiedTradeProduct><ram:SpecifiedLineTradeAgreement><ram:NetPriceProductTradePrice>
 <ram:ChargeAmount>1.00</ram:ChargeAmount><ram:BasisQuantity>0.01</ram:BasisQuantity>
 </ram:NetPriceProductTradePrice></ram:SpecifiedLineTradeAgreement><ram:SpecifiedLineTradeDelivery>
 <ram:BilledQuantity unitCode="C62">2</ram:BilledQuantity></ram:SpecifiedLineTradeDelivery>
 <ram:SpecifiedLineTradeSettlement><ram:SpecifiedTradeSettlementLineMonetarySummation>
 <ram:LineTotalAmount>200.00</ram:LineTotalAmount>
 </ram:SpecifiedTradeSettlementLineMonetarySummation>
 </ram:SpecifiedLineTradeSettlement></ram:IncludedSupplyChainTradeLineItem>
 <ram:ApplicableHeaderTradeAgreement>
 <ram:SellerTradeParty><ram:Name>Seller GmbH</ram:Name><ram:PostalTradeAddress>
 <ram:PostcodeCode>10115</ram:PostcodeCode><ram:LineOne>Hauptstr. 1</ram:LineOne>
 <ram:CityName>Berlin</ram:CityName><ram:CountryID>DE</ram:CountryID></ram:PostalTradeAddress>
 <ram:SpecifiedTaxRegistration><ram:ID schemeID="VA">DE123456789</ram:ID>
 </ram:SpecifiedTaxRegistration>
 </ram:SellerTradeParty>
 <ram:BuyerTradeParty><ram:Name>Buyer SA</ram:Name><ram:PostalTradeAddress>
 <ram:PostcodeCode>75001</ram:PostcodeCode><ram:LineOne>Rue 2</ram:LineOne>
 <ram:CityName>Paris</ram:CityName><ram:CountryID>FR</ram:CountryID></ram:PostalTradeAddress>
 <ram:SpecifiedTaxRegistration><ram:ID schemeID="VA">FR12345678901</ram:ID>
 </ram:SpecifiedTaxRegistration>
 </ram:BuyerTradeParty></ram:ApplicableHeaderTradeAgreement>
 <ram:ApplicableHeaderTradeDelivery/>
 <ram:ApplicableHeaderTradeSettlement><ram:InvoiceCurrencyCode>EUR</ram:InvoiceCurrencyCode>
 <ram:SpecifiedTradeSettlementPaymentMeans><ram:TypeCode>58</ram:TypeCode>
 <ram:PayeePartyCreditorFinancialAccount><ram:IBANID>DE89370400440532013000</ram:IBANID>
 </ram:PayeePartyCreditorFinancialAccount><ram:PayeeSpecifiedCreditorFinancialInstitution>
 <ram:BICID>COBADEFFXXX</ram:BICID></ram:PayeeSpecifiedCreditorFinancialInstitution>
 </ram:SpecifiedTradeSettlementPaymentMeans>
 <ram:ApplicableTradeTax><ram:CalculatedAmount>19.00</ram:CalculatedAmount>
 <ram:TypeCode>VAT</ram:TypeCode>
 <ram:BasisAmount>100.00</ram:BasisAmount><ram:CategoryCode>S</ram:CategoryCode>
 <ram:RateApplicablePercent>19</ram:RateApplicablePercent></ram:ApplicableTradeTax>
 <ram:ApplicableTradeTax><ram:CalculatedAmount>7.00</ram:CalculatedAmount>
 <ram:TypeCode>VAT</ram:TypeCode>
 <ram:BasisAmount>100.00</ram:BasisAmount><ram:CategoryCode>S</ram:CategoryCode>
 <ram:RateApplicablePercent>7</ram:RateApplicablePercent></ram:ApplicableTradeTax>
 <ram:BillingSpecifiedPeriod>
 <ram:StartDateTime><udt:DateTimeString format="102">20250201</udt:DateTimeString>
 </ram:StartDateTime>
 <ram:EndDateTime><udt:DateTimeString format="102">20250228</udt:DateTimeString></ram:EndDateTime>
 </ram:BillingSpecifiedPeriod>
 <ram:SpecifiedTradePaymentTerms><ram:Description>30 days net</ram:Description>
 </ram:SpecifiedTradePaymentTerms>
 <ram:SpecifiedTradeSettlementHeaderMonetarySummation>
 <ram:LineTotalAmount>200.00</ram:LineTotalAmount>
 <ram:TaxBasisTotalAmount>200.00</ram:TaxBasisTotalAmount>
 <ram:TaxTotalAmount currencyID="EUR">26.00</ram:TaxTotalAmount>
 <ram:GrandTotalAmount>226.00</ram:GrandTotalAmount>
 <ram:DuePayableAmount>226.00</ram:DuePayableAmount>
 </ram:SpecifiedTradeSettlementHeaderMonetarySummation>
 </ram:ApplicableHeaderTradeSettlement></rsm:SupplyChainTradeTransaction>
</rsm:CrossIndustryInvoice>"""


@pytest.mark.parametrize("xml", [UBL_WITH_NEW_FIELDS, CII_WITH_NEW_FIELDS], ids=["ubl", "cii"])
def test_new_fields_from_both_syntaxes(xml: bytes) -> None:
    extraction = read_einvoice_xml(xml, "x.xml")
    invoice = extraction.invoice
    assert extraction.notes == ()
    assert invoice.model_dump(mode="json", exclude={"line_items"}) == {
        "invoice_number": "INV-7",
        "invoice_date": "2025-03-01",
        "due_date": None,
        "vendor_name": "Seller GmbH",
        "vendor_tax_id": "DE123456789",
        "customer_name": "Buyer SA",
        "po_number": None,
        "currency": "EUR",
        "subtotal": "200.00",
        "tax_total": "26.00",
        "total": "226.00",
        "amount_due": "226.00",
        "document_type": "invoice",
        "customer_tax_id": "FR12345678901",
        "payment_terms": "30 days net",
        "iban": "DE89370400440532013000",
        "bic": "COBADEFFXXX",
        "tax_breakdown": [
            {"rate": "19", "taxable_amount": "100.00", "tax_amount": "19.00"},
            {"rate": "7", "taxable_amount": "100.00", "tax_amount": "7.00"},
        ],
        "vendor_address": "Hauptstr. 1, 10115 Berlin, DE",
        "customer_address": "Rue 2, 75001 Paris, FR",
        "service_period_start": "2025-02-01",
        "service_period_end": "2025-02-28",
    }
    # "1.00 per 0.01 units" is 100 per unit: the line arithmetic holds.
    (line,) = invoice.line_items
    assert (line.quantity, line.unit_price, line.amount) == (2, 100, Decimal("200.00"))
    assert not validate_extraction(extraction, "").needs_review


def test_results_written_before_the_new_fields_stay_readable() -> None:
    old = {
        "source_key": "in/a.pdf",
        "source_etag": "e",
        "extractor": "rules",
        "pages": 1,
        "extracted_at": "2025-01-01T00:00:00Z",
        "invoice": {"invoice_number": "1", "total": "10.00", "line_items": []},
    }
    result = ExtractionResult.model_validate(old)
    assert result.read_as is None
    assert result.invoice.document_type is None and result.invoice.tax_breakdown == []


# --- attachments are size-checked before they are inflated (issue 11, item 3) ----------------


def attachment_bomb(
    count: int = 30, inflated: int = 75_000_000, declared: int | None = None
) -> bytes:
    """A PDF whose ``count`` XML attachments are zeros deflated twice (~500 bytes each).

    pypdf's ``reader.attachments[name]`` would inflate each to ``inflated`` bytes (its
    own cap is 75 MB per stream): 30 of them took a run to 2.4 GB RSS.
    """
    payload = zlib.compress(zlib.compress(b"\0" * inflated, 9), 9)
    params = f" /Params << /Size {declared} >>" if declared is not None else ""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R /Names << /EmbeddedFiles << /Names ["
        + b" ".join(f"(f{i}.xml) {4 + 2 * i} 0 R".encode() for i in range(count))
        + b"] >> >> >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
    ]
    for i in range(count):
        objects.append(
            f"<< /Type /Filespec /F (f{i}.xml) /UF (f{i}.xml) "
            f"/EF << /F {5 + 2 * i} 0 R >> >>".encode()
        )
        objects.append(
            f"<< /Type /EmbeddedFile /Filter [/FlateDecode /FlateDecode] "
            f"/Length {len(payload)}{params} >>\nstream\n".encode()
            + payload
            + b"\nendstream"
        )
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return bytes(out)


# Run in a fresh interpreter so nothing else the test session allocated is counted.
MEASURE_READ = """
import json, sys, time, tracemalloc
from invoiceflow.extractors.einvoice import EInvoiceError, read_embedded
pdf = sys.stdin.buffer.read()
tracemalloc.start()
start = time.perf_counter()
try:
    read_embedded(pdf)
    outcome = {"kind": None, "message": ""}
except EInvoiceError as exc:
    outcome = {"kind": exc.kind, "message": str(exc)}
outcome["seconds"] = time.perf_counter() - start
outcome["peak_mb"] = tracemalloc.get_traced_memory()[1] / 1e6
print(json.dumps(outcome))
"""


def test_attachment_bomb_is_refused_without_inflating_it() -> None:
    pdf = attachment_bomb()
    assert len(pdf) < 17_000  # the 17 KB PDF
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_READ],
        input=pdf,
        capture_output=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    outcome = json.loads(done.stdout)
    print(f"attachment bomb: {outcome}")
    assert outcome["kind"] == "too_large"
    assert outcome["message"] == "attachment f0.xml inflates past 10000000 bytes"
    # Peak allocation is the 10 MB bound plus one copy, not even one whole attachment
    # (pypdf would allocate 75 MB for each of the 30).
    assert outcome["peak_mb"] < 30
    assert outcome["seconds"] < 5


def test_declared_attachment_size_is_checked_first() -> None:
    pdf = attachment_bomb(count=2, inflated=1_000, declared=75_000_000)
    with pytest.raises(EInvoiceError, match=r"f0\.xml declares 75000000 bytes") as caught:
        read_embedded(pdf)
    assert caught.value.kind == "too_large"
    assert read_einvoice(pdf) is None  # the old entry point still never raises


def test_small_attachments_in_the_same_encoding_are_read() -> None:
    """The hand-built PDF itself is fine: 1 KB of zeros is just not XML."""
    read = read_embedded(attachment_bomb(count=1, inflated=1_000))
    assert read.extraction is None
    assert read.notes and "not well-formed" in read.notes[0]


def test_llm_payment_fields_must_be_printed_on_the_document() -> None:
    """A prompt-injected IBAN (or tax line) is dropped like any unsupported value."""
    text = (
        "Invoice INV-1 2025-03-01 Seller GmbH EUR\nNet 100.00 VAT 19% 19.00 Total 119.00\n"
        "Pay to IBAN DE89 3704 0044 0532 0130 00, BIC COBADEFFXXX, 30 days net"
    )
    answer = Invoice(
        invoice_number="INV-1",
        iban="GB82WEST12345698765432",  # the attacker's, not on the page
        bic="COBADEFFXXX",
        payment_terms="30 days net",
        tax_breakdown=[
            TaxBreakdown(rate=Decimal(19), taxable_amount=Decimal(100), tax_amount=Decimal(19)),
            TaxBreakdown(rate=Decimal(7), taxable_amount=Decimal(50), tax_amount=Decimal("3.50")),
        ],
    )
    extraction = Extraction(invoice=answer, source="llm", extractor="openai")
    validated = validate_extraction(extraction, text)
    assert validated.invoice.iban is None
    assert (validated.invoice.bic, validated.invoice.payment_terms) == (
        "COBADEFFXXX",
        "30 days net",
    )
    assert [t.rate for t in validated.invoice.tax_breakdown] == [19]
    assert "iban 'GB82WEST12345698765432' is not in the document text; dropped" in validated.reasons
    printed = answer.model_copy(update={"iban": "DE89370400440532013000", "tax_breakdown": []})
    kept = validate_extraction(Extraction(invoice=printed, source="llm", extractor="openai"), text)
    assert kept.invoice.iban == "DE89370400440532013000"


def test_an_unreadable_optional_date_is_left_out_with_a_note() -> None:
    month = CII_WITH_NEW_FIELDS.replace(
        b'format="102">20250228</udt:DateTimeString></ram:EndDateTime>',
        b'format="610">202502</udt:DateTimeString></ram:EndDateTime>',
    )
    assert month != CII_WITH_NEW_FIELDS
    extraction = read_einvoice_xml(month, "x.xml")
    assert extraction.invoice.service_period_end is None
    assert extraction.notes == (
        "period end '202502' (format 610) is not a YYYYMMDD date; left out",
    )
    # Embedded, the rest of the XML is still used, and the note still asks for review.
    pdf, _ = generate_invoice(8)
    read = read_embedded(with_attachment(pdf, "factur-x.xml", month))
    assert read.extraction is not None and read.extraction.notes == extraction.notes


def test_an_iso_date_where_yyyymmdd_belongs_is_unambiguous() -> None:
    iso = CII_WITH_NEW_FIELDS.replace(b'format="102">20250301<', b'format="102">2025-03-01<')
    assert iso != CII_WITH_NEW_FIELDS
    assert read_einvoice_xml(iso, "x.xml").invoice.invoice_date == dt.date(2025, 3, 1)


# --- samples for the e-invoice path (bare XML, ZUGFeRD 1.0, credit notes) ----------------------


@pytest.mark.parametrize("kind", SAMPLE_KINDS)
@pytest.mark.parametrize("seed", [3, 44])
def test_einvoice_samples_are_read_exactly(kind: SampleKind, seed: int) -> None:
    name, body, truth = einvoice_sample(seed, kind)
    if name.endswith(".pdf"):
        extraction = read_embedded(body).extraction
        assert extraction is not None
        assert extract_invoice(parse_pdf(body).text).total == truth.total  # visible twin
    else:
        extraction = read_einvoice_xml(body, name)
        assert extraction.notes == ()
    document_type = truth.document_type
    assert as_generated(extraction.invoice) == truth.model_copy(update={"document_type": None})
    assert extraction.invoice.document_type == document_type
    if "zugferd-1" in kind:
        assert extraction.einvoice_format == "zugferd-1"
        assert b"urn:ferd:CrossIndustryDocument:invoice:1p0" in (
            body if name.endswith(".xml") else embedded_xml_files(body)[0].data
        )


def test_element_flood_is_refused_quickly() -> None:
    flood = b"<r>" + b"<a/>" * 2_000_000 + b"</r>"  # 8 MB, under the byte bound
    assert len(flood) < MAX_XML_BYTES
    start = time.perf_counter()
    with pytest.raises(EInvoiceError, match="more than 200000 elements") as caught:
        read_einvoice_xml(flood, "flood.xml")
    assert caught.value.kind == "too_large"
    assert time.perf_counter() - start < 5  # ~0.8 s; building the whole tree took 16 s


def test_producer_slips_that_do_not_change_a_value_are_tolerated() -> None:
    xml, truth = generated_xml("xrechnung-ubl")
    no_code = xml.replace(b"<cbc:DocumentCurrencyCode>GBP</cbc:DocumentCurrencyCode>", b"")
    assert no_code != xml and truth.currency == "GBP"
    # The currency is still stated, on every amount.
    assert read_einvoice_xml(no_code, "x.xml").invoice.currency == "GBP"
    assert read_einvoice_xml(b"\r\n  " + xml, "x.xml").invoice.total == truth.total
    assert read_einvoice_xml(b"\xef\xbb\xbf\n" + xml, "x.xml").invoice.total == truth.total


def test_a_megabyte_invoice_number_is_refused() -> None:
    xml, truth = generated_xml("xrechnung-ubl")
    assert truth.invoice_number is not None
    huge = xml.replace(truth.invoice_number.encode(), b"9" * 1_000_000, 1)
    with pytest.raises(EInvoiceError, match="invoice_number is 1000000 characters") as caught:
        read_einvoice_xml(huge, "x.xml")
    assert caught.value.kind == "einvoice_invalid"


@pytest.mark.parametrize(
    ("price", "basis", "unit"),
    [
        (b"12.00", b"100", Decimal("0.12")),
        (b"0.123456789012", b"1", None),  # more places than the schema keeps
        (b"10.00", b"3", None),  # 3.333... per unit is not exact
        (b"5.00", b"0", None),
    ],
)
def test_unit_price_is_exact_or_left_out(price: bytes, basis: bytes, unit: Decimal | None) -> None:
    xml = CII_WITH_NEW_FIELDS.replace(
        b"<ram:ChargeAmount>1.00<", b"<ram:ChargeAmount>" + price + b"<"
    )
    xml = xml.replace(b"<ram:BasisQuantity>0.01<", b"<ram:BasisQuantity>" + basis + b"<")
    (line,) = read_einvoice_xml(xml, "x.xml").invoice.line_items
    assert (line.unit_price, line.amount) == (unit, Decimal("200.00"))
