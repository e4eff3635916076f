"""The Python API for one prompt at a time (notebooks): no journal, no files."""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any

import numpy as np

from .endpoint import Answer, Endpoint, Prompt, Query
from .methods import METHODS, Context, MethodResult
from .simulator import SimulatedEndpoint


@dataclass
class Extraction:
    """One prompt's full vector: `logprobs[i]` is log p(token i) (NaN where unrecovered)."""

    logprobs: np.ndarray
    calls: int
    result: MethodResult


def extract_logprobs(
    prompt: str | list[dict[str, Any]],
    method: str = "topk",
    endpoint: Endpoint | None = None,
    top_k: int = 20,
    eps: float = 1e-3,
    concurrency: int = 16,
) -> Extraction:
    """Extract the full next-token distribution of one prompt (text, or chat messages).

    With no endpoint, the built-in simulator answers. Raises EndpointUnsuitable when the
    endpoint cannot support the method, EndpointError when a call fails.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    endpoint = endpoint or SimulatedEndpoint()
    item = Prompt(id=0, line=0, **({"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}))
    ctx = Context(
        endpoint.vocab_size, endpoint.limits, top_k=min(top_k, endpoint.limits.top_logprobs), eps=eps,
        withheld=getattr(endpoint, "withheld_tokens", frozenset()),
    )

    async def ask(gate: asyncio.Semaphore, query: Query) -> Answer:
        async with gate:
            return await endpoint.ask(item, query)

    async def run() -> Extraction:
        gate = asyncio.Semaphore(concurrency)
        plan = METHODS[method](ctx)
        calls = 0
        queries: list[Query] = next(plan)
        while True:
            answers: list[Answer] = list(await asyncio.gather(*(ask(gate, q) for q in queries)))
            calls += len(answers)
            try:
                queries = plan.send(answers)
            except StopIteration as stop:
                return Extraction(stop.value.logprobs, calls, stop.value)

    async def run_and_close() -> Extraction:
        try:
            return await run()
        finally:
            if hasattr(endpoint, "aclose"):
                await endpoint.aclose()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_and_close())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # inside a running loop (Jupyter)
        return pool.submit(asyncio.run, run_and_close()).result()
