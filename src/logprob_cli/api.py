"""The Python API: `extract_logprobs`, one prompt at a time (notebooks: no journal, no files), and
`extract_file`, a JSONL file of prompts into Parquet with its checkpoint, as `logprobs extract` does."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Sequence, TypeVar

import numpy as np

from logprob_cli.run import MeteredEndpoint, Spend
from logprob_cli.endpoints import Answer, Endpoint, Prompt, Query
from logprob_cli.io import content_problems, image_setting, with_targets
from logprob_cli.methods import METHODS, Context, Image, MethodResult, cheapest, with_image
from logprob_cli.run import ProbeReport, probe
from logprob_cli.endpoints import EndpointSettings, SettingsError, build_endpoint, with_served_model
from logprob_cli.run import discard
from logprob_cli.run import Price
from logprob_cli.run import RunConfig, default_output, price_of_calls, read_batch
from logprob_cli.run import Progress, RunSummary, extract_batch, resolve_targets
from logprob_cli.wording import top_k_capped

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """One chosen token's value: `logprob` (None where the endpoint cannot reveal it, then `upper_bound` is the
    bound the answers prove, None if none), and `precision`, the bound on its error in nats (None where unread)."""

    token_id: int
    token: str
    logprob: float | None
    upper_bound: float | None
    precision: float | None


@dataclass
class Extraction:
    """One prompt's full vector: `logprobs[i]` is log p(token i) (NaN where unrecovered).

    calls counts every call spent, the probe's included; method is the method that ran
    (the probe's choice when method="auto", its image method where an image is given and that is cheaper), probe the probe's report (None unless auto).
    targets: with chosen tokens, each one's value in the order given (the vector then holds them and what
    the calls showed besides, NaN elsewhere).
    """

    logprobs: np.ndarray
    calls: int
    result: MethodResult
    method: str = ""
    probe: ProbeReport | None = None
    targets: list[Target] = dataclasses.field(default_factory=list)


def extract_logprobs(
    prompt: str | list[dict[str, Any]],
    method: str = "auto",
    endpoint: Endpoint | None = None,
    top_k: int = 20,
    eps: float = 1e-3,
    concurrency: int = 16,
    *,
    targets: Sequence[str | int] = (),
    image: str | os.PathLike | Image | None = None,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    tokenizer: str | None = None,
    **endpoint_options: Any,
) -> Extraction:
    """Extract the full next-token distribution of one prompt (text, or chat messages), or with `targets`
    (token texts, each exactly one token of the vocabulary by bytes, and/or token ids) those tokens' logprobs
    at a cost that grows with the targets (`Extraction.targets`); auto then picks the cheapest method for them.

    method "auto" (the default, as in the CLI) probes the endpoint first and runs the method it
    recommends. The endpoint is `endpoint` if given, else the one `model`, `base_url`, `api_key`,
    `tokenizer` and `endpoint_options` (the other fields of EndpointSettings: api, system,
    extra_body, post_bias, simulator, rpm, tpm, timeout, retries, max_draws) describe; with none of them, the
    built-in simulator answers. A top_k above the endpoint's cap is lowered to it with a
    UserWarning. `image` (an Image, or a file io.load_image reads: a .npy/.npz matrix or a GGUF
    model) is the model's image, which the methods topk+image and forced+image need (methods/_image.py).
    Raises ValueError for an empty or malformed prompt or a setting out of range or contradicting
    another (SettingsError), or an image file that cannot be used (ImageError), before any completion; EndpointFatal when a base_url
    server cannot be reached; EndpointUnsuitable when the endpoint cannot support the method,
    EndpointError when a call fails.
    """
    item = _prompt(prompt)
    if targets:
        (item,) = with_targets([item], list(targets))
    if isinstance(image, str) and image == "auto":
        raise SettingsError("image='auto' learns the image from a batch's first whole vectors; one prompt has none "
                            "to learn from: give extract_file image='auto', or an image here")
    run = RunConfig(method, top_k, eps, concurrency, image=image_setting(image))  # checked before the endpoint is built
    settings = _settings(endpoint, model, base_url, api_key, tokenizer, endpoint_options)
    endpoint = endpoint or _outside_event_loop(lambda: build_endpoint(settings))  # it may ask GET /models

    extraction, note = _outside_event_loop(lambda: asyncio.run(_extract_and_close(endpoint, item, run)))
    if note:
        warnings.warn(note, stacklevel=2)
    return extraction


async def _extract_and_close(endpoint: Endpoint, item: Prompt, run: RunConfig) -> tuple[Extraction, str | None]:
    """_extract, then the endpoint closed, however the extraction ended."""
    try:
        return await _extract(endpoint, item, run)
    finally:
        await endpoint.aclose()


async def _extract(endpoint: Endpoint, item: Prompt, run: RunConfig) -> tuple[Extraction, str | None]:
    """One prompt through the run's method (for "auto", the method the probe recommends): the Extraction, and
    the note to warn with when top_k was lowered to the endpoint's cap (None when it was not)."""
    method, top_k, eps = run.method, run.top_k, run.eps
    if item.targets:
        (item,) = await resolve_targets(endpoint, [item])
    counted = MeteredEndpoint(endpoint, Spend(), price=None)  # counts the calls answered, caps none
    report = await probe(counted, item) if method == "auto" else None
    chosen, limits = (report.recommended, report.limits()) if report else (method, endpoint.limits)
    k = min(top_k, limits.top_logprobs)
    if report and item.targets:
        chosen = cheapest(report, endpoint.vocab_size, k, limits, eps, len(item.target_ids)).name
    if report and run.image is not None:  # an Image: "auto" is refused for one prompt
        chosen = with_image(chosen, endpoint.vocab_size, k, limits, eps, len(item.target_ids), run.image.rank)
    ctx = Context(
        endpoint.vocab_size, limits, top_k=k, eps=eps, withheld=await counted.withheld_tokens(), targets=item.target_ids,
        image=run.image, unnamed=counted.unnamed_tokens(), bias_observed=report.bias_observed() if report else None,
    )
    result = await _run_plan(METHODS[chosen](ctx), counted, item, run.concurrency)
    extraction = Extraction(
        result.logprobs, counted.spent.calls, result, chosen, report, _targets(endpoint, item.target_ids, result)
    )
    return extraction, top_k_capped(top_k, limits.top_logprobs)


