"""invoiceflow domain package: PDF parsing, schema, extractors, S3 storage and the manifest.

Nothing in this package imports Prefect; flows/ and blocks/ are thin wiring around it.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
