"""Standard-conformant and hostile variations of the e-invoices the readers accept.

Each variation is derived from a generated e-invoice by editing its XML, as a supplier
whose software writes slightly different XML (or a hostile one) would.
"""

from __future__ import annotations

import io
from decimal import Decimal

import pytest
from pypdf import PdfReader, PdfWriter
from pypdf.generic import ArrayObject, DictionaryObject, NameObject, NullObject, PdfObject
from test_einvoice import generated_xml

from invoiceflow.einvoice_samples import with_attachment
from invoiceflow.extractors.einvoice import (
    EInvoiceError,
    embedded_xml_files,
    read_einvoice_xml,
    read_embedded,
)
from invoiceflow.samples import generate_invoice
from invoiceflow.validate import validate_extraction


def _replace_text(xml: bytes, start_tag: bytes, value: bytes) -> bytes:
    """The first element opened by ``start_tag`` (attributes included) with a new text."""
    start = xml.index(start_tag) + len(start_tag)
    end = xml.index(b"<", start)
    return xml[:start] + value + xml[end:]


@pytest.mark.parametrize("value", [b"1E+40", b"1" * 40 + b".00", b"1E+999999"])
@pytest.mark.parametrize(
    ("flavor", "tag"),
    [
        ("factur-x", b"<ram:GrandTotalAmount>"),
        ("factur-x", b"<ram:LineTotalAmount>"),
        ("xrechnung-ubl", b'<cbc:PayableAmount currencyID="GBP">'),
    ],
)
def test_an_amount_past_any_precision_is_refused_not_a_crash(
    flavor: str, tag: bytes, value: bytes
) -> None:
    xml, _ = generated_xml(flavor)
    with pytest.raises(EInvoiceError, match="is not an amount") as caught:
        read_einvoice_xml(_replace_text(xml, tag, value), "x.xml")
    assert caught.value.kind == "einvoice_invalid"


def test_a_price_basis_too_small_to_divide_by_leaves_the_unit_price_out() -> None:
    xml, truth = generated_xml("factur-x")
    price = b"<ram:ChargeAmount>275.00</ram:ChargeAmount>"
    tiny = xml.replace(price, price + b"<ram:BasisQuantity>1E-999999</ram:BasisQuantity>", 1)
    assert tiny != xml
    invoice = read_einvoice_xml(tiny, "x.xml").invoice
    assert invoice.line_items[0].unit_price is None
    assert invoice.line_items[0].amount == Decimal("275.00") == truth.line_items[0].amount


def test_a_quantity_too_large_to_multiply_is_flagged_not_a_crash() -> None:
    xml, _ = generated_xml("factur-x")
    huge = _replace_text(xml, b'<ram:BilledQuantity unitCode="C62">', b"1E+999999")
    extraction = read_einvoice_xml(huge, "x.xml")
    assert extraction.invoice.line_items[0].quantity == Decimal("1E+999999")
    reasons = validate_extraction(extraction, "").reasons
    assert reasons == ("line 1: 1E+999999 x 275.00 cannot be computed",)


