"""`topk`: the reference-token method (Carlini et al. 2024), k-1 new tokens per call.

Two tokens under the same bias keep their log-probability difference, because the
normalizer cancels:   log p_i - log p_r = lp'_i - lp'_r   (b_i = b_r).
More generally, for any two visible tokens with biases b_i, b_r:
    log p_i = log p_r + (lp'_i - b_i) - (lp'_r - b_r).

The reference r is the unbiased argmax, whose log p_r the first (unbiased) call returns.
Each call biases r and k-1 unknown tokens by the largest allowed bias B, so every token
within B nats of the top enters the top-k, and reads k-1 values. A token that stays out
of sight was outranked by an unbiased token (an "intruder"): it is retried with those
intruders pushed down by -B, for a bounded number of rounds. A token still invisible is
unrecovered, with the bound the last answer proves (e = the last visible entry):
    log p_i <= log p_r + (lp'_e - b_e) - (lp'_r - b_r) + b_e - b_i.

With targets, only the targets the first call did not show are read: ceil(n / (k-1)) calls
for n of them, after the check.

Error: each value is a difference of two returned numbers, each rounded by the engine
near magnitude |z + B|; the reported precision is 2 unit roundoffs of the largest such
magnitude (about 2e-5 nats at B = 100 in float32; measured errors stay below 1e-5).
"""

from __future__ import annotations

import math

import numpy as np

from typing import Generator

from logprob_cli.endpoints import Answer, Limits, Query
from logprob_cli.methods._base import Context, MethodResult, Plan, check_bias, chunks, roundoff, still_unknown, vector_from
from logprob_cli.methods._spec import MethodSpec, Needs, at_least_two
from logprob_cli.wording import plural

RETRY_ROUNDS = 3


def plan(ctx: Context, method: str = "topk") -> Plan:
    """The plan (module doc); `method` names the method in the check's messages (exact reuses this plan)."""
    first, behaviour = yield from check_bias(ctx, needs="post_bias", method=method)
    logprobs = vector_from(first, ctx.vocab_size)
    returned: list[float] = list(first.top_logprobs)
    pending = still_unknown(ctx, logprobs).tolist()
    bounds = yield from reference_rounds(ctx, first, pending, logprobs, returned)
    precision = 2 * roundoff(returned) * (ctx.bias_max + max(abs(v) for v in returned))
    notes = []
    if bounds:
        notes.append(
            f"{plural(len(bounds), 'token')} stayed out of the top-{len(first.top_ids)} at bias {ctx.bias_max:g}: "
            "reported as unrecovered"
        )
    return MethodResult(logprobs, bounds, precision, behaviour, notes)


def reference_rounds(
    ctx: Context, first: Answer, pending: list[int], logprobs: np.ndarray, returned: list[float]
) -> Generator[list[Query], list[Answer], dict[int, float]]:
    """Read `pending` tokens k-1 per call beside the reference (the unbiased argmax of `first`).

    Fills logprobs[i] for every token seen; retries the rest with the intruders that outranked
    them pushed down, at most RETRY_ROUNDS times; returns the proven upper bound (NaN if none)
    of each token never seen. `returned` collects every value read, for the precision estimate.
    """
    k = len(first.top_ids)
    ref, ref_lp = first.top_ids[0], first.top_logprobs[0]
    big = ctx.bias_max
    pushed: set[int] = set()
    bounds: dict[int, float] = {}
    for _ in range(1 + RETRY_ROUNDS):
        size = min(k - 1, ctx.limits.bias_entries - len(pushed) - 1)
        if not pending or size < 1:
            break
        groups = chunks(pending, size)
        queries = [Query.make({ref: big, **{i: big for i in g}, **{j: -big for j in pushed}}, k) for g in groups]
        answers = yield queries
        missing: list[int] = []
        for group, query, answer in zip(groups, queries, answers):
            seen = answer.top()
            returned.extend(answer.top_logprobs)
            if ref not in seen:
                missing.extend(group)
                continue
            base = ref_lp - (seen[ref] - big)
            last = answer.top_ids[-1]
            last_bias = query.bias_dict().get(last, 0.0)
            for i in group:
                if i in seen:
                    logprobs[i] = base + seen[i] - big
                    bounds.pop(i, None)
                else:
                    missing.append(i)
                    bounds[i] = base + (seen[last] - last_bias) + last_bias - big
            pushed.update(j for j in answer.top_ids if j not in group and j != ref)
        pending = missing
    return {i: bounds.get(i, math.nan) for i in pending}


def calls(vocab_size: int, top_k: int, eps: float, limits: Limits, targets: int = 0) -> int:
    """2 + ceil(n / (k - 1)), n = V - k (or the targets outside the top-k): the 2-call check, then k-1 new
    tokens a call. Exact where every token lies within the bias limit of the top (true at OpenAI's 100);
    one beyond it is retried, up to RETRY_ROUNDS more rounds. Raises EndpointUnsuitable for k < 2."""
    at_least_two("topk", top_k)
    return 2 + math.ceil((targets or vocab_size - top_k) / (top_k - 1))


SPEC = MethodSpec(
    "topk", plan, help="k-1 tokens per call against a reference token (2 + (V-k)/(k-1) calls)",
    needs=Needs(logprobs_after_bias=True, min_top_k=2), calls=calls, exact_count=True,
    picked_when="returned logprobs move with the bias",
    checks_bias=True,
)
