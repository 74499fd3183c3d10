"""E-invoice samples `samples.py` does not make: bare XML, ZUGFeRD 1.0, UBL credit notes.

Built from the generator's own e-invoices (`samples.generate_invoice`), so the truth
is the generator's: a bare XRechnung/Factur-X file is the attachment itself; ZUGFeRD
1.0 is the CII renamed to the 2014 element names and namespaces (the business terms
are the same); a UBL credit note is the UBL invoice under the CreditNote root with
type code 381 (EN 16931 keeps a credit note's amounts positive).

For tests and demos of the e-invoice path (`pytest -m documents`, `invoiceflow
extract FILE.xml`).

Imports nothing from Prefect.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from typing import Final, Literal, get_args

from pypdf import PdfReader, PdfWriter

from invoiceflow.samples import EInvoiceFlavor, generate_invoice
from invoiceflow.schema import Invoice

SampleKind = Literal[
    "xrechnung-ubl.xml",
    "xrechnung-cii.xml",
    "factur-x.xml",
    "ubl-credit-note.xml",
    "zugferd-1.xml",
    "zugferd-1.pdf",
]
SAMPLE_KINDS: Final[tuple[SampleKind, ...]] = get_args(SampleKind)
_BASE: Final[dict[SampleKind, EInvoiceFlavor]] = {
    "xrechnung-ubl.xml": "xrechnung-ubl",
    "xrechnung-cii.xml": "xrechnung-cii",
    "factur-x.xml": "factur-x",
    "ubl-credit-note.xml": "xrechnung-ubl",
    "zugferd-1.xml": "factur-x",
    "zugferd-1.pdf": "factur-x",
}

_D16B: Final = {
    "rsm": "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100",
    "ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100",
    "udt": "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100",
}
_ZF1: Final = {
    "rsm": "urn:ferd:CrossIndustryDocument:invoice:1p0",
    "ram": "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:12",
    "udt": "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:15",
}
# CII D16B local name -> ZUGFeRD 1.0 local name (everything else keeps its name).
_ZF1_NAMES: Final = {
    "CrossIndustryInvoice": "CrossIndustryDocument",
    "ExchangedDocumentContext": "SpecifiedExchangedDocumentContext",
    "ExchangedDocument": "HeaderExchangedDocument",
    "SupplyChainTradeTransaction": "SpecifiedSupplyChainTradeTransaction",
    "ApplicableHeaderTradeAgreement": "ApplicableSupplyChainTradeAgreement",
    "ApplicableHeaderTradeDelivery": "ApplicableSupplyChainTradeDelivery",
    "ApplicableHeaderTradeSettlement": "ApplicableSupplyChainTradeSettlement",
    "SpecifiedTradeSettlementHeaderMonetarySummation": "SpecifiedTradeSettlementMonetarySummation",
    "SpecifiedLineTradeAgreement": "SpecifiedSupplyChainTradeAgreement",
    "SpecifiedLineTradeDelivery": "SpecifiedSupplyChainTradeDelivery",
    "SpecifiedLineTradeSettlement": "SpecifiedSupplyChainTradeSettlement",
    "SpecifiedTradeSettlementLineMonetarySummation": "SpecifiedTradeSettlementMonetarySummation",
    "RateApplicablePercent": "ApplicablePercent",
    "IssuerAssignedID": "ID",
}
_UBL_INVOICE: Final = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
_UBL_CREDIT_NOTE: Final = "urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2"
_CREDIT_NOTE_NAMES: Final = {
    "InvoiceTypeCode": "CreditNoteTypeCode",
    "InvoiceLine": "CreditNoteLine",
    "InvoicedQuantity": "CreditedQuantity",
}


def einvoice_sample(seed: int, kind: SampleKind) -> tuple[str, bytes, Invoice]:
    """(file name, body, truth) of one sample; truth states the header and the lines.

    The reader also fills addresses and the VAT breakdown the XML carries, which the
    generator's truth leaves empty: compare the fields the truth states.
    """
    pdf, truth = generate_invoice(seed, einvoice=_BASE[kind])
    xml = _attachment(pdf)
    stem = f"einvoice-{seed:04d}-{kind}"
    if kind == "ubl-credit-note.xml":
        return (
            stem,
            to_ubl_credit_note(xml),
            truth.model_copy(update={"document_type": "credit_note"}),
        )
    truth = truth.model_copy(update={"document_type": "invoice"})
    if kind == "zugferd-1.xml":
        return stem, to_zugferd1(xml), truth
    if kind == "zugferd-1.pdf":
        plain, _ = generate_invoice(seed)
        return stem, with_attachment(plain, "ZUGFeRD-invoice.xml", to_zugferd1(xml)), truth
    return stem, xml, truth


def to_zugferd1(cii: bytes) -> bytes:
    """A CII D16B invoice as ZUGFeRD 1.0 (``urn:ferd:CrossIndustryDocument:invoice:1p0``)."""
    root = ET.fromstring(cii)  # our own generator's output, not untrusted input
    namespaces = {uri: prefix for prefix, uri in _D16B.items()}
    for element in root.iter():
        uri, _, local = element.tag[1:].partition("}")
        prefix = namespaces.get(uri)
        if prefix is not None:
            element.tag = f"{{{_ZF1[prefix]}}}{_ZF1_NAMES.get(local, local)}"
    guideline = root.find(
        f"{{{_ZF1['rsm']}}}SpecifiedExchangedDocumentContext/"
        f"{{{_ZF1['ram']}}}GuidelineSpecifiedDocumentContextParameter/{{{_ZF1['ram']}}}ID"
    )
    if guideline is not None:
        guideline.text = "urn:ferd:CrossIndustryDocument:invoice:1p0:comfort"
    return _dump(root, _ZF1)


def to_ubl_credit_note(ubl_invoice: bytes) -> bytes:
    """A UBL 2.1 Invoice as a CreditNote (type 381), amounts unchanged."""
    root = ET.fromstring(ubl_invoice)  # our own generator's output
    for element in root.iter():
        uri, _, local = element.tag[1:].partition("}")
        if uri == _UBL_INVOICE:
            uri = _UBL_CREDIT_NOTE
        local = "CreditNote" if element is root else _CREDIT_NOTE_NAMES.get(local, local)
        element.tag = f"{{{uri}}}{local}"
        if local == "CreditNoteTypeCode":
            element.text = "381"
    namespaces = {
        "": _UBL_CREDIT_NOTE,
        "cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2",
        "cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2",
    }
    return _dump(root, namespaces)


def with_attachment(pdf: bytes, name: str, data: bytes) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.add_attachment(name, data)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _attachment(pdf: bytes) -> bytes:
    attachments = PdfReader(io.BytesIO(pdf)).attachments  # our own generator's PDF
    (name,) = attachments
    return attachments[name][0]


def _dump(root: ET.Element, namespaces: dict[str, str]) -> bytes:
    for prefix, uri in namespaces.items():
        ET.register_namespace(prefix, uri)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