def _attached_only_via_af(pdf: bytes, name: str, data: bytes) -> bytes:
    """The PDF with ``data`` associated to the document (PDF/A-3 ``/AF``) but not
    listed in the EmbeddedFiles name tree."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.add_attachment(name, data)
    catalog = writer.root_object
    spec = catalog["/Names"]["/EmbeddedFiles"]["/Names"][1]
    catalog[NameObject("/AF")] = ArrayObject([spec])
    del catalog["/Names"]
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@pytest.mark.parametrize("name", ["factur-x.xml", "rechnung-4711.xml"])
def test_an_attachment_reachable_only_via_af_is_read(name: str) -> None:
    xml, truth = generated_xml("factur-x", seed=8)
    pdf, _ = generate_invoice(8)
    hybrid = _attached_only_via_af(pdf, name, xml)
    assert "/EmbeddedFiles" not in str(PdfReader(io.BytesIO(hybrid)).trailer["/Root"])
    assert [f.name for f in embedded_xml_files(hybrid)] == [name]
    extraction = read_embedded(hybrid).extraction
    assert extraction is not None and extraction.invoice.total == truth.total


def test_an_attachment_in_both_the_name_tree_and_af_is_read_once() -> None:
    xml, _ = generated_xml("factur-x", seed=8)
    pdf, _ = generate_invoice(8)
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.add_attachment("factur-x.xml", xml)
    catalog = writer.root_object
    catalog[NameObject("/AF")] = ArrayObject([catalog["/Names"]["/EmbeddedFiles"]["/Names"][1]])
    out = io.BytesIO()
    writer.write(out)
    assert [f.name for f in embedded_xml_files(out.getvalue())] == ["factur-x.xml"]


def test_an_unknown_declared_encoding_is_refused_not_a_crash() -> None:
    xml, _ = generated_xml("factur-x", seed=8)
    declaration = b"<?xml version='1.0' encoding='utf-8'?>"
    assert xml.startswith(declaration)
    bogus = xml.replace(declaration, b'<?xml version="1.0" encoding="no-such-charset"?>', 1)
    with pytest.raises(EInvoiceError, match="not well-formed XML") as caught:
        read_einvoice_xml(bogus, "x.xml")
    assert caught.value.kind == "einvoice_invalid"
    # Embedded, the PDF's text is read instead, with the reason.
    pdf, _ = generate_invoice(8)
    read = read_embedded(with_attachment(pdf, "factur-x.xml", bogus))
    assert read.extraction is None and "no-such-charset" in read.notes[0]


@pytest.mark.parametrize("predictor", [NameObject("/Foo"), NullObject()])
def test_a_predictor_that_is_not_a_number_falls_back_to_the_text(predictor: PdfObject) -> None:
    xml, _ = generated_xml("factur-x", seed=8)
    pdf, _ = generate_invoice(8)
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.add_attachment("factur-x.xml", xml)
    spec = writer.root_object["/Names"]["/EmbeddedFiles"]["/Names"][1].get_object()
    stream = spec["/EF"]["/F"].get_object()
    stream[NameObject("/DecodeParms")] = DictionaryObject({NameObject("/Predictor"): predictor})
    out = io.BytesIO()
    writer.write(out)
    read = read_embedded(out.getvalue())
    assert read.extraction is None
    assert len(read.notes) == 1 and "parameters we do not decode" in read.notes[0]


MEGABYTE = b"9" * 1_000_000


@pytest.mark.parametrize(
    ("tag", "value"),
    [
        pytest.param(b'<ram:BilledQuantity unitCode="C62">', MEGABYTE, id="quantity"),
        pytest.param(b"<ram:GrandTotalAmount>", MEGABYTE, id="grand-total"),
        pytest.param(b"<ram:GrandTotalAmount>", b"x" * 1_000_000, id="not-a-number"),
        pytest.param(b'<udt:DateTimeString format="102">', MEGABYTE, id="issue-date"),
        pytest.param(b"<ram:InvoiceCurrencyCode>", b"E" * 1_000_000, id="currency"),
    ],
)
def test_a_megabyte_value_is_refused_in_a_short_message(tag: bytes, value: bytes) -> None:
    """Refusals become failure reasons in the manifest and every table: a megabyte
    "quantity" must not travel there, neither as a value nor inside the message."""
    xml, _ = generated_xml("factur-x")
    with pytest.raises(EInvoiceError) as caught:
        read_einvoice_xml(_replace_text(xml, tag, value), "x.xml")
    assert caught.value.kind == "einvoice_invalid"
    assert len(str(caught.value)) < 300, str(caught.value)[:300]


def test_a_megabyte_optional_date_is_left_out_with_a_short_note() -> None:
    xml, _ = generated_xml("xrechnung-ubl")
    due = b"<cbc:DueDate>" + MEGABYTE + b"</cbc:DueDate>"
    long_due = xml.replace(b"<cbc:InvoiceTypeCode>", due + b"<cbc:InvoiceTypeCode>", 1)
    extraction = read_einvoice_xml(long_due, "x.xml")
    assert extraction.invoice.due_date is None
    assert len(extraction.notes) == 1 and len(extraction.notes[0]) < 300


@pytest.mark.parametrize(
    "xml",
    [
        pytest.param(b"<" + b"a" * 1_000_000 + b"/>", id="name"),
        pytest.param(b'<r xmlns="urn:' + b"u" * 1_000_000 + b'"/>', id="namespace"),
    ],
)
def test_a_megabyte_root_element_is_named_in_a_short_message(xml: bytes) -> None:
    with pytest.raises(EInvoiceError, match="is not an e-invoice") as caught:
        read_einvoice_xml(xml, "x.xml")
    assert caught.value.kind == "unsupported_document"
    assert len(str(caught.value)) < 400


def test_a_megabyte_attachment_name_gives_a_short_note() -> None:
    pdf, _ = generate_invoice(8)
    name = "x" * 1_000_000 + ".xml"
    read = read_embedded(with_attachment(pdf, name, b"<not-closed"))
    assert read.extraction is None
    assert len(read.notes) == 1 and "not well-formed" in read.notes[0]
    assert len(read.notes[0]) < 600
    (embedded,) = embedded_xml_files(with_attachment(pdf, name, b"<r/>"))
    assert embedded.name.endswith("xxx.xml") and len(embedded.name) < 300


def test_a_long_filter_chain_gives_a_short_note() -> None:
    pdf, _ = generate_invoice(8)
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.add_attachment("factur-x.xml", b"<r/>")
    spec = writer.root_object["/Names"]["/EmbeddedFiles"]["/Names"][1].get_object()
    stream = spec["/EF"]["/F"].get_object()
    stream[NameObject("/Filter")] = ArrayObject([NameObject("/ASCIIHexDecode")] * 100_000)
    out = io.BytesIO()
    writer.write(out)
    read = read_embedded(out.getvalue())
    assert len(read.notes) == 1 and "parameters we do not decode" in read.notes[0]
    assert len(read.notes[0]) < 300
