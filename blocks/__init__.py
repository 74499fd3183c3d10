"""Prefect Blocks: typed, saved configuration for invoiceflow."""

from blocks.extractor import ExtractorBlock

__all__ = ["ExtractorBlock"]
