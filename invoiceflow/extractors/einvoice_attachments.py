"""XML files embedded in a PDF, read with every size checked before anything is decoded.

pypdf's ``reader.attachments[name]`` inflates each embedded file completely (up to
75 MB per stream, pypdf's own cap) before the caller can look at its size: a 17 KB
PDF whose 30 attachments are double-deflated zeros drove a run to 2.4 GB RSS.

So the name tree is walked by hand and each candidate's stream is inflated here,
stage by stage, with ``zlib.decompressobj().decompress(data, max_length)``: no stage
ever holds more than the limit plus one byte. The declared ``/Params /Size`` is
checked first (it is the producer's claim, so it can only refuse, never admit), then
the encoded length, then the decoded length as it is produced.

Imports nothing from Prefect.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from pypdf import PdfReader
from pypdf.generic import ArrayObject, DictionaryObject, StreamObject

log = logging.getLogger(__name__)

# File names the standards prescribe; any other *.xml attachment is tried after them.
KNOWN_FILENAMES: Final = (
    "factur-x.xml",
    "zugferd-invoice.xml",
    "xrechnung.xml",
    "ZUGFeRD-invoice.xml",
)
# More than this many XML attachments is not an e-invoice; the rest are ignored.
MAX_XML_ATTACHMENTS: Final = 8
# Name-tree entries walked at most (a hostile tree may be wide, deep or cyclic).
MAX_NAME_TREE_ENTRIES: Final = 1_000
_FLATE: Final = frozenset({"/FlateDecode", "/Fl"})
# Longest attachment name kept whole (file systems allow 255).
_MAX_NAME_CHARS: Final = 255


class AttachmentTooLarge(ValueError):
    """An attachment declares, stores or inflates to more than the limit."""


class _Undecodable(ValueError):
    """An attachment in an encoding we do not decode, or broken deflate data."""


@dataclass(frozen=True)
class EmbeddedFile:
    name: str
    data: bytes
    # Why the data could not be decoded (then ``data`` is empty), e.g. broken deflate.
    problem: str | None = None


@dataclass(frozen=True)
class _Candidate:
    name: str
    stream: StreamObject


def xml_attachments(pdf: bytes, max_bytes: int) -> Iterator[EmbeddedFile]:
    """Each XML attachment, the standard names first, decoded one at a time.

    A broken PDF yields nothing; an attachment that cannot be decoded yields an
    `EmbeddedFile` saying why. Raises `AttachmentTooLarge` for one past ``max_bytes``.
    """
    known = {n.lower(): i for i, n in enumerate(KNOWN_FILENAMES)}
    candidates = sorted(_xml_candidates(pdf), key=lambda c: known.get(c.name.lower(), len(known)))
    for candidate in candidates[:MAX_XML_ATTACHMENTS]:
        try:
            yield EmbeddedFile(candidate.name, _decode(candidate, max_bytes))
        except _Undecodable as exc:
            yield EmbeddedFile(candidate.name, b"", problem=str(exc))


def _xml_candidates(pdf: bytes) -> list[_Candidate]:
    try:
        reader = PdfReader(io.BytesIO(pdf), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            return []
        catalog = _resolve(reader.trailer["/Root"])
        names = _resolve(catalog.get("/Names"))
        tree = _resolve(names.get("/EmbeddedFiles")) if isinstance(names, dict) else None
        found = list(_walk(tree)) if isinstance(tree, dict) else []
        found += _associated(catalog)
    except Exception as exc:  # a broken PDF simply has no usable attachment
        log.debug("no attachments readable: %s", exc)
        return []
    # The same file is usually in both places (Factur-X requires it): read it once.
    unique: dict[int, _Candidate] = {}
    for candidate in found:
        unique.setdefault(id(candidate.stream), candidate)
    return [c for c in unique.values() if c.name.lower().endswith(".xml")]


def _associated(catalog: DictionaryObject) -> list[_Candidate]:
    """Files associated with the document (PDF/A-3 ``/AF``): a producer may list the
    invoice there and leave it out of the EmbeddedFiles name tree."""
    specs = _resolve(catalog.get("/AF"))
    if not isinstance(specs, list):
        return []
    found = (_candidate("", _resolve(spec)) for spec in specs[:MAX_NAME_TREE_ENTRIES])
    return [c for c in found if c is not None]


def _walk(tree: DictionaryObject) -> Iterator[_Candidate]:
    """Leaves of a PDF name tree, breadth first, bounded and cycle-safe."""
    queue: list[Any] = [tree]
    seen: set[int] = set()
    entries = 0
    while queue and entries < MAX_NAME_TREE_ENTRIES:
        node = _resolve(queue.pop(0))
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        pairs = _resolve(node.get("/Names")) or []
        for key, spec in zip(pairs[::2], pairs[1::2], strict=False):
            entries += 1
            if (candidate := _candidate(str(key), _resolve(spec))) is not None:
                yield candidate
        queue.extend(_resolve(node.get("/Kids")) or [])


def _candidate(key: str, spec: Any) -> _Candidate | None:
    if not isinstance(spec, dict):
        return None
    name = str(_resolve(spec.get("/UF")) or _resolve(spec.get("/F")) or key)
    if len(name) > _MAX_NAME_CHARS:
        # The name travels into notes and failure reasons; its extension still counts.
        name = f"{name[: _MAX_NAME_CHARS // 2]}...{name[-_MAX_NAME_CHARS // 2 :]}"
    files = _resolve(spec.get("/EF"))
    if not isinstance(files, dict):
        return None
    stream = _resolve(files.get("/UF") or files.get("/F"))
    return _Candidate(name, stream) if isinstance(stream, StreamObject) else None


def _decode(candidate: _Candidate, max_bytes: int) -> bytes:
    stream, name = candidate.stream, candidate.name
    params = _resolve(stream.get("/Params"))
    declared = _resolve(params.get("/Size")) if isinstance(params, dict) else None
    if isinstance(declared, int) and declared > max_bytes:
        raise AttachmentTooLarge(f"attachment {name} declares {declared} bytes (limit {max_bytes})")
    # The raw (still encoded) bytes: get_data() would inflate everything first.
    data: bytes = stream._data
    if len(data) > max_bytes:
        raise AttachmentTooLarge(f"attachment {name} stores {len(data)} bytes (limit {max_bytes})")
    filters = _resolve(stream.get("/Filter"))
    stages = [str(_resolve(f)) for f in filters] if isinstance(filters, ArrayObject) else []
    if filters is not None and not stages:
        stages = [str(filters)]
    if any(stage not in _FLATE for stage in stages) or _has_predictor(stream):
        raise _Undecodable(f"uses filters {stages[:5]} with parameters we do not decode")
    for _ in stages:
        data = _inflate(data, max_bytes, name)
    return data


def _inflate(data: bytes, max_bytes: int, name: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, max_bytes + 1)
        if len(out) <= max_bytes and not inflater.unconsumed_tail:
            out += inflater.flush()
    except zlib.error as exc:
        raise _Undecodable(f"is not valid deflate data: {exc}") from exc
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise AttachmentTooLarge(f"attachment {name} inflates past {max_bytes} bytes")
    return out


def _has_predictor(stream: StreamObject) -> bool:
    params = _resolve(stream.get("/DecodeParms"))
    for entry in params if isinstance(params, list) else [params]:
        entry = _resolve(entry)
        if not isinstance(entry, dict):
            continue
        predictor = _resolve(entry.get("/Predictor", 1))
        # One that is not a number (a name, null) is not a predictor we decode either.
        if not isinstance(predictor, int | float) or int(predictor) > 1:
            return True
    return False


def _resolve(value: Any) -> Any:
    return value.get_object() if hasattr(value, "get_object") else value
