"""Which extractor a run uses, how to reach its LLM, its limits and its prices.

Typed configuration plus `build`, like prefect-aws's `AwsCredentials`: `build` makes
the extractor around the limiter it is given. The limits here are plain settings;
`flows.llm_limits` turns them into the run's Prefect-backed limiter. The OpenAI API key
is a SecretStr; Bedrock takes a prefect-aws `AwsCredentials` block.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, SecretStr, field_validator

from invoiceflow.extractors import Extractor
from invoiceflow.extractors.limits import Limiter, ProviderLimits, run_limiter
from invoiceflow.extractors.llm import TokenPrice
from invoiceflow.extractors.rules import Runner
from invoiceflow.schema import ISO_4217


class ExtractorBlock(Block):
    """Invoice field extractor: offline `rules`, an OpenAI-compatible API, or AWS Bedrock."""

    _block_type_name = "Invoice Extractor"
    _block_type_slug = "invoice-extractor"
    _description = (
        "How invoiceflow extracts fields: offline rules, an OpenAI-compatible LLM, or "
        "AWS Bedrock (Converse). Holds the provider's limits and prices."
    )

    kind: Literal["rules", "openai", "bedrock"] = Field(
        default="rules",
        description="`rules` runs offline; `openai` calls `base_url`; `bedrock` calls the "
        "Bedrock Converse API.",
    )
    model: str = Field(
        default="gpt-4o-mini",
        description="Model name (OpenAI-compatible) or model id / inference profile (Bedrock).",
    )

    # --- OpenAI-compatible ---------------------------------------------------------
    base_url: str | None = Field(
        default=None,
        title="Base URL",
        description="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or "
        "http://localhost:11434/v1 (Ollama).",
    )
    api_key: SecretStr | None = Field(
        default=None,
        title="API key",
        description="Bearer token for `base_url`; masked in every log, error and artifact.",
    )
    structured_output: Literal["auto", "json_schema", "json_object", "prompt"] = Field(
        default="auto",
        description="`auto`: JSON-schema output, stepping down to JSON mode (then a plain "
        "prompt) when the server rejects it.",
    )

    # --- Bedrock ---------------------------------------------------------------------
    aws_credentials: AwsCredentials | None = Field(
        default=None,
        title="AWS credentials",
        description="For `bedrock`; without it the default boto3 credential chain applies.",
    )
    region_name: str | None = Field(
        default=None, description="Bedrock region; defaults to the credentials' region."
    )
    endpoint_url: str | None = Field(
        default=None,
        title="Endpoint URL",
        description="Bedrock runtime endpoint override (VPC endpoint, proxy, test server).",
    )
    retry_mode: Literal["standard", "adaptive", "legacy"] = Field(
        default="standard",
        description="botocore retry mode; `adaptive` also slows the client after throttling.",
    )

    # --- calls -------------------------------------------------------------------------
    timeout_s: float = Field(default=60, gt=0, le=600, description="Per-request timeout.")
    max_retries: int = Field(
        default=4,
        ge=0,
        le=10,
        description="Retries by the SDK (openai / botocore): 429, 5xx, timeouts, resets.",
    )
    max_total_s: float | None = Field(
        default=300,
        gt=0,
        description="Bound on one call including every retry and backoff.",
    )
    max_chars: int = Field(
        default=60_000, ge=1000, description="Invoice text beyond this many characters is cut."
    )
    max_pages: int | None = Field(
        default=20, ge=1, description="Pages beyond this budget are cut (first pages + last)."
    )
    max_output_tokens: int | None = Field(
        default=None, ge=256, description="Completion token cap (Bedrock default 2000)."
    )
    repair_attempts: int = Field(
        default=1, ge=0, le=3, description="Follow-up turns for an answer that fails validation."
    )
    max_connections: int = Field(default=64, ge=1, le=1024, description="HTTP connection pool.")

    # --- vision ----------------------------------------------------------------------------
    vision: Literal["auto", "never", "always"] = Field(
        default="auto",
        description="Page images for a vision model: `auto` sends only pages without a "
        "text layer, `always` every page, `never` none (scans then go through OCR).",
    )
    max_images: int = Field(
        default=8, ge=1, le=20, description="Page images sent per call (first pages + last)."
    )
    max_image_pixels: int = Field(
        default=2_500_000,
        ge=100_000,
        description="Pixels per page image; larger pages are downscaled before sending.",
    )

    # --- limits (per provider block, shared by every run that uses it) ----------------
    max_in_flight: int | None = Field(
        default=None, ge=1, description="Provider calls in flight at once, across runs."
    )
    requests_per_minute: int | None = Field(
        default=None,
        ge=1,
        title="Requests per minute",
        description="Provider request budget, across runs (a decaying Prefect limit).",
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        title="Tokens per minute",
        description="Provider token budget (prompt + completion, images included), across runs.",
    )

    # --- provider batches (llm_mode="batch") -----------------------------------------
    batch_max_requests: int = Field(
        default=50_000,
        ge=1,
        le=50_000,
        description="Requests per provider batch (OpenAI allows 50,000); more are split.",
    )
    batch_max_bytes: int = Field(
        default=200 * 1024 * 1024,
        ge=1024,
        le=200 * 1024 * 1024,
        description="Bytes per batch input file (OpenAI allows 200 MB); more are split.",
    )
    batch_completion_window: Literal["24h"] = Field(
        default="24h", description="How long the provider may take to answer a batch."
    )
    batch_role_arn: str | None = Field(
        default=None,
        title="Batch role ARN",
        description="Bedrock batch inference: the IAM role Bedrock assumes to read the batch "
        "input and write its output in `batch_s3_uri`.",
    )
    batch_s3_uri: str | None = Field(
        default=None,
        title="Batch S3 URI",
        description="Bedrock batch inference: s3://bucket/prefix/ for the JSONL input and "
        "the output of each job.",
    )
    control_endpoint_url: str | None = Field(
        default=None,
        title="Bedrock control endpoint URL",
        description="Bedrock control-plane endpoint override (batch jobs), like endpoint_url "
        "for the runtime.",
    )

    # --- prices --------------------------------------------------------------------------
    prices: dict[str, TokenPrice] = Field(
        default_factory=dict,
        description="Model name -> price per million input/output tokens, and optionally "
        "cached-input, cache-write and batch prices (each defaults to the full price). A "
        "model without an entry gets no cost (unknown), never zero.",
    )
    price_currency: str = Field(default="USD", description="ISO 4217 code of the prices.")

    @field_validator("price_currency")
    @classmethod
    def _iso_currency(cls, value: str) -> str:
        code = value.strip().upper()
        if code not in ISO_4217:
            raise ValueError(f"price_currency {value!r} is not an ISO 4217 code")
        return code

    def price(self) -> TokenPrice | None:
        return self.prices.get(self.model)

    def provider_limits(self) -> ProviderLimits:
        return ProviderLimits(
            max_in_flight=self.max_in_flight,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
        )

    def vision_limits(self) -> dict[str, Any]:
        """How documents are read for this extractor: page images only for an LLM."""
        if self.kind == "rules":
            return {"vision": "never"}
        return {
            "vision": self.vision,
            "max_images": self.max_images,
            "max_image_pixels": self.max_image_pixels,
        }

    def build(self, limiter: Limiter | None = None, runner: Runner | None = None) -> Extractor:
        """The extractor. ``limiter`` is the run's one LLM gate (the flow passes the
        Prefect-backed one from `flows.llm_limits`); without it, this block's limits
        hold in this process only. ``runner`` (the run's `DocumentWorkers`) runs the
        rules extractor in a bounded worker process instead of on the event loop."""
        if self.kind == "rules":
            from invoiceflow.extractors.rules import RulesExtractor

            return RulesExtractor(runner=runner)
        limiter = limiter or run_limiter(
            self.provider_limits(), run_cap=None, default_cap=self.max_connections
        )
        if self.kind == "bedrock":
            from invoiceflow.extractors.bedrock import BedrockExtractor

            return BedrockExtractor(
                client=self._bedrock_client(),
                model_id=self.model,
                max_chars=self.max_chars,
                max_pages=self.max_pages,
                max_output_tokens=self.max_output_tokens or 2_000,
                repair_attempts=self.repair_attempts,
                max_total_s=self.max_total_s,
                price=self.price(),
                price_currency=self.price_currency,
                limiter=limiter,
                max_workers=self.max_connections,
                vision=self.vision,
                max_images=self.max_images,
                max_image_pixels=self.max_image_pixels,
            )
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
            max_total_s=self.max_total_s,
            max_chars=self.max_chars,
            max_pages=self.max_pages,
            max_connections=self.max_connections,
            structured_output=self.structured_output,
            repair_attempts=self.repair_attempts,
            max_output_tokens=self.max_output_tokens,
            price=self.price(),
            price_currency=self.price_currency,
            limiter=limiter,
            vision=self.vision,
            max_images=self.max_images,
            max_image_pixels=self.max_image_pixels,
            batch_max_requests=self.batch_max_requests,
            batch_max_bytes=self.batch_max_bytes,
            batch_completion_window=self.batch_completion_window,
        )

    def batch_mode(self, extractor: Extractor) -> tuple[Any, Any]:
        """(batch extractor, batch provider) for `llm_mode="batch"` over ``extractor``
        (this block's `build`); `ValueError` when this block cannot batch."""
        if self.kind == "openai":
            from invoiceflow.extractors.openai_batch import OpenAIBatches

            return extractor, OpenAIBatches(extractor)  # type: ignore[arg-type]
        if self.kind != "bedrock":
            raise ValueError("the rules extractor makes no LLM calls to batch")
        if not (self.batch_role_arn and self.batch_s3_uri):
            raise ValueError("Bedrock batch mode needs batch_role_arn and batch_s3_uri")
        from invoiceflow.extractors.bedrock_batch import BedrockBatches, BedrockBatchExtractor
        from invoiceflow.extractors.openai_batch import BatchLimits

        session = self._boto3_session()
        region = self.region_name or session.region_name
        provider = BedrockBatches(
            extractor,  # type: ignore[arg-type]
            control_client=session.client(
                "bedrock", region_name=region, endpoint_url=self.control_endpoint_url
            ),
            s3_client=session.client("s3", region_name=region),
            s3_uri=self.batch_s3_uri,
            role_arn=self.batch_role_arn,
            limits=BatchLimits(
                max_requests=self.batch_max_requests, max_bytes=self.batch_max_bytes
            ),
        )
        return BedrockBatchExtractor(extractor), provider  # type: ignore[arg-type]

    def _boto3_session(self) -> Any:
        import boto3

        return self.aws_credentials.get_boto3_session() if self.aws_credentials else boto3.Session()

    def _bedrock_client(self) -> Any:
        import boto3
        from botocore.config import Config

        session = (
            self.aws_credentials.get_boto3_session() if self.aws_credentials else boto3.Session()
        )
        config = Config(
            retries={"mode": self.retry_mode, "total_max_attempts": self.max_retries + 1},
            connect_timeout=min(10.0, self.timeout_s),
            read_timeout=self.timeout_s,
            max_pool_connections=self.max_connections,
        )
        return session.client(
            "bedrock-runtime",
            region_name=self.region_name or session.region_name,
            endpoint_url=self.endpoint_url,
            config=config,
        )


__all__ = ["ExtractorBlock", "TokenPrice"]
