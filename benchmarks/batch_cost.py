"""What the same invoices cost online and as a provider batch, and the cached share.

    uv run python -m benchmarks.batch_cost --n 50

Generates ``n`` invoices, reads their text, and extracts them twice against the
loopback OpenAI server (whose usage is chars/4 and whose prompt cache behaves like
OpenAI's): once online (one chat completion each) and once as one Batch API batch.
Both are priced with the same price table (gpt-4o-mini's published prices: input 0.15,
cached input 0.075, output 0.60, batch input 0.075, batch output 0.30 USD per 1M).
Prints a JSON summary; the README's batch-mode numbers come from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from decimal import Decimal
from typing import Any

from devtools.llm_server import running_llm_server
from invoiceflow.extractors import ExtractionError
from invoiceflow.extractors.llm import EXAMPLES, TokenPrice
from invoiceflow.extractors.openai import OpenAIExtractor
from invoiceflow.extractors.openai_batch import OpenAIBatches, jsonl_line
from invoiceflow.pdf import parse_pdf
from invoiceflow.samples import generate_corpus
from invoiceflow.schema import Usage

PRICE = TokenPrice(
    input_per_million=Decimal("0.15"),
    cached_input_per_million=Decimal("0.075"),
    output_per_million=Decimal("0.60"),
    batch_input_per_million=Decimal("0.075"),
    batch_output_per_million=Decimal("0.30"),
)
NO_CACHE_DISCOUNT = PRICE.model_copy(update={"cached_input_per_million": None})
API_KEY = "sk-batch-cost"


def _figures(usages: list[Usage], *, batch: bool) -> dict[str, Any]:
    total = sum(usages, Usage())
    return {
        "invoices": len(usages),
        "prompt_tokens": total.prompt_tokens,
        "cached_tokens": total.cached_tokens,
        "cached_share": round(total.cached_tokens / max(total.prompt_tokens, 1), 3),
        "completion_tokens": total.completion_tokens,
        "cost_usd": str(sum((PRICE.cost(u, batch=batch) for u in usages), Decimal(0))),
        "cost_usd_without_cache_discount": str(
            sum((NO_CACHE_DISCOUNT.cost(u, batch=batch) for u in usages), Decimal(0))
        ),
    }


async def measure(n: int) -> dict[str, Any]:
    texts = [parse_pdf(pdf).text for _, pdf, _ in generate_corpus(n, seed=2026)]
    with running_llm_server(api_key=API_KEY) as server:
        extractor = OpenAIExtractor(
            base_url=server.base_url, api_key=API_KEY, model="gpt-4o-mini", price=PRICE
        )
        async with extractor:
            online = [
                (await extractor.extract_document(t, invoice_key=f"online/{i}")).usage
                for i, t in enumerate(texts)
            ]
            server.reset()  # a cold cache for the batch too
            batches = OpenAIBatches(extractor)
            lines = [
                jsonl_line(f"batch/{i}", extractor.batch_body(t)[0]) for i, t in enumerate(texts)
            ]
            state = await batches.state(await batches.submit(b"".join(lines), {}))
            answers = await batches.results(state)
            await batches.aclose()
        batch = []
        for answer in answers.values():
            if isinstance(answer, ExtractionError):
                raise answer
            batch.append(extractor.batch_extraction(answer).usage)
    online_figures = _figures(online, batch=False)
    batch_figures = _figures(batch, batch=True)
    saved = 1 - Decimal(batch_figures["cost_usd"]) / Decimal(online_figures["cost_usd"])
    # The same calls without the worked examples in the static part: ~320 tokens of
    # instructions, below the 1,024-token minimum, so nothing would be cached.
    examples = len(EXAMPLES) // 4
    bare = [
        Usage(prompt_tokens=u.prompt_tokens - examples, completion_tokens=u.completion_tokens)
        for u in online
    ]
    return {
        "price_per_million_usd": PRICE.model_dump(mode="json"),
        "online": online_figures,
        "batch": batch_figures,
        "batch_saves": f"{saved:.1%}",
        "online_without_examples_estimate": _figures(bare, batch=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.n)), indent=2))


if __name__ == "__main__":
    main()
