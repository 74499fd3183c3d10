"""Every real e-invoice in the development corpus, and how it is classified.

The corpus (Mustang project test resources, Apache-2.0) lives outside the repository
in ``../shared/dev-corpus/`` next to the checkout (``/work/shared/dev-corpus`` as a
fallback, for a clone elsewhere). It is not the set the project is scored on: the
readers are built for the formats, and this file only pins down what they do here.

Outcomes:
* READ: the XML is read exactly (bare file, or a PDF's attachment), no review note.
* REVIEW: a bare XML read as stated but disagreeing with its own totals; the notes
  make the invoice ``needs_review`` (there is no visible text to fall back to).
* NO_EINVOICE: a PDF without an e-invoice attachment; the text path reads it.
* a refusal kind (``unsupported_document``, ``einvoice_invalid``): a permanent failure.

Header fields of everything read are compared with values looked up in the XML by a
tiny independent XPath table here, not by the reader.
"""

from __future__ import annotations

import datetime as dt
import io
from decimal import Decimal
from pathlib import Path
from typing import Final
from xml.etree import ElementTree

import pytest
from pypdf import PdfReader

from invoiceflow.extractors import Extraction
from invoiceflow.extractors.einvoice import EInvoiceError, read_einvoice_xml, read_embedded
from invoiceflow.validate import validate_extraction


def _corpus_dir() -> Path | None:
    repo = Path(__file__).resolve().parents[1]
    for candidate in (repo.parent / "shared" / "dev-corpus", Path("/work/shared/dev-corpus")):
        if (candidate / "mustang").is_dir():
            return candidate / "mustang"
    return None


CORPUS: Final = _corpus_dir()
pytestmark = pytest.mark.skipif(CORPUS is None, reason="../shared/dev-corpus is not there")

READ, REVIEW, NO_EINVOICE = "read", "review", "no_einvoice"
UNSUPPORTED, INVALID = "unsupported_document", "einvoice_invalid"

