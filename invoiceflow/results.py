"""Writing a result object (``results/<invoice>.json``) without undoing another writer.

Two writers can hold the same answer for one invoice: two collects of one provider
batch line, or a run and the run that took its claim over. The one that comes second
must not overwrite what the first one recorded, least of all the duplicate mark the
first one added after its `done` commit. So a result is written conditionally on what
was read (If-None-Match, then If-Match on the ETag read), and not at all when the object
there already says as much.

Imports nothing from Prefect.
"""

from __future__ import annotations

from typing import Final

from pydantic import ValidationError

from invoiceflow.schema import ExtractionResult
from invoiceflow.storage import PreconditionFailed, S3Store

# Each conflict means another writer succeeded in between; more than a few is a writer
# rewriting the object in a loop, which no path of this package does.
MAX_CONFLICTS: Final = 8
# What a duplicate mark changes in a result; the rest is the answer itself.
_MARK_FIELDS: Final = frozenset({"extracted_at", "duplicate_of", "needs_review", "review_reasons"})
_MAX_RESULT_BYTES: Final = 8 * 1024 * 1024


def says_as_much(written: ExtractionResult, result: ExtractionResult) -> bool:
    """Whether ``written`` holds ``result``'s answer and every mark ``result`` carries
    (a duplicate mark, review reasons); when it was written does not matter."""
    return (
        written.model_dump(exclude=_MARK_FIELDS) == result.model_dump(exclude=_MARK_FIELDS)
        and result.duplicate_of in (None, written.duplicate_of)
        and set(result.review_reasons) <= set(written.review_reasons)
        and (written.needs_review or not result.needs_review)
    )


def write_result(s3: S3Store, key: str, result: ExtractionResult) -> None:
    """Put ``result`` at ``key`` unless the object there says as much already.

    The first try creates (If-None-Match), so the usual case costs one PUT as before.
    When an object exists, it is read: if it says as much, nothing is written; otherwise
    it is replaced on the condition that it is still the one read (If-Match).
    """
    body = result.model_dump_json(indent=2).encode()
    etag: str | None = None
    for _ in range(MAX_CONFLICTS):
        try:
            s3.put_conditional(key, body, if_match=etag)
            return
        except PreconditionFailed:
            pass  # someone wrote it: look at what is there
        try:
            written, etag = s3.get(key, max_bytes=_MAX_RESULT_BYTES)
        except KeyError:
            etag = None  # deleted meanwhile: create it
            continue
        except ValueError:  # over the size bound: not a result of ours, replace it
            etag = _etag_or_none(s3, key)
            continue
        try:
            if says_as_much(ExtractionResult.model_validate_json(written), result):
                return
        except ValidationError:
            pass  # not a result of ours: replace it
    raise PreconditionFailed(f"{key} changed {MAX_CONFLICTS} times while being written")


def _etag_or_none(s3: S3Store, key: str) -> str | None:
    try:
        return s3.etag(key)
    except KeyError:
        return None
