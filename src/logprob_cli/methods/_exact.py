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

Tokens a group call leaves out of sight go to that second stage too, as `topk` reads
them (retried with the unbiased "intruders" pushed down, for a bounded number of rounds),
and a token still unseen is unrecovered with the bound the answers prove.

With targets there are too few unknown tokens for groups to pay: they are read as `topk` reads
them, k-1 a call beside the reference, ceil(n / (k-1)) calls after the check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generator

import numpy as np

from logprob_cli.endpoints import Answer, Limits, Query
from logprob_cli.methods._base import Context, MethodResult, Plan, check_bias, chunks, roundoff, vector_from
from logprob_cli.methods._spec import MethodSpec, Needs, at_least_two
from logprob_cli.methods._topk import plan as topk_plan, reference_rounds
from logprob_cli.wording import plural

ACCEPT_ERROR = 1e-5


@dataclass
class _Group:
    """Members known relative to a leader: log p_i = log p_leader + offset[i]."""

    leader: int
    offset: dict[int, float] = field(default_factory=dict)


def plan(ctx: Context) -> Plan:
    if ctx.targets:
        return (yield from topk_plan(ctx, method="exact"))
    first, behaviour = yield from check_bias(ctx, needs="post_bias", method="exact")
    k = len(first.top_ids)
    logprobs = vector_from(first, ctx.vocab_size)
    big = ctx.bias_max
    returned: list[float] = list(first.top_logprobs)
    errors: list[float] = []
    # Stage 1: k unknown tokens per call, one bias; the normalizer where it is well-conditioned.
    floating, stragglers, resolved, group_calls = yield from _group_stage(ctx, first, logprobs, returned, errors)

    # Stage 2: leaders (one slot per floating group) and stragglers beside the reference token.
    leaders = [g.leader for g in floating]
    bounds = yield from reference_rounds(ctx, first, leaders + stragglers, logprobs, returned)
    unanchored = 0
    for g in floating:
        if np.isnan(logprobs[g.leader]):
            unanchored += len(g.offset) - 1
            continue
        for i, offset in g.offset.items():
            logprobs[i] = logprobs[g.leader] + offset
    errors.append(4 * roundoff(returned) * (big + max(abs(v) for v in returned)))
    missing_ids = np.flatnonzero(np.isnan(logprobs))
    notes = [
        f"group normalizer resolved {resolved} of {group_calls} group calls; "
        f"{len(floating)} groups anchored through the reference token"
    ]
    if missing_ids.size:
        notes.append(f"{plural(missing_ids.size, 'token')} could not be brought into the top-{k}: reported as unrecovered")
    if unanchored:
        notes.append(f"{plural(unanchored, 'token')} lost their anchor (their group's leader stayed out of sight)")
    return MethodResult(
        logprobs, {int(i): bounds.get(int(i), math.nan) for i in missing_ids}, max(errors), behaviour, notes
    )


def _group_stage(
    ctx: Context, first: Answer, logprobs: np.ndarray, returned: list[float], errors: list[float]
) -> Generator[list[Query], list[Answer], tuple[list[_Group], list[int], int, int]]:
    """The first stage (module doc): the unknown tokens k a call, all under one bias B; the normalizer where it is
    well-conditioned. Sets `logprobs` of each group whose estimated error is within ACCEPT_ERROR (its
    bound appended to `errors`) and adds every returned value to `returned`. Returns the floating groups
    (known relative to their leader), the stragglers (out of sight), how many group calls the normalizer
    resolved and how many there were."""
    k = len(first.top_ids)
    big = ctx.bias_max
    log2v = math.log2(ctx.vocab_size)
    u = roundoff(first.top_logprobs)
    groups = chunks(np.flatnonzero(np.isnan(logprobs)), k)
    answers = yield [Query.make({i: big for i in g}, k) for g in groups]
    floating: list[_Group] = []
    stragglers: list[int] = []
    resolved = 0
    for group, answer in zip(groups, answers):
        seen = answer.top()
        returned.extend(answer.top_logprobs)
        visible = [i for i in group if i in seen]
        stragglers.extend(i for i in group if i not in seen)
        if not visible:
            continue
        lps = np.array([seen[i] for i in visible])
        if len(visible) == len(group):
            q = -math.expm1(np.logaddexp.reduce(lps))
            a = float(np.exp(lps - big).sum())
            err = 2 * u * log2v * (1 - q) / (q + a) if q + a > 0 else math.inf
            if err <= ACCEPT_ERROR:
                logprobs[visible] = lps - big - math.log(q + a)
                errors.append(err + 2 * u * (big + float(np.abs(lps).max())))
                resolved += 1
                continue
        leader = visible[int(np.argmax(lps))]
        floating.append(_Group(leader, {i: seen[i] - seen[leader] for i in visible}))
    return floating, stragglers, resolved, len(groups)


def calls(vocab_size: int, top_k: int, eps: float, limits: Limits, targets: int = 0) -> int:
    """2 + G + ceil(G / (k - 1)), G = ceil((V - k) / k): the check, one call a group, and each group
    anchored through its leader beside the reference token, k-1 leaders a call. Exact on float32 engines,
    where no group's normalizer resolves (an engine whose normalizers resolve needs fewer), and where every
    token lies within the bias limit of the top. With n targets outside the top-k, topk's
    2 + ceil(n / (k - 1)). Raises EndpointUnsuitable for k < 2."""
    at_least_two("exact", top_k)
    if targets:
        return 2 + math.ceil(targets / (top_k - 1))
    groups = math.ceil((vocab_size - top_k) / top_k)
    return 2 + groups + math.ceil(groups / (top_k - 1))


SPEC = MethodSpec(
    "exact", plan, help="k per call via the group normalizer where float32 allows (ideal V/k calls; as topk on float32 engines)",
    needs=Needs(logprobs_after_bias=True, min_top_k=2), calls=calls, exact_count=True,
    checks_bias=True,
)