def _targets(endpoint: Endpoint, ids: tuple[int, ...], result: MethodResult) -> list[Target]:
    """Each chosen token's value from the result: its logprob, or the bound where it was not recovered."""
    return [Target(i, endpoint.token_text(i), *result.reading(i)) for i in ids]


async def _run_plan(
    plan: Generator[list[Query], list[Answer], MethodResult], endpoint: Endpoint, item: Prompt, concurrency: int
) -> MethodResult:
    """Drive a method's plan on one prompt: every batch of queries it yields is asked at once (at most
    `concurrency` calls in flight) and its answers, in the queries' order, sent back, until it returns its result."""
    gate = asyncio.Semaphore(concurrency)

    async def ask(query: Query) -> Answer:
        async with gate:
            return await endpoint.ask(item, query)

    queries = next(plan)
    while True:
        answers = list(await asyncio.gather(*(ask(query) for query in queries)))
        try:
            queries = plan.send(answers)
        except StopIteration as stop:
            return stop.value


def extract_file(
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    method: str = "auto",
    endpoint: Endpoint | None = None,
    *,
    top_k: int = 20,
    eps: float = 1e-3,
    concurrency: int = 16,
    price: Price | None = None,
    max_calls: int | None = None,
    max_cost: float | None = None,
    shard: tuple[int, int] | None = None,
    fresh: bool = False,
    progress: Progress | None = None,
    targets: Sequence[str | int] = (),
    store_vector: bool = False,
    store: str = "vector",
    image: str | os.PathLike | Image | None = None,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    tokenizer: str | None = None,
    **endpoint_options: Any,
) -> RunSummary:
    """`logprobs extract` from Python: every prompt of a JSONL file into Parquet, with its checkpoint.

    Writes `output` (default: the input's name with .parquet, or .shard-I-of-N.parquet) and its
    checkpoint NAME.checkpoint.sqlite beside it; the same call again resumes from the checkpoint,
    spending only what is left (`fresh=True` discards both first, only if the tool wrote them).
    The endpoint, method and settings are those of extract_logprobs, and `image` may also be "auto": learn the image
    from the batch's first whole vectors, then run the image method (run/_learning.py); `price` (US$ per 1M prompt
    and completion tokens, default: the built-in table) with `max_cost`, and `max_calls`, cap what the checkpoint
    spends in all; `shard=(I, N)` takes part I of N of the prompts; `targets` asks every prompt for those chosen
    tokens (as a line's "targets" key does; `store_vector` also keeps their whole vectors); `store="top:N"` writes
    each row's N most likely tokens and the rest mass instead of the vector (with targets: how many top entries a
    row keeps). Returns the RunSummary (finished, calls, failures by prompt id, budget_reached, interrupted).
    Raises, before any call: ValueError (a setting, SettingsError included; ImageError), InputError (every problem
    of the input), Refused (an output or checkpoint the tool may not write); later JournalError,
    EndpointUnsuitable, EndpointError, as runner.extract_batch.
    """
    input = os.fspath(input)
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (I, N) with 0 <= I < N, got {shard!r}")
    run = RunConfig(method, top_k, eps, concurrency, price, max_calls, max_cost, store_vector, store, image_setting(image))
    settings = _settings(endpoint, model, base_url, api_key, tokenizer, endpoint_options)
    path = Path(output) if output is not None else default_output(input, shard)
    batch = read_batch(input, path, shard, settings.api if settings.model else None)
    if targets:
        batch = dataclasses.replace(
            batch, prompts=with_targets(batch.prompts, list(targets), input),
            all_prompts=with_targets(batch.all_prompts, list(targets), input),
        )
    priced_model = settings.model if endpoint is None else endpoint.model  # None: the built-in simulator
    endpoint = endpoint or _outside_event_loop(lambda: build_endpoint(settings))  # it may ask GET /models
    run = dataclasses.replace(run, price=price_of_calls(priced_model, endpoint.model, price, max_cost))
    if fresh:
        discard(path, batch.checkpoint)
    return _outside_event_loop(lambda: extract_batch(
        batch.prompts, path, endpoint, run, progress, schema_prompts=batch.all_prompts
    ))


def _settings(
    endpoint: Endpoint | None, model: str | None, base_url: str | None, api_key: str | None, tokenizer: str | None,
    options: dict[str, Any],
) -> EndpointSettings:
    """The endpoint settings of an API call; ValueError when an `endpoint` object comes with settings too."""
    settings = EndpointSettings(model=model, base_url=base_url, api_key=api_key, tokenizer=tokenizer, **options)
    if endpoint is not None and settings != EndpointSettings():
        raise ValueError("give an endpoint object or endpoint settings (model, base_url, ...), not both")
    return _outside_event_loop(lambda: with_served_model(settings))  # a base_url alone: the model it serves


def _outside_event_loop(call: Callable[[], T]) -> T:
    """call(), which runs its own event loop: here, or in a worker thread when this thread already runs one
    (a Jupyter cell)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return call()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


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