# File -> outcome. Files named invalid*/corrupt* that are READ break schema or code-list
# rules that do not touch a value we read (element order, an extra tag, a missing
# contact, 4-decimal line amounts); the values they state are what we report, and
# `validate` flags their arithmetic where it is off (see test_invalid_files_...).
EXPECTED: Final[dict[str, str]] = {
    "Mustang-CLI__EmptyPDFA1.pdf": NO_EINVOICE,
    "Mustang-CLI__corrupt-factur-x-waytoosmall.pdf": NO_EINVOICE,  # 15 bytes, no PDF
    "library__MustangBeispiel20221026.pdf": READ,
    "library__MustangGnuaccountingBeispielRE-20170509_505PDF14.pdf": NO_EINVOICE,
    "library__MustangGnuaccountingBeispielRE-20170509_505PDFA3.pdf": NO_EINVOICE,
    "library__MustangGnuaccountingBeispielRE-20170509_505blanko.pdf": NO_EINVOICE,
    "library__MustangGnuaccountingBeispielRE-20171118_506blanko.pdf": NO_EINVOICE,
    "library__MustangGnuaccountingBeispielRE-20190610_507blanko.pdf": NO_EINVOICE,
    "library__MustangGnuaccountingBeispielRE-20201121_508blanko.pdf": NO_EINVOICE,
    "library__MustangGnuaccountingBeispielRE-20201121_508blankoA3.pdf": NO_EINVOICE,
    "library__ORDER-X_EX01_ORDER_FULL_DATA-COMFORT.pdf": UNSUPPORTED,  # an order
    "library__ORDER-X_EX01_ORDER_FULL_DATA-COMFORTorder-x.xml": UNSUPPORTED,
    "library__TESTXRECHNUNG_INVDSS_012015776085.XML": READ,
    "library__XRechnung_internalRecalcBug.xml": READ,
    "library__ZTESTZUGFERD_1_INVDSS_012015738820PDF-1.pdf": READ,
    "library__cii__01.01a-INVOICE.cii.xml": READ,
    "library__cii__02.03a-INVOICE_uncefact.xml": READ,
    "library__cii__UC11_F202600022_EXTENDED_FX_CII_BT-X-589Only_on_GROUP_Line.xml": READ,
    "library__cii__lastschrift_iban_bug.xml": READ,
    "library__factur-x_invoicingPeriod.xml": READ,
    "library__line-total-4-decimals.xml": READ,
    "library__migration__input__ZUGFeRD1-invoice-adjusted.xml": READ,  # ZUGFeRD 1.0
    "library__migration__reference__ZUGFeRD2-invoice-adjusted.xml": READ,
    "library__multiple-payment-means.cii.xml": READ,
    "library__subinvoicelines__Extended_Fallschutz-Set_SubInvoiceLine_Bsp5.xml": READ,
    "library__subinvoicelines__Extended_SubInvoiceLines_Hardware_Bsp2.xml": READ,
    "library__subinvoicelines__Extended___SubInvoiceLines_Buero_Material_Bsp3__.xml": READ,
    "library__subinvoicelines__Extended___SubInvoiceLines_Kaffee_Bundle_Set_Bsp4__.xml": READ,
    "library__subinvoicelines__ZUGFeRD_Extended__Abschlagsrechnung_SubInvoiceLine_u_LV_Nr_.xml": (
        READ
    ),
    # Its top-level lines sum to 1449.00 but it states a line total of 1500.00.
    "library__subinvoicelines__invalidSubInvoiceLineHierarchy.xml": REVIEW,
    "library__testContractReferencedDocument.xml": READ,
    "library__test_invoice_contract.xml": READ,
    "library__test_invoice_note.xml": READ,
    "library__testout-XR-Edge.ubl.xml": READ,
    "library__testout-ZF2PushAllowances.ubl.xml": READ,
    "library__testout-ZF2PushEdge.ubl.xml": READ,
    "library__testout-ZF2PushItemChargesAllowances.ubl.xml": READ,
    "library__ubl-creditnote.xml": READ,
    "library__ubl-selfbilled-01.20a-INVOICE_ubl.xml": READ,
    "library__ubl__01.01a-INVOICE.ubl.xml": READ,
    "library__ubl__04.01a-INVOICE_ubl.xml": READ,
    "library__ubl__UBL-CreditNote-2.1-Example.ubl.xml": READ,
    "library__ubl__periods.ubl.xml": READ,
    "library__veraPDFtestsuite6-7-11-t01-fail-a.pdf": NO_EINVOICE,
    "library__zugferd_invoice.pdf": READ,  # ZUGFeRD 1.0 embedded
    "validator__01.01a-INVOICE_ubl.xml": READ,
    "validator__01.01a-INVOICE_uncefact.xml": READ,
    "validator__103767-Invoice-2026-03-24-1.pdf": READ,
    "validator__CII_XRechnung_with_Peppol_violation.xml": READ,
    "validator__Facture_F20180027.pdf": READ,
    "validator__ORDER-X_EX01_ORDER_FULL_DATA-COMFORT.pdf": UNSUPPORTED,
    "validator__UC10_F202600004_EXTENDED_FX_CII_Commentee.xml": READ,
    "validator__X03_01_Abschlagsrechnung_SubInvoiceLine_u_LV_Nr.xml": READ,
    "validator__XMLinvalidV2PDF.pdf": READ,  # schema-invalid XML, values consistent
    "validator__XRechnung_internalRecalcBug.xml": READ,
    "validator__ZUGFeRD-invoice_rabatte_3_abschlag_duepayableamount.xml": READ,
    "validator__ZUGFeRD-invoice_rabatte_4_abschlag_taxbasistotalamount.xml": READ,
    # Its catalog /Names points at the wrong object; both attachments are still listed
    # in /AF and say what the visible text says (RE-20171118/506, 571.04 EUR).
    "validator__corruptedV2PDF.pdf": READ,
    "validator__invalidArithmetics.xml": READ,  # 2 x 160 = 160: validate flags the line
    "validator__invalidSubInvoiceLineHierarchy.xml": REVIEW,
    "validator__invalidV1.xml": INVALID,  # misspelt HederExchangedDocument: no number/date
    "validator__invalidV1ExtraTags.xml": READ,  # an empty FooterExchangedDocument
    "validator__invalidV1TooMinimal.xml": INVALID,  # no header at all
    "validator__invalidV2.xml": REVIEW,  # tax basis + tax != grand total
    "validator__invalidV2Root.xml": UNSUPPORTED,  # root <rsm:myinvoice>
    "validator__invalidXMP-ParseError.pdf": READ,  # broken XMP metadata, XML fine
    "validator__invalidXMP.pdf": READ,
    "validator__invalidXRSchemav2.xml": READ,  # IssueDateTime out of schema order
    "validator__invalidXRV30.xml": READ,  # no business process, a line left out
    "validator__invalidXRV30_BR-DEC-23.xml": READ,  # a 4-decimal line amount
    "validator__invalidXRv2.xml": READ,  # no buyer contact
    "validator__roundingDifferenceIsInTolerance.xml": READ,
    "validator__validV1.xml": READ,
    "validator__validV2.xml": READ,
    "validator__validV2FR.xml": READ,
    "validator__validV2PDF.pdf": READ,
    "validator__validXRV23.xml": READ,
    "validator__validXRV30.xml": READ,
    "validator__validXRv2.xml": READ,
    "validator__validZREtestZugferd.xml": READ,
    "validator__valid_with_VAT_O.xml": READ,
    "validator__xrechnung-ubl.xml": READ,
}


