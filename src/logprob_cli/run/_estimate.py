"""What a run will spend, before a call is spent: calls, prompt and completion tokens, US$, time.

Calls per prompt: each method's spec (methods/_spec.py; `calls` in the method's own module) says
what one prompt costs on a fresh checkpoint, and whether that count is exact on the simulator
(topk, exact, forced: a token beyond the bias limit of the top is retried) or a fit (bisection,
within 10%). The probe's recommendation and `--method`'s help read the same specs.

Per run: the endpoint's `mapping_check_calls` (2 on OpenAI-compatible endpoints), and for
`auto` the probe's calls (`probe_calls`); with `auto`, a method whose plan starts with check_bias spends one
call a prompt less (the probe's findings stand for its second call: `MethodSpec.calls_observed`). Calls here
are calls answered, as they are billed and as --max-calls counts them: the requests the endpoint rejects (the
probe's asks above the top-k cap and its limit tests) are not. Every call sends the prompt again and
generates one token, or one a choice where it draws several (`MethodSpec.extra_tokens`).
Prompt tokens per call are the endpoint's `count_prompt_tokens`: counted with the tiktoken
encoding when the vocabulary is one, with OpenAI's chat framing (3 tokens a message, its fields'
tokens, 3 more for the reply); otherwise about 4 bytes a token of the JSON sent (approximate;
the built-in simulator bills exactly this when served). `direct` on an endpoint whose one request answers
several positions of a completion (`Endpoint.positions_per_call`, vLLM's prompt_logprobs; the probe's
`positions_per_call` where it ran) costs a call a pass: ceil((n + 1) / R) for n completion tokens, not n + 1.
Time = calls / rate, rate =
min(concurrency / latency, rpm / 60, tpm / 60 / tokens per call) calls a second, at concurrency 1
where the endpoint takes `one_call_at_a_time` (llama-server). The
built-in simulator runs in-process and answers one call at a time too: its latency is timed
on this machine (`simulator_latency`), not assumed.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from logprob_cli.endpoints import Endpoint, EndpointUnsuitable, Limits, Prompt, Query
from logprob_cli.errors import Worded
from logprob_cli.run._prices import Price
from logprob_cli.methods import DEFAULT_EPS, SPECS, MethodSpec, cheapest, learning_prompts, with_image
from logprob_cli.run._positions import expand_positions
from logprob_cli.run._probe import MAX_TOP_K, ProbeReport, expected_calls
from logprob_cli.endpoints import SimulatedEndpoint

# The runner's work around each in-process simulator answer (journal, tasks, bookkeeping), in seconds:
# `python benchmarks/simulator_latency.py` measured 0.17-0.7 ms beside the answer itself on the 2-core CI box.
IN_PROCESS_BOOKKEEPING = 0.4e-3
LATENCY_SAMPLES = 100
LOCAL_LATENCY_SAMPLES = 10  # a local model's call builds its answer from a V-long vector: slower


@dataclass(frozen=True)
class Estimate:
    """One method's bill for a batch. cost is None when the price is unknown.

    calls = prompt_calls + overhead_calls (the token check and the probe, once per run); prompt_calls is
    prompts * calls_per_prompt, except with chosen tokens of different counts per prompt, where
    calls_per_prompt is the rounded mean.
    tokens_counted: prompt tokens counted with the model's tokenizer (else ~4 bytes a token).
    condition: for `auto` without a probe, when the probe picks this method ("" otherwise).
    learning_prompts: with --image auto, the prompts read whole by the base method before the image is learned
    (methods._image.learning_prompts of the rank); None: no learning, or a rank not known before the run, when
    every prompt is priced at the base method's count (the most the run can spend).
    """

    method: str
    prompts: int
    calls_per_prompt: int
    overhead_calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    seconds: float
    tokens_counted: bool
    condition: str = ""
    prompt_calls: int | None = None
    learning_prompts: int | None = None

    @property
    def calls(self) -> int:
        prompt_calls = self.prompts * self.calls_per_prompt if self.prompt_calls is None else self.prompt_calls
        return prompt_calls + self.overhead_calls

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "calls": self.calls}


def calls_per_prompt(
    method: str, vocab_size: int, top_k: int, eps: float = DEFAULT_EPS, limits: Limits = Limits(), targets: int = 0,
    image_rank: int | None = None, bias_observed: bool = False,
) -> int:
    """Calls one prompt costs with `method` (its spec's `calls`), for the whole vocabulary or `targets` chosen
    tokens (each counted as outside the top-k: a target the first call shows costs less); top_k is already
    capped by the endpoint; `image_rank`: the rank of the image an image method reads through; `bias_observed`:
    the run's probe observed the bias, so a plan starting with check_bias spends one call less (auto).

    Raises EndpointUnsuitable for topk and exact below 2 logprobs a call, ValueError for an unknown method or
    an image method without the image's rank."""
    if method not in SPECS:
        raise ValueError(f"unknown method {method!r}")
    spec = SPECS[method]
    count = spec.calls_observed if bias_observed else spec.calls
    if spec.needs.image:
        return count(vocab_size, top_k, eps, limits, targets, rank=image_rank)
    return count(vocab_size, top_k, eps, limits, targets)


def target_counts(prompts: list[Prompt]) -> list[int]:
    """How many chosen tokens each prompt asks for (0: the whole vocabulary)."""
    return [len(p.target_ids or p.targets) for p in prompts]


def probe_calls(report: ProbeReport) -> int:
    """The calls the probe gets answered on an endpoint that behaves as `report` says (probe.expected_calls)."""
    return expected_calls(report)


def duration(
    calls: int, tokens_per_call: float, concurrency: int, latency: float, rpm: float | None = None, tpm: float | None = None
) -> float:
    """Seconds for `calls`: calls / min(concurrency / latency, rpm / 60, tpm / 60 / tokens_per_call)."""
    rates = [concurrency / latency if latency > 0 else math.inf]
    if rpm:
        rates.append(rpm / 60)
    if tpm:
        rates.append(tpm / 60 / max(tokens_per_call, 1.0))
    rate = min(rates)
    return 0.0 if math.isinf(rate) else calls / rate


def estimate_run(
    prompts: list[Prompt],
    endpoint: Endpoint,
    method: str,
    *,
    top_k: int = 20,
    eps: float = 1e-3,
    concurrency: int = 16,
    latency: float = 0.5,
    rpm: float | None = None,
    tpm: float | None = None,
    price: Price | None = None,
    report: ProbeReport | None = None,
    image_rank: int | None = None,
    learn_image: bool = False,
) -> list[Estimate]:
    """The bill of running `prompts` through `method` on `endpoint` (module docstring), as extract runs it.
    Prompts with chosen tokens are priced by their count (`calls_per_prompt`), and `auto` picks for the
    largest count, as the run does. A completion of n tokens (resolved: `with_completion_ids`) is n + 1 prompts.

    For "auto", `report` (the probe's findings, where probing is free) fixes the method and its
    overhead; without one there is a row per method the probe may pick, each with its condition,
    its probe counted as on OpenAI (which rejects both limit tests; a server accepting them answers
    1-2 calls more). `image_rank`: the rank of the image an image method reads through (and `auto` runs the image
    method where that is cheaper, methods.with_image). `learn_image` (--image auto): the first
    `learning_prompts(rank)` prompts are priced at the base method's whole vector, the rest at the image method's,
    the rank being the endpoint's `image_rank` (the built-in simulator's); where it is not known before the run, every prompt
    is priced at the base method's count.
    Raises EndpointUnsuitable for `direct` where the endpoint is not known to return the whole
    vocabulary (the run would stop before its first call), ValueError for prompts the API cannot take.
    """
    prompts = expand_positions(prompts)  # a completion of n tokens: n + 1 units, each priced as a prompt
    tokens, counted = [endpoint.count_prompt_tokens(p) for p in prompts], endpoint.prompt_tokens_counted
    targets = target_counts(prompts)
    check = endpoint.mapping_check_calls
    if endpoint.one_call_at_a_time:
        concurrency = 1  # llama-server's requests go one at a time; the in-process simulator answers in turn
    vocab = endpoint.vocab_size

    rank = endpoint.image_rank if learn_image else image_rank

    def row(name: str, limits: Limits, overhead: int, condition: str = "", per_call: int = 1, observed: bool = True) -> Estimate:
        if name == "direct" and limits.top_logprobs < vocab:
            raise _direct_refusal(vocab, limits.top_logprobs)
        k = min(top_k, limits.top_logprobs)
        if method == "auto" and (image_rank is not None or learn_image):
            name = with_image(name, vocab, k, limits, eps, max(targets, default=0), rank)
        learning = learning_prompts(rank) if learn_image and rank is not None and SPECS[name].needs.image else None
        if learn_image and SPECS[name].needs.image:
            base = name.removesuffix("+image")
            warm = len(targets) if learning is None else min(learning, len(targets))
            each = [calls_per_prompt(base, vocab, k, eps, limits, 0, bias_observed=observed) for _ in targets[:warm]]
            each += [calls_per_prompt(name, vocab, k, eps, limits, n, rank, observed) for n in targets[warm:]]
        else:
            each = [calls_per_prompt(name, vocab, k, eps, limits, n, image_rank, observed) for n in targets]
        if name == "direct" and per_call > 1:  # one request a pass of per_call positions (vLLM's prompt_logprobs)
            each = [0 if p.position and p.position % per_call else c for p, c in zip(prompts, each)]
        calls = sum(each) + overhead
        prompt_tokens = sum(c * t for c, t in zip(each, tokens)) + overhead * tokens[0]
        spec = SPECS[name]
        generated = sum(spec.generated_tokens(vocab, k, eps, limits, n, c) for n, c in zip(targets, each)) + overhead
        seconds = duration(calls, (prompt_tokens + generated) / calls, concurrency, latency, rpm, tpm)
        cost = None if price is None else price.cost(prompt_tokens, generated)
        per_prompt = round(sum(each) / len(each))
        return Estimate(
            name, len(prompts), per_prompt, overhead, prompt_tokens, generated, cost, seconds, counted, condition,
            sum(each), learning,
        )

    if method != "auto":
        return [row(method, endpoint.limits, check, per_call=endpoint.positions_per_call, observed=False)]
    most = max(targets, default=0)
    if report is not None:
        picked = cheapest(report, vocab, min(report.top_logprobs_cap, MAX_TOP_K), report.limits(), eps, most)
        return [row(
            picked.name, report.limits(), check + probe_calls(report), per_call=report.positions_per_call,
            observed=report.bias_observed() is not None,
        )]
    return [
        row(spec.name, expected.limits(), check + probe_calls(expected), spec.picked_when, expected.positions_per_call)
        for spec, expected in _pickable(endpoint, eps, most)
    ]


def _direct_refusal(vocab: int, cap: int) -> EndpointUnsuitable:
    """Why `direct` cannot run where the endpoint returns at most `cap` < `vocab` logprobs a call."""
    return EndpointUnsuitable(Worded(
        "direct needs an endpoint known to return the whole vocabulary ({vocab:,} logprobs) in one call; "
        "this one returns at most {cap}: use {method_auto} to probe it", vocab=vocab, cap=cap,
    ))


def _pickable(endpoint: Endpoint, eps: float, most: int) -> list[tuple[MethodSpec, ProbeReport]]:
    """The methods `auto`'s probe may pick on `endpoint` for prompts of up to `most` chosen tokens, each with
    the report that picks it (`_picking`), in SPECS order."""
    vocab = endpoint.vocab_size
    found = endpoint.limits.top_logprobs  # the probe learns the cap; where it is the vocabulary, auto picks direct
    picks = []
    for spec in SPECS.values():
        expected = _picking(spec, vocab, found, endpoint.limits.token_ids, endpoint.positions_per_call, endpoint.limits.draws)
        if spec.needs.chosen_ids and not expected.chosen_ids:
            continue
        if spec.picked_when and cheapest(expected, vocab, min(found, MAX_TOP_K), expected.limits(), eps, most) is spec:
            picks.append((spec, expected))
    return picks


def _picking(spec: MethodSpec, vocab: int, found: int, listed: int, positions: int = 1, draws: int = 1) -> ProbeReport:
    """The probe's report on an endpoint that meets exactly what `spec` needs, its cap `found` (the vocabulary
    where the spec needs it): the bias steers sampling where the method recovers every token and changes
    nothing otherwise, both limit tests rejected (as on OpenAI), a list of up to `listed` ids taken
    where the spec needs it and the endpoint declares it (0: it does not), and `positions` of a completion a
    request (the endpoint's `positions_per_call`) where the spec needs the whole vocabulary, and the choices a request
    may draw as the endpoint declares them (`draws`, which the probe tests: one call)."""
    needs = spec.needs
    return ProbeReport(
        positions_per_call=positions if needs.whole_vocabulary else 1,
        chosen_ids=needs.chosen_ids and listed > 0,
        token_ids_cap=listed if needs.chosen_ids else 0,
        top_logprobs_cap=vocab if needs.whole_vocabulary else found,
        whole_vocabulary=needs.whole_vocabulary,
        bias_steers_sampling=spec.recovers_all,
        logprobs_after_bias=needs.logprobs_after_bias,
        forced_logprob="reported" if needs.forced_logprob_reported else "sentinel",
        bias_above_100="rejected",
        bias_entries_over_300="rejected",
        draws=draws,
        draws_tested=draws > 1,
    )


def simulator_latency(endpoint: SimulatedEndpoint, prompt: Prompt, top_k: int) -> float:
    """Seconds one call of the in-process simulator takes in a run, on this machine: its answer to a
    typical query (k-1 tokens lifted by the largest bias, as topk, exact and forced lift them; the
    top-k asked) timed over a few calls, plus the runner's
    bookkeeping (IN_PROCESS_BOOKKEEPING). The calls go to a twin of `endpoint`, so its count is untouched."""
    twin = SimulatedEndpoint(endpoint.config, endpoint.system)
    queries = _typical_queries(endpoint, top_k, LATENCY_SAMPLES)
    twin.answer(prompt, queries[0])  # the prompt's logits are computed once, then cached, as in a run
    start = time.perf_counter()
    for query in queries:
        twin.answer(prompt, query)
    return (time.perf_counter() - start) / LATENCY_SAMPLES + IN_PROCESS_BOOKKEEPING


def in_process_latency(endpoint: Endpoint, prompt: Prompt, top_k: int) -> tuple[float, float]:
    """(seconds of a first call, seconds of each call after it) of an in-process endpoint that reads a text once
    and answers the calls on it from what it read (a local model: one forward pass a text, its positions
    included), timed on this machine through its own `ask` with typical queries (`simulator_latency`), plus
    the runner's bookkeeping."""
    queries = _typical_queries(endpoint, top_k, LOCAL_LATENCY_SAMPLES + 1)

    async def timed() -> tuple[float, float]:
        start = time.perf_counter()
        await endpoint.ask(prompt, queries[0])
        first = time.perf_counter() - start
        start = time.perf_counter()
        for query in queries[1:]:
            await endpoint.ask(prompt, query)
        await endpoint.aclose()
        return first, (time.perf_counter() - start) / LOCAL_LATENCY_SAMPLES + IN_PROCESS_BOOKKEEPING

    return asyncio.run(timed())


def _typical_queries(endpoint: Endpoint, top_k: int, n: int) -> list[Query]:
    """`n` distinct typical queries: k-1 tokens lifted by the largest bias, the top-k asked."""
    vocab, k = endpoint.vocab_size, min(top_k, endpoint.limits.top_logprobs)
    entries = min(k - 1, endpoint.limits.bias_entries)
    return [
        Query.make({(i * 7919 + j * 104_729) % vocab: endpoint.limits.bias_max for j in range(entries)}, top_logprobs=k)
        for i in range(n)
    ]


def format_count(n: int) -> str:
    """A count that fits a narrow column: 10,224 or 19.64M."""
    return f"{n:,}" if n < 1_000_000 else f"{n / 1e6:,.2f}M"


def format_dollars(cost: float | None) -> str:
    """US$ with cents, or 4 decimals below a dollar; the unknown price says how to give one."""
    if cost is None:
        return "unknown (give --price)"
    return f"{cost:,.2f}" if cost >= 1 else f"{cost:.4f}"


def format_duration(seconds: float) -> str:
    """Seconds as a person reads them: 42 s, 12 min, 3.4 h, 2.1 days."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} days"


