"""Each field is read from the EN 16931 business term it means, in every syntax.

Each case edits a generated e-invoice's XML the way a conformant producer may write it,
and checks the value against what the standard (or its syntax binding) says it is.
"""

from __future__ import annotations

import pytest

from invoiceflow.extractors.einvoice import read_einvoice_xml
from tests.test_einvoice_variants import generated_xml

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