def corpus_files() -> list[str]:
    if CORPUS is None:
        return []
    return sorted(p.name for p in CORPUS.iterdir() if p.suffix.lower() in (".pdf", ".xml"))


def read(name: str) -> tuple[str, Extraction | None, str]:
    """(outcome, extraction, refusal message) of one corpus file."""
    assert CORPUS is not None
    data = (CORPUS / name).read_bytes()
    try:
        if name.lower().endswith(".pdf"):
            embedded = read_embedded(data)
            assert embedded.extraction is not None or not embedded.notes, embedded.notes
            return (READ if embedded.extraction else NO_EINVOICE), embedded.extraction, ""
        extraction = read_einvoice_xml(data, name)
        return (REVIEW if extraction.notes else READ), extraction, ""
    except EInvoiceError as exc:
        return exc.kind, None, str(exc)


def test_every_corpus_file_has_an_expected_outcome() -> None:
    assert corpus_files() == sorted(EXPECTED)


@pytest.mark.parametrize("name", corpus_files())
def test_corpus_file_is_classified(name: str) -> None:
    outcome, extraction, message = read(name)
    assert outcome == EXPECTED[name], message
    if outcome == UNSUPPORTED:
        assert "root element" in message or "is an Order-X order" in message
    if outcome == REVIEW:
        assert extraction is not None
        assert validate_extraction(extraction, "").needs_review


@pytest.mark.parametrize("name", [n for n in corpus_files() if EXPECTED.get(n) in (READ, REVIEW)])
def test_header_fields_equal_the_xml(name: str) -> None:
    _, extraction, _ = read(name)
    assert extraction is not None
    assert CORPUS is not None
    expected = header_from_xml(xml_of(CORPUS / name))
    invoice = extraction.invoice
    got = (
        invoice.invoice_number,
        invoice.invoice_date,
        invoice.currency,
        invoice.total,
        invoice.document_type,
    )
    assert got == expected
    assert extraction.source == "einvoice"


@pytest.mark.parametrize("name", [n for n in corpus_files() if "rabatte" in n])
def test_document_level_allowances_do_not_flag_a_consistent_einvoice(name: str) -> None:
    """Lines sum to more than the net total when the XML grants a discount on the whole
    invoice; the reader checks that with the allowances (BR-CO-10/13), so the plain
    lines-vs-subtotal check must not flag it."""
    outcome, extraction, _ = read(name)
    assert outcome == READ and extraction is not None
    reasons = validate_extraction(extraction, "").reasons
    assert not [r for r in reasons if r.startswith("line items")], reasons


def test_invalid_files_never_pass_unnoticed_where_their_values_disagree() -> None:
    """Every invalid*/corrupt* file is refused, falls back, or is flagged, unless the
    table above says which schema rule it breaks without touching a value we read."""
    flagged = {}
    for name in corpus_files():
        short = name.split("__")[-1]
        if not short.startswith(("invalid", "corrupt", "XMLinvalid")):
            continue
        outcome, extraction, _ = read(name)
        reviewed = extraction is not None and validate_extraction(extraction, "").needs_review
        flagged[short] = outcome if outcome != READ else ("review" if reviewed else READ)
    assert flagged["invalidArithmetics.xml"] == "review"
    assert flagged["invalidV2.xml"] == "review"
    assert flagged["invalidSubInvoiceLineHierarchy.xml"] == "review"
    assert flagged["invalidV2Root.xml"] == UNSUPPORTED
    assert flagged["invalidV1.xml"] == flagged["invalidV1TooMinimal.xml"] == INVALID


