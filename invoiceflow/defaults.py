"""Default names shared by the flow, the CLI, provisioning and deployment: one home.

Block names, the manifest lock, the manifest key and the S3 prefixes a fresh install
uses. Plain constants; this module imports nothing (the domain and `flows/` both read it).
"""

from __future__ import annotations

from typing import Final

# Prefect blocks `invoiceflow up` / deploy save, and the flow loads by default.
AWS_BLOCK: Final = "invoiceflow-aws"
BUCKET_BLOCK: Final = "invoiceflow-bucket"
EXTRACTOR_BLOCK: Final = "invoiceflow-extractor"
WEBHOOK_BLOCK: Final = "invoiceflow-on-failure"
FAILURE_NOTIFICATION_BLOCK: Final = f"custom-webhook/{WEBHOOK_BLOCK}"

# The global concurrency limit (size 1) serializing manifest writes.
MANIFEST_LOCK: Final = "invoiceflow-manifest"

# Where things live in the bucket.
SOURCE_PREFIX: Final = "incoming/"
RESULTS_PREFIX: Final = "results/"
MANIFEST_KEY: Final = "manifest.json"
