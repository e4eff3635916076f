"""`direct`: the whole distribution in one call, where the server returns it.

vLLM with `--max-logprobs -1` and llama.cpp's llama-server return as many top logprobs
as asked for, up to the whole vocabulary, so one unbiased call with top_logprobs = V
gives every log p_i directly (pre-bias values are exactly what is wanted here), and so does
llama-cpp-python's server for every token its text names alone (the unnamed ones stay unrecovered,
with no bound). A token the server leaves out is unrecovered, bounded by the last value returned.
With targets the same one call serves them all.
"""

from __future__ import annotations

import math


from logprob_cli.errors import Worded
from logprob_cli.endpoints import EndpointUnsuitable, Query
from logprob_cli.methods._base import Context, MethodResult, Plan, roundoff, still_unknown, unnamed_note, vector_from
from logprob_cli.methods._spec import MethodSpec, Needs, one_call
from logprob_cli.wording import plural


def plan(ctx: Context) -> Plan:
    if ctx.limits.top_logprobs < ctx.vocab_size:
        raise EndpointUnsuitable(Worded(
            "direct needs an endpoint that returns the whole vocabulary ({vocab:,} logprobs) in one call; "
            "this one is known to return at most {cap}. Use {method_auto} to probe it.",
            vocab=ctx.vocab_size, cap=ctx.limits.top_logprobs,
        ))
    (answer,) = yield [Query.make(top_logprobs=ctx.vocab_size)]
    logprobs = vector_from(answer, ctx.vocab_size)
    missing = still_unknown(ctx, logprobs)
    floor = min(answer.top_logprobs) if answer.top_logprobs else math.nan
    notes = [f"{plural(missing.size, 'token')} {'was' if missing.size == 1 else 'were'} not returned: reported as unrecovered"] if missing.size else []
    notes += unnamed_note(ctx)
    if answer.withheld and not answer.top_ids:
        notes.append("the endpoint withheld the whole answer (an incomplete UTF-8 greedy token it could not work around)")
    precision = 2 * roundoff(answer.top_logprobs) * max((abs(v) for v in answer.top_logprobs), default=0.0)
    behaviour = {"top_logprobs_returned": len(answer.top_ids)}
    return MethodResult(logprobs, {int(i): floor for i in missing}, precision, behaviour, notes)


SPEC = MethodSpec(
    "direct", plan, help="the whole vocabulary in one call (1 call)", needs=Needs(whole_vocabulary=True),
    calls=one_call, exact_count=True,
    picked_when="the whole vocabulary comes back in one call (vLLM --max-logprobs -1, llama-server)",
)
