"""`visible`: only the top-k, for endpoints where the bias reveals nothing more.

One unbiased call. The k returned tokens are exact; every other token is unrecovered,
each bounded by the smallest returned value (log p_i <= lp_k), and together they hold
at most 1 - sum(top-k probabilities) (the `unrecovered_mass_bound` column). An answer with no
logprobs at all (withheld) leaves every token unrecovered, with no bound. With targets, only the
targets get bounds; a target in the top-k is exact.
"""

from __future__ import annotations

import math


from logprob_cli.endpoints import Query
from logprob_cli.methods._base import Context, MethodResult, Plan, roundoff, still_unknown, unnamed_note, vector_from
from logprob_cli.methods._spec import MethodSpec, Needs, one_call
from logprob_cli.wording import plural


def plan(ctx: Context) -> Plan:
    (answer,) = yield [Query.make(top_logprobs=ctx.top_k)]
    logprobs = vector_from(answer, ctx.vocab_size)
    floor = min(answer.top_logprobs, default=math.nan)
    missing = still_unknown(ctx, logprobs)
    precision = 2 * roundoff(answer.top_logprobs) * max((abs(v) for v in answer.top_logprobs), default=0.0)
    if answer.top_ids:
        others = "target" if ctx.targets else "token"
        notes = [f"only the top-{len(answer.top_ids)} is identifiable here; the other {plural(missing.size, others)} {'is' if missing.size == 1 else 'are'} bounded"]
    else:
        notes = ["the endpoint returned no logprobs (withheld answer): every token is unrecovered, with no bound"]
    return MethodResult(logprobs, {int(i): floor for i in missing}, precision, {}, notes + unnamed_note(ctx))


SPEC = MethodSpec(
    "visible", plan, help="the top-k only, the rest bounded (1 call)", needs=Needs(), calls=one_call, exact_count=True,
    picked_when="the bias changes nothing", recovers_all=False,
)
