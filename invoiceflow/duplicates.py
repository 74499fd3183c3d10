"""Duplicate invoices: the same vendor invoice number recorded twice in the manifest.

Decided at commit time under the manifest lock (`RecordDone` is a manifest update), so
two runs finishing twins at once cannot both miss each other. Beside the manifest
because it reads manifest entries; the name/number comparisons come from `validate`.

Imports nothing from Prefect.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from invoiceflow.manifest import Outcome, Transition
from invoiceflow.validate import compact, fold


def same_invoice(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same vendor and same invoice number (manifest entry fields).

    The vendor is the tax id when both sides have one, otherwise the name: an
    extraction that missed the tax id must still match its twin.
    """
    number_a, number_b = _text(a, "invoice_number"), _text(b, "invoice_number")
    if not number_a or not number_b or compact(number_a) != compact(number_b):
        return False
    tax_a, tax_b = _text(a, "vendor_tax_id"), _text(b, "vendor_tax_id")
    if tax_a and tax_b:
        return compact(tax_a) == compact(tax_b)
    name_a, name_b = _text(a, "vendor_name"), _text(b, "vendor_name")
    return bool(name_a and name_b) and fold(name_a) == fold(name_b)


def _text(entry: Mapping[str, Any], name: str) -> str | None:
    """A text field of an entry; anything else (a hand-edited int) counts as absent."""
    value = entry.get(name)
    return value if isinstance(value, str) else None


def find_duplicate(
    entries: Mapping[str, Mapping[str, Any]], key: str, fields: Mapping[str, Any]
) -> str | None:
    """The first other finished entry for the same vendor invoice, if any."""
    number = _text(fields, "invoice_number")
    if not number:
        return None
    for other_key in _by_invoice_number(entries).keys_with(compact(number)):
        other = entries.get(other_key)
        if (
            other_key != key
            and isinstance(other, Mapping)
            and other.get("status") == "done"
            and same_invoice(fields, other)
        ):
            return other_key
    return None


class KeysByNumber:
    """Keys of done entries by compacted invoice number.

    Nearly every number names one entry, so it maps to that key itself, and only a
    shared number to a list: a list per number took 1.09 MB at 10,000 invoices, this
    0.21 MB (tracemalloc), kept to the run's end (issue 13 #4).
    """

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[str, str | list[str]] = {}

    def add(self, number: str, key: str) -> None:
        held = self._keys.get(number)
        if held is None:
            self._keys[number] = key
        elif isinstance(held, str):
            if held != key:
                self._keys[number] = [held, key]
        elif key not in held:
            held.append(key)

    def keys_with(self, number: str) -> Sequence[str]:
        held = self._keys.get(number, ())
        return (held,) if isinstance(held, str) else held


def _by_invoice_number(entries: Mapping[str, Mapping[str, Any]]) -> KeysByNumber:
    """The index of done entries, built once per decoded manifest.

    A scan per finished invoice made a commit O(batch x manifest): 0.65 s per update
    at 100,000 entries. Stale keys are harmless because `find_duplicate` re-checks the
    current entry.
    """
    indexes = getattr(entries, "indexes", None)  # present on manifest.Entries
    if indexes is not None and "invoice_number" in indexes:
        index: KeysByNumber = indexes["invoice_number"]
        return index
    index = KeysByNumber()
    for other_key, other in entries.items():
        if (
            isinstance(other, Mapping)
            and other.get("status") == "done"
            and (number := _text(other, "invoice_number"))
        ):
            index.add(compact(number), other_key)
    if indexes is not None:
        indexes["invoice_number"] = index
    return index


@dataclass(frozen=True)
class RecordDone:
    """`Transition` to done that flags a duplicate of an earlier manifest entry.

    Decided in `apply`, i.e. at commit time under the manifest lock, against the
    manifest as it is then. ``duplicate_of`` tells the caller what the commit found.
    """

    transition: Transition
    _found: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def key(self) -> str:
        return self.transition.key

    @property
    def duplicate_of(self) -> str | None:
        return self._found[-1] if self._found else None

    def apply(self, entries: dict[str, dict[str, Any]], now: dt.datetime) -> Outcome:
        self._found.clear()  # a retried commit re-decides on the fresh manifest
        fields = dict(self.transition.fields)
        duplicate = find_duplicate(entries, self.key, fields)
        if duplicate is not None:
            reasons = list(fields.get("review_reasons") or [])
            fields |= {
                "duplicate_of": duplicate,
                "needs_review": True,
                "review_reasons": [*reasons, duplicate_reason(duplicate)],
            }
        outcome = replace(self.transition, fields=fields).apply(entries, now)
        if outcome.applied and (number := _text(fields, "invoice_number")):
            _by_invoice_number(entries).add(compact(number), self.key)
        if duplicate is not None and outcome.applied:
            self._found.append(duplicate)
        return outcome


def duplicate_reason(duplicate_of: str) -> str:
    return f"duplicate of {duplicate_of} (same vendor and invoice number)"
