"""The Python API for one prompt at a time (notebooks): no journal, no files."""

from __future__ import annotations

import asyncio
import concurrent.futures
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .budget import MeteredEndpoint, Spend
from .endpoint import Answer, Endpoint, Prompt, Query
from .inputs import content_problems
from .methods import METHODS, Context, MethodResult
from .probe import ProbeReport, probe
from .simulator import SimulatedEndpoint
from .wording import top_k_capped


@dataclass
class Extraction:
    """One prompt's full vector: `logprobs[i]` is log p(token i) (NaN where unrecovered).

    calls counts every call spent, the probe's included; method is the method that ran
    (the probe's choice when method="auto"), probe the probe's report (None unless auto).
    """

    logprobs: np.ndarray
    calls: int
    result: MethodResult
    method: str = ""
    probe: ProbeReport | None = None


def extract_logprobs(
    prompt: str | list[dict[str, Any]],
    method: str = "auto",
    endpoint: Endpoint | None = None,
    top_k: int = 20,
    eps: float = 1e-3,
    concurrency: int = 16,
) -> Extraction:
    """Extract the full next-token distribution of one prompt (text, or chat messages).

    method "auto" (the default, as in the CLI) probes the endpoint first and runs the method it
    recommends. With no endpoint, the built-in simulator answers. A top_k above the endpoint's
    cap is lowered to it with a UserWarning. Raises ValueError for an empty or malformed prompt or
    a setting out of range (before any call), EndpointUnsuitable when the endpoint cannot support
    the method, EndpointError when a call fails.
    """
    item = _prompt(prompt)
    if method != "auto" and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose auto or one of {', '.join(METHODS)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2:
        raise ValueError(f"top_k must be an integer, 2 or above, got {top_k!r}")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer, 1 or above, got {concurrency!r}")
    if not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a positive number of nats, got {eps!r}")
    endpoint = endpoint or SimulatedEndpoint()

    counted = MeteredEndpoint(endpoint, Spend(), price=None)  # counts the calls answered, caps none

    async def ask(gate: asyncio.Semaphore, query: Query) -> Answer:
        async with gate:
            return await counted.ask(item, query)

    async def run() -> tuple[Extraction, str | None]:
        report = await probe(counted, item) if method == "auto" else None
        chosen, limits = (report.recommended, report.limits()) if report else (method, endpoint.limits)
        ctx = Context(
            endpoint.vocab_size, limits, top_k=min(top_k, limits.top_logprobs), eps=eps,
            withheld=await counted.withheld_tokens(),
        )
        gate = asyncio.Semaphore(concurrency)
        plan = METHODS[chosen](ctx)
        queries: list[Query] = next(plan)
        while True:
            answers: list[Answer] = list(await asyncio.gather(*(ask(gate, q) for q in queries)))
            try:
                queries = plan.send(answers)
            except StopIteration as stop:
                extraction = Extraction(stop.value.logprobs, counted.spent.calls, stop.value, chosen, report)
                return extraction, top_k_capped(top_k, limits.top_logprobs)

    async def run_and_close() -> tuple[Extraction, str | None]:
        try:
            return await run()
        finally:
            await endpoint.aclose()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        extraction, note = asyncio.run(run_and_close())
    else:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # inside a running loop (Jupyter)
            extraction, note = pool.submit(asyncio.run, run_and_close()).result()
    if note:
        warnings.warn(note, stacklevel=2)
    return extraction


def _prompt(prompt: Any) -> Prompt:
    """The prompt as a `Prompt`, or ValueError saying what is wrong with it (the input file's own checks)."""
    if isinstance(prompt, str):
        record = {"prompt": prompt}
    elif isinstance(prompt, list):
        record = {"messages": prompt}
    else:
        raise ValueError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    problems = content_problems(record)
    if problems:
        raise ValueError(f"invalid prompt: {'; '.join(problems)}")
    return Prompt(id=0, line=0, **record)
