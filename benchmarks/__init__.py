"""`make bench`: the pipeline against the seed's asyncio design and naive Prefect.

`benchmarks.run` is the entry point (it starts its own stack, LLM server and contender
processes); `benchmarks.contenders` is what each contender process runs;
`benchmarks.manifest_scale` times one manifest commit at 100,000 entries.
"""
