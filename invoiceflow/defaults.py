"""Default names of the things a deployment shares: one home for each.

The flow parameters, the CLI, provisioning, deployment and the benchmarks all start
from these. Plain strings, so any layer may import them; this module imports nothing.
"""

from __future__ import annotations

from typing import Final

# Prefect blocks
AWS_BLOCK: Final = "invoiceflow-aws"
BUCKET_BLOCK: Final = "invoiceflow-bucket"
EXTRACTOR_BLOCK: Final = "invoiceflow-extractor"
# The Prefect global concurrency limit (size one) that serializes manifest writes.
MANIFEST_LOCK: Final = "invoiceflow-manifest"
# S3 keys and prefixes
MANIFEST_KEY: Final = "manifest.json"
SOURCE_PREFIX: Final = "incoming/"
RESULTS_PREFIX: Final = "results/"
