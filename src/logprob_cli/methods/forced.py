"""`forced`: one call per token where the bias steers sampling but logprobs are pre-bias.

Biasing token i by the largest allowed B makes it the generated token whenever
z_i + B > max_j z_j, and an endpoint that reports the generated token's own logprob
before the bias (llama-server, vLLM by default) then returns log p_i itself: exact, no
search. OpenAI's contract hides it (-9999 for a token outside the top-k), which the
check catches. A token that cannot be forced is more than B nats below the top:
unrecovered, with log p_i < log p_top - B.

The check: force a token of the unbiased top-k (the last one whose answer is not withheld)
and require that it is generated and reported at its unbiased value (within rounding).
A token whose answer the endpoint withholds (llama.cpp: an incomplete UTF-8 byte) is
unrecovered with no bound.
"""

from __future__ import annotations

import math

import numpy as np

from ..endpoint import EndpointUnsuitable, Query
from .base import Context, MethodResult, Plan, roundoff, vector_from


def plan(ctx: Context) -> Plan:
    k = max(ctx.top_k, 2)
    (first,) = yield [Query.make(top_logprobs=k)]
    big = ctx.bias_max
    candidates = list(zip(first.top_ids, first.top_logprobs))[::-1][:3]
    probes = yield [Query.make({i: big}, top_logprobs=k) for i, _ in candidates]
    (target, value), probe = next(
        ((c, p) for c, p in zip(candidates, probes) if not p.withheld), (candidates[0], probes[0])
    )
    if probe.sampled != target:
        raise EndpointUnsuitable(
            f"forced needs logit_bias to change the generated token, but token {target} biased by {big:+g} was not "
            "generated. Use --method topk if the returned logprobs move with the bias; otherwise only the top-k "
            "can be had (--method visible)."
        )
    if probe.sampled_logprob is None or abs(probe.sampled_logprob - value) > 1e-3 + 1e-3 * abs(value):
        shown = "withheld (-9999)" if probe.sampled_logprob is None else f"{probe.sampled_logprob:.4f}"
        raise EndpointUnsuitable(
            f"forced needs the generated token's own unbiased logprob, but forcing token {target} "
            f"(unbiased {value:.4f}) reported {shown}. Use --method bisection: the bias does steer sampling."
        )
    behaviour = {"top_logprobs_returned": len(first.top_ids), "bias_steers_sampling": True, "logprobs_after_bias": False}
    logprobs = vector_from(first, ctx.vocab_size)
    pending = np.flatnonzero(np.isnan(logprobs)).tolist()
    answers = yield [Query.make({i: big}, top_logprobs=0) for i in pending]
    bounds: dict[int, float] = {}
    withheld = 0
    top_lp = first.top_logprobs[0]
    returned = list(first.top_logprobs)
    for i, answer in zip(pending, answers):
        if answer.sampled == i and answer.sampled_logprob is not None:
            logprobs[i] = answer.sampled_logprob
            returned.append(answer.sampled_logprob)
        elif answer.withheld:
            bounds[i] = math.nan
            withheld += 1
        else:
            bounds[i] = top_lp - big
    precision = 2 * roundoff(returned) * max(abs(v) for v in returned)
    notes = []
    if len(bounds) > withheld:
        notes.append(f"{len(bounds) - withheld} tokens could not be forced (more than {big:g} nats below the top)")
    if withheld:
        notes.append(f"the endpoint withheld the logprobs of {withheld} forced tokens (incomplete UTF-8): unrecovered")
    return MethodResult(logprobs, bounds, precision, behaviour, notes)
