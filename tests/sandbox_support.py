"""Hostile documents and jobs for the worker-pool tests (importable by the workers).

Functions a `DocumentWorkers` runs must be importable module-level functions in the
worker, which is why they live here and not in the test module.
"""

from __future__ import annotations

import io
import time
import zlib

from pypdf import PdfReader, PdfWriter
from pypdf.generic import (
    ArrayObject,
    DecodedStreamObject,
    DictionaryObject,
    NameObject,
    StreamObject,
    TextStringObject,
)

MB = 1024 * 1024


def sleep_then(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value


def allocate_mb(megabytes: int) -> int:
    """An allocation bomb: holds ``megabytes`` MB at once."""
    chunks = [bytearray(MB) for _ in range(megabytes)]
    return len(chunks)


def fail_with(message: str) -> None:
    raise ValueError(message)


def attachment_sizes(pdf: bytes) -> list[int]:
    """Decode every attachment the way pypdf offers them (no size check)."""
    reader = PdfReader(io.BytesIO(pdf))
    return [len(data) for datas in reader.attachments.values() for data in datas]


def page_texts(pdf: bytes) -> list[str]:
    """pypdf's text extraction, without any pre-check."""
    return [page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages]


def _stream(data: bytes, filters: list[str]) -> StreamObject:
    stream = StreamObject()
    stream._data = data
    stream[NameObject("/Filter")] = ArrayObject(NameObject(f) for f in filters)
    return stream


def attachment_bomb(count: int = 30, inflated_bytes: int = 74_000_000) -> bytes:
    """A small PDF whose ``count`` XML attachments each inflate to ``inflated_bytes``.

    Doubly Flate-compressed streams keep the file tiny (the issue's bomb: 17 KB, 30 x
    75 MB); each attachment has its own stream, so decoded data cannot be shared.
    """
    writer = PdfWriter()
    writer.add_blank_page(595, 842)
    once = zlib.compress(b"<" * inflated_bytes, 9)  # pypdf refuses above 75 MB
    twice = zlib.compress(once, 9)
    names = ArrayObject()
    for index in range(count):
        payload = _stream(twice, ["/FlateDecode", "/FlateDecode"])
        payload[NameObject("/Type")] = NameObject("/EmbeddedFile")
        payload_ref = writer._add_object(payload)
        name = f"factur-x-{index}.xml"
        spec = DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Filespec"),
                NameObject("/F"): TextStringObject(name),
                NameObject("/EF"): DictionaryObject({NameObject("/F"): payload_ref}),
            }
        )
        names.extend([TextStringObject(name), writer._add_object(spec)])
    tree = DictionaryObject({NameObject("/Names"): names})
    writer._root_object[NameObject("/Names")] = DictionaryObject(
        {NameObject("/EmbeddedFiles"): writer._add_object(tree)}
    )
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def text_operator_bomb(operators: int) -> bytes:
    """A one-page PDF whose compressed content stream shows ``operators`` strings."""
    writer = PdfWriter()
    page = writer.add_blank_page(595, 842)
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})}
    )
    content = DecodedStreamObject()
    content.set_data(b"BT /F1 1 Tf 10 10 Td " + b"(A) Tj " * operators + b"ET")
    page[NameObject("/Contents")] = writer._add_object(content.flate_encode())
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
