"""Checks the loopback LLM servers apply to page images, the way the real APIs do.

OpenAI takes ``image_url`` parts (here only ``data:`` URLs, since a loopback server
fetches nothing) of PNG, JPEG, GIF or WebP up to 20 MB; Bedrock Converse takes
``image`` blocks of the same formats up to 3.75 MB and 8,000 px a side, at most 20 a
request. A request that breaks a rule gets a 400 naming it; what was accepted is
recorded (`ReceivedImage`) so a test can assert what the extractor sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

_DATA_URL = re.compile(r"data:(?P<media_type>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)", re.DOTALL)
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


class ImageRejected(ValueError):
    """The request's images break a rule of the API (the server answers 400)."""


@dataclass(frozen=True)
class ImageRules:
    max_images: int
    max_bytes: int
    max_side: int | None = None
    media_types: frozenset[str] = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


OPENAI_RULES = ImageRules(max_images=10, max_bytes=20 * 1024 * 1024)
BEDROCK_RULES = ImageRules(max_images=20, max_bytes=3_750_000, max_side=8_000)


@dataclass(frozen=True)
class ReceivedImage:
    """One image a request carried, as the server saw it."""

    key: str | None
    media_type: str
    bytes: int
    width: int
    height: int
    sha1: str

    @property
    def tokens(self) -> int:
        """Prompt tokens billed for it (OpenAI's high-detail tiling)."""
        scale = min(1.0, 2048 / max(self.width, self.height))
        width, height = self.width * scale, self.height * scale
        scale = min(1.0, 768 / min(width, height))
        return 85 + 170 * math.ceil(width * scale / 512) * math.ceil(height * scale / 512)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sniff_media_type(data: bytes) -> str | None:
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def decode_data_url(url: Any) -> tuple[str, bytes]:
    """(declared media type, bytes) of an OpenAI ``image_url`` data URL."""
    match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if match is None:
        raise ImageRejected("image_url must be a base64 data: URL (nothing is fetched here)")
    return match["media_type"], _b64(match["data"])


def _b64(text: Any) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ImageRejected(f"image data is not valid base64: {exc}") from exc


def decode_bedrock_image(block: Any) -> tuple[str, bytes]:
    """(declared media type, bytes) of a Converse ``image`` block (bytes as base64)."""
    fmt = block.get("format") if isinstance(block, dict) else None
    source = block.get("source") if isinstance(block, dict) else None
    if not isinstance(fmt, str) or not isinstance(source, dict) or "bytes" not in source:
        raise ImageRejected("image block needs format and source.bytes")
    return f"image/{fmt}", _b64(source["bytes"])


def check_images(
    found: list[tuple[str, bytes]], rules: ImageRules, key: str | None
) -> list[ReceivedImage]:
    """The images of one request, checked against ``rules``; `ImageRejected` if not."""
    if len(found) > rules.max_images:
        raise ImageRejected(f"too many images: {len(found)} (at most {rules.max_images})")
    received = []
    for number, (declared, data) in enumerate(found, start=1):
        if declared not in rules.media_types:
            raise ImageRejected(f"image {number}: media type {declared} is not supported")
        actual = sniff_media_type(data)
        if actual != declared:
            raise ImageRejected(f"image {number}: declared {declared} but the data is {actual}")
        if len(data) > rules.max_bytes:
            raise ImageRejected(
                f"image {number}: {len(data)} bytes is over the {rules.max_bytes} limit"
            )
        width, height = _size(data)
        if rules.max_side is not None and max(width, height) > rules.max_side:
            raise ImageRejected(f"image {number}: {width}x{height} exceeds {rules.max_side} px")
        sha1 = hashlib.sha1(data).hexdigest()
        received.append(ReceivedImage(key, declared, len(data), width, height, sha1))
    return received


def _size(data: bytes) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageRejected(f"image cannot be decoded: {exc}") from exc
