"""S3 access: listing, reading, writing results, and conditional puts for the manifest.

Plain boto3 so the domain stays testable without Prefect. Transient S3 errors (5xx,
SlowDown, throttling, connection resets) are retried by botocore's own `standard`
retry mode; conditional-write conflicts (412/409) are surfaced as `PreconditionFailed`
for the caller to re-read and re-apply.

Imports nothing from Prefect.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

# Name endings a source listing takes (PDFs, and bare e-invoice XML).
SOURCE_SUFFIXES = (".pdf", ".xml")
# Every result object is `<results prefix><invoice id>.json` (see `result_key`).
RESULT_SUFFIX = ".json"


class PreconditionFailed(Exception):
    """A conditional write lost: the object changed (412) or a write raced it (409)."""


class S3Object(tuple[bytes, str]):
    """(body, etag) pair; a tuple so it unpacks naturally."""

    @property
    def body(self) -> bytes:
        return self[0]

    @property
    def etag(self) -> str:
        return self[1]


# The one S3 client configuration: botocore's `standard` retry mode (5xx, SlowDown,
# throttling, resets; exponential backoff with jitter) and a pool sized for fan-out. As
# plain botocore `Config` keyword arguments, so blocks can store it too
# (`flows.provision`), and `flows.s3.s3_store` lays it under a user's own block settings.
S3_CLIENT_SETTINGS: dict[str, Any] = {
    "retries": {"mode": "standard", "max_attempts": 8},
    "max_pool_connections": 64,
    "connect_timeout": 5,
    "read_timeout": 30,
}


def client_config(*, endpoint_url: str | None = None, **overrides: Any) -> Config:
    """`S3_CLIENT_SETTINGS` as a botocore `Config`, with path-style addressing for
    S3-compatible endpoints (moto, MinIO), which keeps them working without DNS tricks."""
    settings = {**S3_CLIENT_SETTINGS, **overrides}
    if endpoint_url:
        settings.setdefault("s3", {"addressing_style": "path"})
    return Config(**settings)


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region_name: str = "us-east-1",
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
    **config: Any,
) -> Any:
    """A boto3 S3 client with the shared configuration (`config` overrides parts of it)."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region_name,
        aws_access_key_id=aws_access_key_id,
        aws_secret_access_key=aws_secret_access_key,
        config=client_config(endpoint_url=endpoint_url, **config),
    )


@dataclass(frozen=True)
class ListedObject:
    key: str
    etag: str
    size: int


def _clean_etag(etag: str) -> str:
    return etag.strip('"')


# Keys per ListObjectsV2 request: S3's maximum.
LISTING_PAGE_SIZE = 1000
# A run's first request asks for fewer: a page of 1,000 takes S3 (and botocore's
# parsing) ~0.2-0.4 s, and the run's first invoices wait for it. 127 = 1 + 2 + ... + 64,
# the parse stage's first chunks.
FIRST_LISTING_PAGE_SIZE = 127


