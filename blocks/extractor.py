"""Which extractor a run uses, and how to reach its LLM. The API key is a SecretStr."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from invoiceflow.extractors import Extractor


class ExtractorBlock(Block):
    """Invoice field extractor: offline `rules`, or an OpenAI-compatible chat-completions API."""

    _block_type_name = "Invoice Extractor"
    _block_type_slug = "invoice-extractor"
    _description = "How invoiceflow extracts fields: offline rules or an OpenAI-compatible LLM."

    kind: Literal["rules", "openai"] = Field(
        default="rules", description="`rules` runs offline; `openai` calls `base_url`."
    )
    base_url: str | None = Field(
        default=None,
        title="Base URL",
        description="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or "
        "http://localhost:11434/v1 (Ollama).",
    )
    model: str = Field(default="gpt-4o-mini", description="Model name sent to the endpoint.")
    api_key: SecretStr | None = Field(default=None, title="API key")
    timeout_s: float = Field(default=60, gt=0, le=600, description="Per-request timeout.")
    max_retries: int = Field(
        default=4, ge=0, le=10, description="Retries by the openai SDK (429, 5xx, timeouts)."
    )
    max_chars: int = Field(
        default=60_000, ge=1000, description="Invoice text beyond this many characters is cut."
    )

    def build(self) -> Extractor:
        if self.kind == "rules":
            from invoiceflow.extractors.rules import RulesExtractor

            return RulesExtractor()
        from invoiceflow.extractors.openai import OpenAIExtractor

        if not self.base_url:
            raise ValueError(
                f"extractor block of kind 'openai' needs base_url ({self._block_document_name})"
            )
        return OpenAIExtractor(
            base_url=self.base_url,
            api_key=self.api_key.get_secret_value() if self.api_key else "",
            model=self.model,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            max_chars=self.max_chars,
        )
