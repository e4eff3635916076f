"""`probe`: a handful of calls that measure what an endpoint reveals, and the method that fits.

Measured, in this order (13 calls on the simulator, two of them rejected on purpose):
  1. the top_logprobs cap it honours: ask for the whole vocabulary, then 20, then 5;
  2. with token t = the last visible one, biased to beat the top by 2 nats: whether the
     bias steers sampling (t is generated) and whether the returned logprobs are after
     the bias (lp'_t - lp'_top moved by the bias) or before it;
  3. a token outside the top-k forced with the largest bias: is its own logprob reported
     (and is it its unbiased value), or withheld with the -9999 sentinel;
  4. whether a bias above 100 and more than 300 bias entries are rejected;
  5. returned precision (bfloat16 grid or float32), determinism of identical calls, whether
     a call sent alongside others (a server that batches them) answers as it does alone,
     and how tokens are identified (server ids, bytes, strings).
Then the cheapest valid method: the whole vocabulary in one call (`direct`); k-1 new
values per call where logprobs are post-bias (`topk`); one call per token where a forced
token reports its own pre-bias logprob (`forced`); argmax search where only sampling
responds (`bisection`); else only the top-k (`visible`).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .endpoint import Endpoint, EndpointError, EndpointFatal, Limits, Prompt, Query
from .methods.base import BFLOAT16_ROUNDOFF, bias_response, probe_ranks, roundoff

BISECTION_CALLS_PER_TOKEN = 2.5  # benchmarks/calls_per_prompt.py at eps 1e-3 (README); for the estimate only


@dataclass
class ProbeReport:
    top_logprobs_cap: int = 0
    whole_vocabulary: bool = False
    bias_steers_sampling: bool = False
    logprobs_after_bias: bool = False
    forced_logprob: str = "untested"  # reported | sentinel | wrong | untested
    bias_above_100: str = "untested"  # rejected | accepted
    bias_entries_over_300: str = "untested"  # rejected | accepted
    precision: str = "float32"
    deterministic: bool = True
    concurrent_agree: bool = True
    identity: list[str] = field(default_factory=list)
    vocab_size: int = 0
    calls: int = 0
    recommended: str = "visible"
    estimated_calls: int = 1
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "ProbeReport":
        return ProbeReport(**data)

    def limits(self) -> Limits:
        """The request limits the probe found (bias range and entry cap as documented where not rejected)."""
        return Limits(top_logprobs=self.top_logprobs_cap, bias_max=100.0, bias_entries=300)


async def probe(endpoint: Endpoint, prompt: Prompt) -> ProbeReport:
    """Measure the endpoint on one prompt (see module docstring). Raises EndpointFatal if it cannot be reached."""
    report = ProbeReport(vocab_size=endpoint.vocab_size)

    async def ask(query: Query):
        report.calls += 1
        return await endpoint.ask(prompt, query)

    first = None
    for cap in (endpoint.vocab_size, 20, 5):
        try:
            first = await ask(Query.make(top_logprobs=cap))
            break
        except EndpointFatal:
            raise
        except EndpointError:
            continue
    if first is None or not first.top_ids:
        report.reasons.append("the endpoint returned no top logprobs at any of vocab size, 20, 5")
        report.recommended, report.estimated_calls = "visible", 1
        return report
    report.top_logprobs_cap = len(first.top_ids)
    report.whole_vocabulary = len(first.top_ids) >= endpoint.vocab_size
    k = min(report.top_logprobs_cap, 20)
    head = await ask(Query.make(top_logprobs=k))
    again = await ask(Query.make(top_logprobs=k))
    report.deterministic = head == again
    together = await asyncio.gather(*(ask(Query.make({i: 1.0}, top_logprobs=k)) for i in head.top_ids[:4]))
    alone = await ask(Query.make({head.top_ids[0]: 1.0}, top_logprobs=k))
    report.concurrent_agree = together[0] == alone
    if roundoff(list(head.top_logprobs)) == BFLOAT16_ROUNDOFF:
        report.precision = "bfloat16"

    held = getattr(endpoint, "withheld_tokens", frozenset())  # their answers come back empty: never probe with them
    if len(head.top_ids) >= 2:
        rank = probe_ranks(head, held)[0]
        target = head.top_ids[rank]
        b = min(100.0, head.top_logprobs[0] - head.top_logprobs[rank] + 2.0)
        moved = await ask(Query.make({target: b}, top_logprobs=k))
        report.bias_steers_sampling, report.logprobs_after_bias = bias_response(head, moved, target, b)
    if report.bias_steers_sampling:
        outside = next(i for i in range(endpoint.vocab_size) if i not in set(first.top_ids[:k]) and i not in held)
        forced = await ask(Query.make({outside: 100.0}, top_logprobs=k))
        if forced.sampled != outside:
            report.forced_logprob = "untested"
        elif forced.sampled_logprob is None:
            report.forced_logprob = "sentinel"
        elif report.logprobs_after_bias or forced.sampled_logprob > head.top_logprobs[-1] + 1e-3:
            report.forced_logprob = "wrong"
        else:
            report.forced_logprob = "reported"
    report.bias_above_100 = await _accepted(ask, Query.make({head.top_ids[-1]: 101.0}, top_logprobs=1))
    report.bias_entries_over_300 = await _accepted(ask, Query.make({i: 1e-3 for i in range(301)}, top_logprobs=1))
    report.identity = sorted(getattr(endpoint, "identity", {"ids"}))
    _recommend(report, endpoint.vocab_size)
    return report


async def _accepted(ask, query: Query) -> str:
    try:
        await ask(query)
    except EndpointFatal:
        raise
    except EndpointError:
        return "rejected"
    return "accepted"


def _recommend(report: ProbeReport, vocab: int) -> None:
    k = min(report.top_logprobs_cap, 20)
    if report.whole_vocabulary:
        report.recommended, report.estimated_calls = "direct", 1
        report.reasons.append("the whole vocabulary comes back in one call")
    elif report.logprobs_after_bias and k >= 2:
        report.recommended, report.estimated_calls = "topk", math.ceil((vocab - k) / (k - 1)) + 2
        report.reasons.append("returned logprobs move with the bias")
    elif report.bias_steers_sampling and report.forced_logprob == "reported":
        report.recommended, report.estimated_calls = "forced", vocab - k + 2
        report.reasons.append("a forced token reports its own unbiased logprob")
    elif report.bias_steers_sampling:
        report.recommended = "bisection"
        report.estimated_calls = math.ceil(BISECTION_CALLS_PER_TOKEN * vocab)
        why = "withheld (-9999)" if report.forced_logprob == "sentinel" else "not reported"
        report.reasons.append(f"the bias steers sampling but logprobs are pre-bias and a forced token's own is {why}")
    else:
        report.recommended, report.estimated_calls = "visible", 1
        report.reasons.append("the bias changes nothing: only the top-k can be learned, the rest is bounded")
    if not report.deterministic:
        report.reasons.append("identical calls gave different answers: expect near-tie noise")
    elif not report.concurrent_agree:
        report.reasons.append(
            "a call answered alongside others differs from the same call alone (the server batches requests): "
            "auto runs one call at a time"
        )
    if "strings" in report.identity:
        report.reasons.append("tokens come back as strings only: distinct tokens with the same string merge")
