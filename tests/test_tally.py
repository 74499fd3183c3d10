"""The run tally: the summary accumulated as outcomes arrive (issue 13 #4)."""

from __future__ import annotations

import json
import logging
from decimal import Decimal

import pytest

from flows.tally import RunTally, TableRows, needs_a_look, row
from invoiceflow.batch import QUEUED_FOR_BATCH
from invoiceflow.manifest import Status
from invoiceflow.pipeline import InvoiceOutcome, run_totals
from invoiceflow.schema import Invoice

OUTCOMES = [
    InvoiceOutcome(
        "a.pdf", Status.done, True, Invoice(total=Decimal("10.00"), currency="EUR"),
        usage={"prompt_tokens": 100, "completion_tokens": 20, "cached_tokens": 64},
        cost=Decimal("0.000100"), source="llm", needs_review=True,
    ),
    InvoiceOutcome(
        "b.pdf", Status.done, True, Invoice(total=Decimal("5.50"), currency="EUR"),
        source="einvoice", duplicate_of="a.pdf", needs_review=True,
    ),
    InvoiceOutcome(
        "c.pdf", Status.failed, True, error_kind="rate_limited", error_message="429",
        transient=True, usage={"prompt_tokens": 7, "completion_tokens": 0},
        cost=Decimal("0.000001"),
    ),
    InvoiceOutcome("d.pdf", Status.pending, False, error_kind="claim_lost", error_message="x"),
    InvoiceOutcome("e.pdf", Status.submitted, True),
]  # fmt: skip


def test_tally_agrees_with_the_totals_over_a_list(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tally-test")
    with caplog.at_level(logging.DEBUG, logger="tally-test"):
        tally = RunTally(logger)
        for outcome in OUTCOMES:
            tally.add(outcome)
        # Batch mode's placeholder is not an outcome: its real one comes later.
        tally.add(InvoiceOutcome("e.pdf", Status.submitted, False, error_kind=QUEUED_FOR_BATCH))

    totals = run_totals(OUTCOMES)
    assert tally.finished == totals.invoices == 3
    assert (tally.prompt_tokens, tally.completion_tokens) == (107, 20)
    assert tally.cached_tokens == totals.cached_tokens == 64
    assert tally.cost == totals.cost == Decimal("0.000101")
    assert (tally.needs_review, tally.duplicates) == (totals.needs_review, totals.duplicates)
    assert dict(tally.by_source) == totals.by_source
    assert tally.totals == {"EUR": Decimal("15.50")}
    assert tally.failures == {"c.pdf": "rate_limited: 429"}
    assert tally.observed == 5 and tally.statuses[Status.submitted] == 1
    assert [r["invoice"] for r in tally.rows] == ["a.pdf", "b.pdf", "c.pdf", "d.pdf", "e.pdf"]
    # One log line per invoice, written when it finished; only the failed and the
    # skipped one above DEBUG (progress, not each done invoice, is logged at INFO).
    records = [r for r in caplog.records if r.name == "tally-test"]
    assert len(records) == 5
    assert [r.getMessage().split()[0] for r in records if r.levelno > logging.DEBUG] == [
        "failed",
        "skipped",
    ]


def test_table_rows_are_kept_as_json_and_make_the_artifacts_data() -> None:
    tally = RunTally.of(OUTCOMES)

    rows = list(tally.rows)
    assert len(tally.rows) == len(rows) == len(OUTCOMES)
    assert rows == [row(o) for o in OUTCOMES]
    assert rows[0]["vendor"] == "" and rows[0]["total"] == "10.00"
    # The artifact's data: one JSON array of the rows, the shape a list of dicts has.
    assert json.loads(tally.rows.json()) == rows
    assert json.loads(RunTally().rows.json()) == []


def test_the_table_keeps_at_most_its_limit_of_rows_those_that_need_a_look_first() -> None:
    rows = TableRows(limit=3)
    outcomes = [
        InvoiceOutcome("1.pdf", Status.done, True),
        InvoiceOutcome("2.pdf", Status.done, True),
        InvoiceOutcome("3.pdf", Status.failed, True, error_kind="x", error_message="y"),
        InvoiceOutcome("4.pdf", Status.done, True),  # over the limit, routine: counted only
        InvoiceOutcome("5.pdf", Status.done, True, needs_review=True),  # takes 2's place
        InvoiceOutcome("6.pdf", Status.pending, False, error_kind="claim_lost"),  # 1's
        InvoiceOutcome("7.pdf", Status.failed, True, error_kind="x"),  # full of such: counted
    ]
    for o in outcomes:
        rows.append(row(o), needs_a_look=needs_a_look(o))

    assert [r["invoice"] for r in rows] == ["3.pdf", "5.pdf", "6.pdf"]
    assert (len(rows), rows.total) == (3, 7)
    assert [r["invoice"] for r in json.loads(rows.json())] == ["3.pdf", "5.pdf", "6.pdf"]
    assert [needs_a_look(o) for o in OUTCOMES] == [True, True, True, True, False]
