"""The rules extractor on layouts real invoices use (issue 9 section 4).

`rules_handmade` holds hand-written invoice texts of different vendors and layouts; they
were written (with their expected fields) before the rules were adjusted to them.
"""

from __future__ import annotations

from typing import Any

import pytest
from rules_handmade import CASES, HEADER_FIELDS

from invoiceflow.extractors.rules import extract_invoice


def header_scores() -> tuple[int, int, list[tuple[str, str, Any, Any]]]:
    """(correct, total, mismatches) over the header fields of every hand-made case."""
    correct, total, misses = 0, 0, []
    for name, (text, expected) in CASES.items():
        invoice = extract_invoice(text)
        for field in HEADER_FIELDS:
            got = getattr(invoice, field)
            total += 1
            if got == expected[field]:
                correct += 1
            else:
                misses.append((name, field, got, expected[field]))
    return correct, total, misses


def test_handmade_set_header_fields_are_at_least_90_percent_exact() -> None:
    correct, total, misses = header_scores()
    assert len(CASES) >= 10
    assert correct / total >= 0.9, misses


@pytest.mark.parametrize("name", sorted(CASES))
def test_handmade_newer_fields_when_printed(name: str) -> None:
    text, expected = CASES[name]
    invoice = extract_invoice(text)
    for field, value in expected.items():
        if field not in HEADER_FIELDS:
            assert getattr(invoice, field) == value, field
