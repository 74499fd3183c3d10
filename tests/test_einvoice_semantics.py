"""Each field is read from the EN 16931 business term it means, in every syntax.

Each case edits a generated e-invoice's XML the way a conformant producer may write it,
and checks the value against what the standard (or its syntax binding) says it is.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from test_einvoice import generated_xml

from invoiceflow.extractors.einvoice import read_einvoice_xml

UBL_ORDER = b"<cac:OrderReference><cbc:ID>PO-28296</cbc:ID></cac:OrderReference>"
CII_ORDER = (
    b"<ram:BuyerOrderReferencedDocument><ram:IssuerAssignedID>PO-28296</ram:IssuerAssignedID>"
    b"</ram:BuyerOrderReferencedDocument>"
)


def _edited(flavor: str, old: bytes, new: bytes) -> bytes:
    xml, _ = generated_xml(flavor)
    edited = xml.replace(old, new, 1)
    assert edited != xml, f"{old!r} not in the generated {flavor} XML"
    return edited


@pytest.mark.parametrize("placeholder", [b"NA", b"N/A", b"n/a"])
@pytest.mark.parametrize(
    ("flavor", "order", "placeholder_order"),
    [
        pytest.param(
            "xrechnung-ubl",
            UBL_ORDER,
            b"<cac:OrderReference><cbc:ID>%s</cbc:ID>"
            b"<cbc:SalesOrderID>SO-4711</cbc:SalesOrderID></cac:OrderReference>",
            id="ubl",
        ),
        pytest.param(
            "factur-x",
            CII_ORDER,
            b"<ram:BuyerOrderReferencedDocument><ram:IssuerAssignedID>%s</ram:IssuerAssignedID>"
            b"</ram:BuyerOrderReferencedDocument>",
            id="cii",
        ),
    ],
)
def test_a_purchase_order_placeholder_is_no_purchase_order(
    flavor: str, order: bytes, placeholder_order: bytes, placeholder: bytes
) -> None:
    """UBL requires cac:OrderReference/cbc:ID, so a document that states only a sales
    order reference (BT-14) writes "NA" there (Peppol BIS 3 sales-order example); a real
    XRechnung producer writes "N/A". Neither is a purchase order reference (BT-13), and
    the sales order reference is not one either."""
    xml = _edited(flavor, order, placeholder_order % placeholder)
    assert read_einvoice_xml(xml, "x.xml").invoice.po_number is None


# --- semantics verified against EN 16931, pinned so they stay that way -----------------------

UBL_SELLER_VAT = (
    b"<cac:PartyTaxScheme><cbc:CompanyID>DE287654321</cbc:CompanyID>"
    b"<cac:TaxScheme><cbc:ID>VAT</cbc:ID></cac:TaxScheme></cac:PartyTaxScheme>"
)
UBL_TAX_NUMBER = (
    b"<cac:PartyTaxScheme><cbc:CompanyID>123/456/78901</cbc:CompanyID>"
    b"<cac:TaxScheme><cbc:ID>FC</cbc:ID></cac:TaxScheme></cac:PartyTaxScheme>"
)
CII_SELLER_VAT = (
    b'<ram:SpecifiedTaxRegistration><ram:ID schemeID="VA">DE287654321</ram:ID>'
    b"</ram:SpecifiedTaxRegistration></ram:SellerTradeParty>"
)
CII_TAX_NUMBER = (
    b'<ram:SpecifiedTaxRegistration><ram:ID schemeID="FC">123/456/78901</ram:ID>'
    b"</ram:SpecifiedTaxRegistration>"
)


@pytest.mark.parametrize(
    ("flavor", "old", "new", "tax_id"),
    [
        pytest.param(
            "xrechnung-ubl",
            UBL_SELLER_VAT,
            UBL_TAX_NUMBER + UBL_SELLER_VAT,
            "DE287654321",
            id="ubl-vat-after-tax-number",
        ),
        pytest.param(
            "xrechnung-ubl",
            UBL_SELLER_VAT,
            UBL_TAX_NUMBER,
            "123/456/78901",
            id="ubl-tax-number-only",
        ),
        pytest.param(
            "factur-x",
            CII_SELLER_VAT,
            CII_TAX_NUMBER + CII_SELLER_VAT,
            "DE287654321",
            id="cii-vat-after-tax-number",
        ),
        pytest.param(
            "factur-x",
            CII_SELLER_VAT,
            CII_TAX_NUMBER + b"</ram:SellerTradeParty>",
            "123/456/78901",
            id="cii-tax-number-only",
        ),
    ],
)
def test_seller_vat_identifier_before_its_tax_number(
    flavor: str, old: bytes, new: bytes, tax_id: str
) -> None:
    """BT-31 (VAT identifier) wins over BT-32 (tax registration number) in any order; a
    seller stating only BT-32 gets that, the same in both syntaxes."""
    xml = _edited(flavor, old, new)
    assert read_einvoice_xml(xml, "x.xml").invoice.vendor_tax_id == tax_id


@pytest.mark.parametrize(
    ("flavor", "old", "new"),
    [
        pytest.param(
            "xrechnung-ubl",
            b"<cac:TaxTotal>",
            b"<cac:TaxRepresentativeParty><cac:PartyName><cbc:Name>Rep Ltd</cbc:Name>"
            b"</cac:PartyName>"
            + UBL_SELLER_VAT.replace(b"DE287654321", b"DE999999999")
            + b"</cac:TaxRepresentativeParty><cac:TaxTotal>",
            id="ubl",
        ),
        pytest.param(
            "factur-x",
            b"</ram:SellerTradeParty>",
            b"</ram:SellerTradeParty><ram:SellerTaxRepresentativeTradeParty><ram:Name>Rep Ltd"
            b'</ram:Name><ram:SpecifiedTaxRegistration><ram:ID schemeID="VA">DE999999999'
            b"</ram:ID></ram:SpecifiedTaxRegistration></ram:SellerTaxRepresentativeTradeParty>",
            id="cii",
        ),
    ],
)
def test_the_seller_tax_representative_is_not_the_seller(
    flavor: str, old: bytes, new: bytes
) -> None:
    """BG-11 (BT-62/BT-63) is the representative's, not the seller's (BT-27/BT-31)."""
    invoice = read_einvoice_xml(_edited(flavor, old, new), "x.xml").invoice
    assert (invoice.vendor_name, invoice.vendor_tax_id) == (
        "Nordlicht Software GmbH",
        "DE287654321",
    )


def test_ubl_seller_name_is_the_legal_name_not_the_trading_name() -> None:
    """BT-27 is PartyLegalEntity/RegistrationName; PartyName/Name is BT-28."""
    old = b"<cac:PartyName><cbc:Name>Nordlicht Software GmbH</cbc:Name></cac:PartyName>"
    xml = _edited(
        "xrechnung-ubl", old, b"<cac:PartyName><cbc:Name>Nordlicht</cbc:Name></cac:PartyName>"
    )
    assert read_einvoice_xml(xml, "x.xml").invoice.vendor_name == "Nordlicht Software GmbH"


@pytest.mark.parametrize(
    ("flavor", "old", "new"),
    [
        pytest.param(
            "xrechnung-ubl",
            b"<cac:TaxTotal>",
            b'<cac:TaxTotal><cbc:TaxAmount currencyID="SEK">123456.00</cbc:TaxAmount>'
            b"</cac:TaxTotal><cac:TaxTotal>",
            id="ubl",
        ),
        pytest.param(
            "factur-x",
            b'<ram:TaxTotalAmount currencyID="GBP">',
            b'<ram:TaxTotalAmount currencyID="SEK">123456.00</ram:TaxTotalAmount>'
            b'<ram:TaxTotalAmount currencyID="GBP">',
            id="cii",
        ),
    ],
)
def test_vat_total_is_the_one_in_the_invoice_currency(flavor: str, old: bytes, new: bytes) -> None:
    """BT-110 is stated in the invoice currency (BT-5); BT-111, in the VAT accounting
    currency (BT-6), may come first."""
    xml = _edited(flavor, old, new)
    invoice = read_einvoice_xml(xml, "x.xml").invoice
    assert (invoice.currency, invoice.tax_total) == ("GBP", Decimal("9169.20"))


@pytest.mark.parametrize(
    ("flavor", "old", "new"),
    [
        pytest.param(
            "xrechnung-ubl",
            UBL_ORDER,
            b"<cbc:BuyerReference>04011000-12345-34</cbc:BuyerReference>"
            b"<cac:OrderReference><cbc:ID>PO-28296</cbc:ID>"
            b"<cbc:SalesOrderID>SO-4711</cbc:SalesOrderID></cac:OrderReference>",
            id="ubl",
        ),
        pytest.param(
            "factur-x",
            CII_ORDER,
            b"<ram:SellerOrderReferencedDocument><ram:IssuerAssignedID>SO-4711"
            b"</ram:IssuerAssignedID></ram:SellerOrderReferencedDocument>" + CII_ORDER,
            id="cii",
        ),
    ],
)
def test_purchase_order_is_neither_the_sales_order_nor_the_buyer_reference(
    flavor: str, old: bytes, new: bytes
) -> None:
    """BT-13, not the sales order reference BT-14 nor the buyer reference BT-10."""
    xml = _edited(flavor, old, new)
    assert read_einvoice_xml(xml, "x.xml").invoice.po_number == "PO-28296"


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("Foretaksregisteret", id="NO-R-002"),
        pytest.param("GODKÄND FÖR F-SKATT", id="SE-R-005"),
    ],
)
@pytest.mark.parametrize(
    ("flavor", "old", "new"),
    [
        pytest.param(
            "xrechnung-ubl",
            UBL_SELLER_VAT,
            "<cac:PartyTaxScheme><cbc:CompanyID>{}</cbc:CompanyID>"
            "<cac:TaxScheme><cbc:ID>TAX</cbc:ID></cac:TaxScheme></cac:PartyTaxScheme>",
            id="ubl",
        ),
        pytest.param(
            "factur-x",
            CII_SELLER_VAT,
            '<ram:SpecifiedTaxRegistration><ram:ID schemeID="FC">{}</ram:ID>'
            "</ram:SpecifiedTaxRegistration></ram:SellerTradeParty>",
            id="cii",
        ),
    ],
)
def test_a_national_statement_in_the_tax_registration_is_no_tax_id(
    flavor: str, old: bytes, new: str, statement: str
) -> None:
    """Peppol BIS 3 has Norwegian sellers state "Foretaksregisteret" (NO-R-002) and
    Swedish ones "Godkänd för F-skatt" (SE-R-005, fatal) in the seller tax registration
    identifier (BT-32). For a seller with no VAT identifier that statement is all there is:
    no tax identifier, not a vendor_tax_id of "Foretaksregisteret"."""
    xml = _edited(flavor, old, new.format(statement).encode())
    assert read_einvoice_xml(xml, "x.xml").invoice.vendor_tax_id is None


@pytest.mark.parametrize(
    ("flavor", "name", "described"),
    [
        pytest.param(
            "xrechnung-ubl",
            b"<cbc:Name>Installation &amp; setup</cbc:Name>",
            b"<cbc:Description>Installation &amp; setup</cbc:Description>",
            id="ubl",
        ),
        pytest.param(
            "factur-x",
            b"<ram:Name>Installation &amp; setup</ram:Name>",
            b"<ram:Description>Installation &amp; setup</ram:Description>",
            id="cii",
        ),
        pytest.param(
            "factur-x",
            b"<ram:Name>Installation &amp; setup</ram:Name>",
            b"<ram:Name> </ram:Name><ram:Description>Installation &amp; setup</ram:Description>",
            id="cii-empty-name",
        ),
    ],
)
def test_a_line_without_an_item_name_is_described_by_its_item_description(
    flavor: str, name: bytes, described: bytes
) -> None:
    """The item name (BT-153) is what a line is called; when a producer leaves it out
    (or empty), the item description (BT-154) is the only text saying what was sold."""
    xml = _edited(flavor, name, described)
    items = read_einvoice_xml(xml, "x.xml").invoice.line_items
    assert items[0].description == "Installation & setup"


def test_cii_price_base_quantity_stated_with_the_gross_price() -> None:
    """The CII binding of EN 16931 puts BT-149 on either price: a valid invoice states it
    on at most one of them, and the line arithmetic (PEPPOL-EN16931-R120) takes the net
    price's basis, else the gross price's. 275.00 per 10 units over 10 units is 275.00."""
    xml = _edited(
        "factur-x",
        b"<ram:NetPriceProductTradePrice><ram:ChargeAmount>275.00</ram:ChargeAmount>"
        b"</ram:NetPriceProductTradePrice></ram:SpecifiedLineTradeAgreement>"
        b'<ram:SpecifiedLineTradeDelivery><ram:BilledQuantity unitCode="C62">1<',
        b"<ram:GrossPriceProductTradePrice><ram:ChargeAmount>275.00</ram:ChargeAmount>"
        b'<ram:BasisQuantity unitCode="C62">10</ram:BasisQuantity>'
        b"</ram:GrossPriceProductTradePrice>"
        b"<ram:NetPriceProductTradePrice><ram:ChargeAmount>275.00</ram:ChargeAmount>"
        b"</ram:NetPriceProductTradePrice></ram:SpecifiedLineTradeAgreement>"
        b'<ram:SpecifiedLineTradeDelivery><ram:BilledQuantity unitCode="C62">10<',
    )
    item = read_einvoice_xml(xml, "x.xml").invoice.line_items[0]
    assert (item.quantity, item.unit_price, item.amount) == (
        Decimal("10"),
        Decimal("27.5"),
        Decimal("275.00"),
    )
