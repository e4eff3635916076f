"""`listed`: the logprobs of chosen ids, read directly, where a request may list them.

vLLM's `logprob_token_ids` returns the logprob of every id a request lists (up to
`limits.token_ids` of them), whatever their rank: with no bias sent, these are the unbiased
log p_i themselves. So n targets cost ceil(n / limits.token_ids) calls (one, for any target set
within the cap). The generated token's own logprob comes too (at temperature 0, the top token),
and the top-k where the endpoint returns it beside the listed ids (`limits.top_with_token_ids`;
vLLM lists them in its place). Without targets the whole vocabulary is listed,
limits.token_ids ids a call. An id the server leaves out of its answer is unrecovered, with no bound.

Error: the values are the engine's own, rounded once: 2 unit roundoffs of the largest magnitude.
"""

from __future__ import annotations

import math

import numpy as np

from logprob_cli.errors import Worded
from logprob_cli.endpoints import EndpointUnsuitable, Limits, Query
from logprob_cli.methods._base import Context, MethodResult, Plan, chunks, roundoff, still_unknown
from logprob_cli.methods._spec import MethodSpec, Needs
from logprob_cli.wording import plural


def plan(ctx: Context) -> Plan:
    per_call = _per_call(ctx.limits)
    wanted = list(ctx.targets) or range(ctx.vocab_size)
    k = ctx.top_k if ctx.limits.top_with_token_ids else 0
    answers = yield [Query.make(top_logprobs=k, token_ids=group) for group in chunks(wanted, per_call)]
    logprobs = np.full(ctx.vocab_size, np.nan)
    returned: list[float] = []
    for answer in answers:
        if not answer.withheld and answer.sampled_logprob is not None:
            logprobs[answer.sampled] = answer.sampled_logprob
        logprobs[list(answer.top_ids)] = answer.top_logprobs
        returned.extend(answer.top_logprobs)
    missing = still_unknown(ctx, logprobs)
    notes = [f"{plural(missing.size, 'listed token')} not returned by the endpoint: unrecovered"] if missing.size else []
    precision = 2 * roundoff(returned) * max((abs(v) for v in returned), default=0.0)
    behaviour = {"token_ids_per_call": per_call}
    return MethodResult(logprobs, {int(i): math.nan for i in missing}, precision, behaviour, notes)


def _per_call(limits: Limits) -> int:
    """The ids one request may list; raises EndpointUnsuitable where the endpoint takes no list."""
    if limits.token_ids < 1:
        raise EndpointUnsuitable(Worded(
            "listed needs an endpoint that returns the logprobs of the token ids a request lists (vLLM's "
            "logprob_token_ids); this one is not known to. Use {method_auto} to probe it."
        ))
    return limits.token_ids


def calls(vocab_size: int, top_k: int, eps: float, limits: Limits, targets: int = 0) -> int:
    """ceil(n / L), n = the targets (or V), L = the ids a request may list. Exact."""
    return math.ceil((targets or vocab_size) / _per_call(limits))


SPEC = MethodSpec(
    "listed", plan, help="the chosen ids' own logprobs, listed in the request (1 call for up to L targets)",
    needs=Needs(chosen_ids=True), calls=calls, exact_count=True,
    picked_when="a request may list token ids whose logprobs come back (vLLM's logprob_token_ids)",
)