class S3Store:
    """One bucket, addressed by key. Thread-safe (boto3 clients are)."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def list_sources(
        self,
        prefix: str,
        suffixes: tuple[str, ...] = SOURCE_SUFFIXES,
        *,
        page_size: int = LISTING_PAGE_SIZE,
    ) -> Iterator[ListedObject]:
        """Every invoice under `prefix` (keys ending in `suffixes`, any case), paginated."""
        for page in self.list_source_pages(prefix, suffixes, page_size=page_size):
            yield from page

    def list_source_pages(
        self,
        prefix: str,
        suffixes: tuple[str, ...] = SOURCE_SUFFIXES,
        *,
        page_size: int = LISTING_PAGE_SIZE,
        first_page_size: int | None = None,
    ) -> Iterator[list[ListedObject]]:
        """`list_sources` a listing page at a time, as S3 answers them; the first page
        holds at most `first_page_size` keys (default `page_size`)."""
        wanted = tuple(s.lower() for s in suffixes)
        # By hand, not botocore's paginator: it asks for one page size throughout.
        request = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": first_page_size or page_size}
        while True:
            page = self.client.list_objects_v2(**request)
            yield [
                ListedObject(obj["Key"], _clean_etag(obj["ETag"]), obj["Size"])
                for obj in page.get("Contents", [])
                if obj["Key"].lower().endswith(wanted)
            ]
            if not page.get("IsTruncated"):
                return
            request |= {"MaxKeys": page_size, "ContinuationToken": page["NextContinuationToken"]}

    def get(self, key: str, *, max_bytes: int | None = None) -> S3Object:
        """Body and ETag; NoSuchKey surfaces as KeyError."""
        obj = self._get(key, max_bytes, {})
        assert obj is not None  # only conditional reads come back empty
        return obj

    def get_if_changed(
        self, key: str, etag: str, *, max_bytes: int | None = None
    ) -> S3Object | None:
        """Like `get`, but None when the object still has ETag `etag` (a 304).

        A caller holding a decoded copy then skips both the download and the parse.
        """
        return self._get(key, max_bytes, {"IfNoneMatch": f'"{etag}"'})

    def _get(self, key: str, max_bytes: int | None, extra: dict[str, str]) -> S3Object | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key, **extra)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                raise KeyError(key) from exc
            if _code(exc) in ("304", "NotModified") and extra:
                return None
            raise
        if max_bytes is not None and resp["ContentLength"] > max_bytes:
            resp["Body"].close()
            raise ValueError(f"{key} is {resp['ContentLength']} bytes, over the {max_bytes} limit")
        return S3Object((resp["Body"].read(), _clean_etag(resp["ETag"])))

    def put(self, key: str, body: bytes, content_type: str = "application/json") -> str:
        resp = self.client.put_object(
            Bucket=self.bucket, Key=key, Body=body, ContentType=content_type
        )
        return _clean_etag(resp["ETag"])

    def put_conditional(
        self,
        key: str,
        body: bytes | BinaryIO,
        *,
        if_match: str | None,
        content_type: str = "application/json",
    ) -> str:
        """Write only if the object still has ETag `if_match`, or is absent when None.

        Returns the new ETag; raises `PreconditionFailed` when someone else won.
        """
        condition = {"IfMatch": f'"{if_match}"'} if if_match else {"IfNoneMatch": "*"}
        try:
            resp = self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, **condition
            )
        except ClientError as exc:
            # 409 ConditionalRequestConflict is real S3's answer to a racing conditional
            # write; NoSuchKey means If-Match against an object someone deleted.
            if _code(exc) in (
                "PreconditionFailed",
                "412",
                "ConditionalRequestConflict",
                "409",
                "NoSuchKey",
                "404",
            ):
                raise PreconditionFailed(f"{key}: {_code(exc)}") from exc
            raise
        return _clean_etag(resp["ETag"])

    def etag(self, key: str) -> str:
        """The object's current ETag; KeyError when it is absent."""
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise KeyError(key) from exc
            raise
        return _clean_etag(resp["ETag"])

    def copy(self, source: str, dest: str, *, if_match: str) -> str:
        """Server-side copy of `source` as it is at ETag `if_match` (any size)."""
        resp = self.client.copy_object(
            Bucket=self.bucket,
            Key=dest,
            CopySource={"Bucket": self.bucket, "Key": source},
            CopySourceIfMatch=f'"{if_match}"',
        )
        return _clean_etag(resp["CopyObjectResult"]["ETag"])

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


_UNSAFE = re.compile(r"[^\w.\- ]+", re.UNICODE)


def invoice_id(source_key: str, source_prefix: str = "") -> str:
    """A stable, path-safe id for a source key: its name relative to `source_prefix`.

    Sub-folders become `__`, anything outside word characters, dots, dashes and spaces
    becomes `_`, and `..` can never survive, so a result key cannot escape its prefix.
    Unless the id maps back to exactly one key (only folders were joined, nothing else
    changed), a short hash of the key is appended, so two keys never share an id.

    The pipeline passes the whole key (no prefix): an invoice's result key must not
    depend on which prefix a run was started with, or runs over `in/` and `in/a/`
    would write `in/x.pdf` and `in/a/x.pdf` to the same result.
    """
    rel = source_key[len(source_prefix) :] if source_key.startswith(source_prefix) else source_key
    normal = unicodedata.normalize("NFC", rel.lstrip("/"))
    stem = normal[:-4] if normal.lower().endswith(".pdf") else normal
    parts = [_UNSAFE.sub("_", p).strip(" .") or "_" for p in stem.split("/") if p]
    joined = "__".join(parts)
    safe = joined[:180] or "_"
    reversible = (
        rel == "/".join(parts) + ".pdf" and safe == joined and not any("__" in p for p in parts)
    )
    if not reversible:
        safe = f"{safe}-{hashlib.sha1(source_key.encode()).hexdigest()[:8]}"
    return safe


def result_key(results_prefix: str, inv_id: str) -> str:
    key = posixpath.join(results_prefix, f"{inv_id}{RESULT_SUFFIX}")
    if not key.startswith(results_prefix):  # defence in depth against traversal
        raise ValueError(f"unsafe result key {key!r}")
    return key
