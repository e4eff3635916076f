"""`exact`: k new tokens per call through the group normalizer (Finlayson et al. 2024).

Bias a group S of unknown tokens (bias b_i on i) and read all of them. With
q = 1 - sum_S p'_i (the mass left outside the group) and A = sum_S exp(lp'_i - b_i),

    log p_i = lp'_i - b_i + log D,        log D = -log(q + A),

(D = sum_j p_j exp(b_j) is the biased normalizer over the unbiased one). q is computed as
-expm1(logsumexp(lp'_S)), without cancellation. Its error is the trouble: an engine
computes log-softmax in float32, so the returned lp' carry an absolute error of about
u log2(V) (u = 2^-24) in their shared normalizer, and log D inherits

    err ~ 2 u log2(V) (1 - q) / (q + A),

which explodes when the group's biased mass rounds toward 1. That happens whenever one
bias must lift a group whose logits spread over many nats into the top-k: on a float32
engine that is nearly every group of random tokens (measured: no group of 20 random
tokens of a 100k vocabulary resolves; see README).

So each group's normalizer is used only where that estimate is below ACCEPT_ERROR.
Otherwise the group still gives exact *relative* values (identity 1: same bias, the
normalizer cancels), and it is anchored through its leader (highest member): a second
stage puts k-1 leaders beside the reference token r (the unbiased argmax, known) under
one bias and reads log p_leader = log p_r + lp'_leader - lp'_r. That costs one slot per
group, not a second pass over the vocabulary.

Tokens a group call leaves out of sight (outranked by unbiased "intruders") are retried
with the intruders pushed down, for a bounded number of rounds, then reported as
unrecovered with the bound the answers prove.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..endpoint import Query
from .base import Context, MethodResult, Plan, check_bias, chunks, roundoff, vector_from

ACCEPT_ERROR = 1e-5
RETRY_ROUNDS = 3


@dataclass
class _Group:
    """Members known relative to a leader: log p_i = log p_leader + offset[i]."""

    leader: int
    offset: dict[int, float] = field(default_factory=dict)
    bound: dict[int, float] = field(default_factory=dict)  # invisible members: log p_i <= log p_leader + bound


def plan(ctx: Context) -> Plan:
    first, behaviour = yield from check_bias(ctx, needs="post_bias", method="exact")
    k = len(first.top_ids)
    logprobs = vector_from(first, ctx.vocab_size)
    ref, ref_lp = first.top_ids[0], first.top_logprobs[0]
    big = ctx.bias_max
    log2v = math.log2(ctx.vocab_size)
    u = roundoff(first.top_logprobs)
    returned: list[float] = list(first.top_logprobs)
    errors: list[float] = []

    pending = np.flatnonzero(np.isnan(logprobs)).tolist()
    pushed: set[int] = set()
    floating: list[_Group] = []
    resolved_by_normalizer = 0
    group_calls = 0
    for _ in range(1 + RETRY_ROUNDS):
        size = min(k, ctx.limits.bias_entries - len(pushed))
        if not pending or size < 1:
            break
        groups = chunks(pending, size)
        queries = [Query.make({**{i: big for i in g}, **{j: -big for j in pushed}}, k) for g in groups]
        answers = yield queries
        group_calls += len(queries)
        missing: list[int] = []
        for group, query, answer in zip(groups, queries, answers):
            seen = answer.top()
            returned.extend(answer.top_logprobs)
            visible = [i for i in group if i in seen]
            hidden = [i for i in group if i not in seen]
            missing.extend(hidden)
            pushed.update(j for j in answer.top_ids if j not in group)
            if not visible:
                continue
            lps = np.array([seen[i] for i in visible])
            if not hidden:
                q = -math.expm1(np.logaddexp.reduce(lps))
                a = float(np.exp(lps - big).sum())
                err = 2 * u * log2v * (1 - q) / (q + a) if q + a > 0 else math.inf
                if err <= ACCEPT_ERROR:
                    logprobs[visible] = lps - big - math.log(q + a)
                    errors.append(err + 2 * u * (big + float(np.abs(lps).max())))
                    resolved_by_normalizer += 1
                    continue
            leader = visible[int(np.argmax(lps))]
            g = _Group(leader, {i: seen[i] - seen[leader] for i in visible})
            last = answer.top_ids[-1]
            last_bias = query.bias_dict().get(last, 0.0)
            for i in hidden:
                g.bound[i] = (seen[last] - last_bias) + last_bias - big - (seen[leader] - big)
            floating.append(g)
        pending = missing

    # Stage 2: anchor each floating group's leader against the reference token.
    leaders = [g.leader for g in floating]
    anchor: dict[int, float] = {}
    if leaders:
        queries = [Query.make({ref: big, **{i: big for i in chunk}}, k) for chunk in chunks(leaders, k - 1)]
        answers = yield queries
        for answer in answers:
            seen = answer.top()
            returned.extend(answer.top_logprobs)
            if ref in seen:
                anchor.update({i: ref_lp + seen[i] - seen[ref] for i in seen if i != ref})
    bounds: dict[int, float] = {}
    unanchored = 0
    for g in floating:
        if g.leader not in anchor:
            unanchored += len(g.offset)
            continue
        for i, off in g.offset.items():
            logprobs[i] = anchor[g.leader] + off
        for i, rel in g.bound.items():
            if np.isnan(logprobs[i]):
                bounds[i] = anchor[g.leader] + rel

    u = roundoff(returned)
    errors.append(4 * u * (big + max(abs(v) for v in returned)))
    missing_ids = np.flatnonzero(np.isnan(logprobs))
    notes = [
        f"group normalizer resolved {resolved_by_normalizer} of {group_calls} group calls; "
        f"{len(floating)} groups anchored through the reference token"
    ]
    if missing_ids.size:
        notes.append(f"{missing_ids.size} tokens could not be brought into the top-{k}: reported as unrecovered")
    if unanchored:
        notes.append(f"{unanchored} tokens lost their anchor (the reference left the top-{k})")
    return MethodResult(
        logprobs, {int(i): bounds.get(int(i), math.nan) for i in missing_ids}, max(errors), behaviour, notes
    )
