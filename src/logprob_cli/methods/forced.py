"""`forced`: one call per token where the bias steers sampling but logprobs are pre-bias.

Biasing token i by the largest allowed B makes it the generated token whenever
z_i + B > max_j z_j, and an endpoint that reports the generated token's own logprob
before the bias (llama-server, vLLM by default) then returns log p_i itself: exact, no
search. OpenAI's contract hides it (-9999 for a token outside the top-k), which the
check catches. A token that cannot be forced is more than B nats below the top:
unrecovered, with log p_i < log p_top - B.

The check: force the last token of the unbiased top-k and require that it is generated
and reported at its unbiased value (within float rounding).
"""

from __future__ import annotations

import numpy as np

from ..endpoint import EndpointUnsuitable, Query
from .base import Context, MethodResult, Plan, roundoff


def plan(ctx: Context) -> Plan:
    k = max(ctx.top_k, 2)
    (first,) = yield [Query.make(top_logprobs=k)]
    big = ctx.bias_max
    target, value = first.top_ids[-1], first.top_logprobs[-1]
    (probe,) = yield [Query.make({target: big}, top_logprobs=k)]
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
    logprobs = np.full(ctx.vocab_size, np.nan)
    logprobs[list(first.top_ids)] = first.top_logprobs
    pending = np.flatnonzero(np.isnan(logprobs)).tolist()
    answers = yield [Query.make({i: big}, top_logprobs=0) for i in pending]
    bounds = {}
    top_lp = first.top_logprobs[0]
    returned = list(first.top_logprobs)
    for i, answer in zip(pending, answers):
        if answer.sampled == i and answer.sampled_logprob is not None:
            logprobs[i] = answer.sampled_logprob
            returned.append(answer.sampled_logprob)
        else:
            bounds[i] = top_lp - big
    precision = 2 * roundoff(returned) * max(abs(v) for v in returned)
    notes = [f"{len(bounds)} tokens could not be forced (more than {big:g} nats below the top)"] if bounds else []
    return MethodResult(logprobs, bounds, precision, behaviour, notes)