# --- the independent lookup -------------------------------------------------------------------

NS: Final = {
    "rsm": "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100",
    "ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100",
    "udt": "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100",
    "f1": "urn:ferd:CrossIndustryDocument:invoice:1p0",
    "ram12": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:12",
    "udt15": "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:15",
    "inv": "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2",
    "cn": "urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2",
    "cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2",
    "cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2",
}
_CII_SUM = "rsm:SupplyChainTradeTransaction/ram:ApplicableHeaderTradeSettlement"
_F1_SUM = "f1:SpecifiedSupplyChainTradeTransaction/ram12:ApplicableSupplyChainTradeSettlement"
# root tag -> (number, issue date, currency, grand total, type code)
HEADER_PATHS: Final = {
    f"{{{NS['rsm']}}}CrossIndustryInvoice": (
        "rsm:ExchangedDocument/ram:ID",
        "rsm:ExchangedDocument/ram:IssueDateTime/udt:DateTimeString",
        f"{_CII_SUM}/ram:InvoiceCurrencyCode",
        f"{_CII_SUM}/ram:SpecifiedTradeSettlementHeaderMonetarySummation/ram:GrandTotalAmount",
        "rsm:ExchangedDocument/ram:TypeCode",
    ),
    f"{{{NS['f1']}}}CrossIndustryDocument": (
        "f1:HeaderExchangedDocument/ram12:ID",
        "f1:HeaderExchangedDocument/ram12:IssueDateTime/udt15:DateTimeString",
        f"{_F1_SUM}/ram12:InvoiceCurrencyCode",
        f"{_F1_SUM}/ram12:SpecifiedTradeSettlementMonetarySummation/ram12:GrandTotalAmount",
        "f1:HeaderExchangedDocument/ram12:TypeCode",
    ),
    f"{{{NS['inv']}}}Invoice": (
        "cbc:ID",
        "cbc:IssueDate",
        "cbc:DocumentCurrencyCode",
        "cac:LegalMonetaryTotal/cbc:TaxInclusiveAmount",
        "cbc:InvoiceTypeCode",
    ),
    f"{{{NS['cn']}}}CreditNote": (
        "cbc:ID",
        "cbc:IssueDate",
        "cbc:DocumentCurrencyCode",
        "cac:LegalMonetaryTotal/cbc:TaxInclusiveAmount",
        "cbc:CreditNoteTypeCode",
    ),
}
_STANDARD_NAMES: Final = ("factur-x.xml", "zugferd-invoice.xml", "xrechnung.xml")


def xml_of(path: Path) -> bytes:
    if path.suffix.lower() == ".xml":
        return path.read_bytes()
    reader = PdfReader(io.BytesIO(path.read_bytes()))  # trusted corpus
    attachments = {name: data[0] for name, data in reader.attachments.items()}
    for spec in reader.trailer["/Root"].get("/AF", []):  # files listed only in /AF
        spec = spec.get_object()
        attachments.setdefault(spec["/F"], spec["/EF"]["/F"].get_object().get_data())
    names = sorted(attachments, key=lambda n: n.lower() not in _STANDARD_NAMES)
    return attachments[names[0]]


def header_from_xml(xml: bytes) -> tuple[object, ...]:
    root = ElementTree.fromstring(xml)
    number, date, currency, total, type_code = (
        (root.findtext(path, namespaces=NS) or "").strip() for path in HEADER_PATHS[root.tag]
    )
    credit = root.tag.endswith("}CreditNote") or type_code == "381"
    issued = (
        dt.datetime.strptime(date, "%Y%m%d").date()
        if date.isdigit()
        else dt.date.fromisoformat(date[:10])
    )
    return (
        number,
        issued,
        currency,
        Decimal(total),
        "credit_note" if credit else "invoice",
    )
