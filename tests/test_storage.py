"""S3 access against moto's server: pagination, safe result keys."""

from __future__ import annotations

import pytest

from invoiceflow.storage import S3Store, invoice_id, result_key


def test_listing_follows_pagination_and_keeps_only_pdfs(s3_store: S3Store) -> None:
    for i in range(23):
        s3_store.put(f"in/{i:03}.pdf", b"%PDF-1.4", content_type="application/pdf")
    s3_store.put("in/readme.txt", b"not an invoice")
    s3_store.put("other/x.pdf", b"%PDF-1.4")
    listed = list(s3_store.list_pdfs("in/", page_size=5))
    assert [o.key for o in listed] == [f"in/{i:03}.pdf" for i in range(23)]
    assert all(o.etag and '"' not in o.etag for o in listed)


@pytest.mark.parametrize(
    "key",
    ["in/../../etc/passwd.pdf", "in/..pdf", "in/sub/../../x.pdf", "in//abs.pdf", "in/.pdf"],
)
def test_invoice_ids_cannot_escape_the_results_prefix(key: str) -> None:
    inv = invoice_id(key, "in/")
    assert "/" not in inv and ".." not in inv and inv
    assert result_key("results/", inv).startswith("results/")
    assert result_key("results/", inv).count("/") == 1


def test_invoice_ids_keep_unicode_and_spaces_and_stay_unique() -> None:
    assert invoice_id("in/Rechnung März 2026.pdf", "in/").startswith("Rechnung März 2026")
    assert invoice_id("in/plain-001.pdf", "in/") == "plain-001"
    # Two keys that sanitise to the same name still get distinct ids.
    assert invoice_id("in/a?b.pdf", "in/") != invoice_id("in/a*b.pdf", "in/")
    assert invoice_id("in/x/y.pdf", "in/") != invoice_id("in/x__y.pdf", "in/")


def test_unicode_keys_round_trip(s3_store: S3Store) -> None:
    key = "in/Facture été n° 7.pdf"
    s3_store.put(key, b"%PDF-1.4 body", content_type="application/pdf")
    assert [o.key for o in s3_store.list_pdfs("in/")] == [key]
    assert s3_store.get(key).body == b"%PDF-1.4 body"


def test_s3_store_gives_a_hand_made_bucket_block_the_shared_retries() -> None:
    """A user's own S3Bucket block without retry settings still gets botocore's standard
    mode and 8 attempts; settings the user did choose win."""
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    from flows.s3 import s3_store

    plain = S3Bucket(
        bucket_name="acme-invoices", credentials=AwsCredentials(region_name="eu-west-1")
    )
    config = s3_store(plain).client.meta.config
    # botocore counts the first try too: max_attempts 8 -> total_max_attempts 9.
    assert config.retries == {"mode": "standard", "total_max_attempts": 9}
    assert config.max_pool_connections == 64
    assert config.s3 is None or config.s3.get("addressing_style") != "path"  # real AWS

    tuned = S3Bucket(
        bucket_name="acme-invoices",
        credentials=AwsCredentials(
            region_name="eu-west-1",
            aws_client_parameters=AwsClientParameters(
                endpoint_url="http://127.0.0.1:9000",
                config={"retries": {"mode": "adaptive", "max_attempts": 3}},
            ),
        ),
    )
    store = s3_store(tuned)
    config = store.client.meta.config
    assert config.retries == {"mode": "adaptive", "total_max_attempts": 4}
    assert config.max_pool_connections == 64
    assert config.s3 == {"addressing_style": "path"}  # an S3-compatible endpoint
    assert (store.bucket, store.client.meta.region_name) == ("acme-invoices", "eu-west-1")
