"""`forced`: one call per token where the bias steers sampling but logprobs are pre-bias.

Biasing token i by the largest allowed B makes it the generated token whenever
z_i + B > max_j z_j, and an endpoint that reports the generated token's own logprob
before the bias (llama-server, vLLM by default) then returns log p_i itself: exact, no
search. OpenAI's contract hides it (-9999 for a token outside the top-k), which the
check catches. A token that cannot be forced is more than B nats below the top:
unrecovered, with log p_i < log p_top - B.

The check: force a token of the unbiased top-k (the last one not known to be held, whose answer
is not withheld) and require that it is generated and reported at its unbiased value (within
rounding). Where the endpoint returns one logprob a call (k = 1), push the top token down by -B
instead: the runner-up must be generated, the one returned entry must stay the old top at its
value (pre-bias), and the runner-up's reported logprob must lie below the top's.

Held tokens (ctx.withheld; llama.cpp: tokens ending in an incomplete UTF-8 sequence), whose answers
the endpoint withholds, report nothing when forced, so each one outside the top-k is searched alone
by bisection over its bias (_bisection.search): with r the best non-held token of the top-k and the
held tokens above it biased by -B, a query biasing only h by b is withheld iff h won, i.e.
D_h = log p_h - log p_r > -b, and r is generated otherwise. D_h starts in (-2B, lp_k - lp_r]
(lp_k the last top-k value: every token outside it is below) and ends in a bracket of width
<= eps, so log p_h = lp_r + its midpoint is within half a bracket plus the rounding of lp_r: the
precision is forced's rounding bound plus the largest half-width. A held token that never wins at
b = B is unrecovered, with log p_h <= lp_r - B. About log2(2B / eps) calls each, fewer as the
pooled belief learns where they lie. Where the endpoint cannot list its held tokens, a withheld
forced answer leaves that token unrecovered, below lp_k.

With targets, only the targets outside the top-k are forced: one call each.
"""

from __future__ import annotations

from typing import Generator

import numpy as np

from logprob_cli.errors import Worded
from logprob_cli.endpoints import Answer, EndpointUnsuitable, Limits, Query
from logprob_cli.methods import _bisection
from logprob_cli.methods._base import (
    Context, MethodResult, Plan, lowered_top_response, reference, roundoff, still_unknown, unnamed_note, vector_from,
)
from logprob_cli.methods._spec import MethodSpec, Needs
from logprob_cli.wording import plural


def plan(ctx: Context) -> Plan:
    k = max(ctx.top_k, 1)
    (first,) = yield [Query.make(top_logprobs=k)]
    if not first.top_ids:
        raise EndpointUnsuitable(
            "the endpoint withheld its whole answer to the unbiased query (llama-server does so when the greedy token "
            "ends in an incomplete UTF-8 sequence and it cannot list such tokens): use method=\"visible\""
        )
    yield from _check_forcing(ctx, first, k)
    big = ctx.bias_max
    behaviour = {"top_logprobs_returned": len(first.top_ids), "bias_steers_sampling": True, "logprobs_after_bias": False}
    logprobs = vector_from(first, ctx.vocab_size)
    unknown = still_unknown(ctx, logprobs)
    held = np.isin(unknown, sorted(ctx.withheld))
    pending, searched = unknown[~held].tolist(), unknown[held]
    answers = yield from _force_each(pending, big)
    bounds: dict[int, float] = {}
    withheld = hidden = 0
    top_lp, floor = first.top_logprobs[0], first.top_logprobs[-1]
    returned = list(first.top_logprobs)
    for i, answer in zip(pending, answers):
        if answer.sampled == i and answer.sampled_logprob is not None:
            logprobs[i] = answer.sampled_logprob
            returned.append(answer.sampled_logprob)
        elif answer.sampled == i:  # generated, its value withheld (-9999): outside the top-k is all that is known
            bounds[i] = floor
            hidden += 1
        elif answer.withheld and not ctx.withheld:  # perhaps i itself: outside the top-k is all that is known
            bounds[i] = floor
            withheld += 1
        else:
            bounds[i] = top_lp - big
    precision = 2 * roundoff(returned) * max(abs(v) for v in returned)
    notes = _forcing_notes(hidden, withheld, len(bounds) - withheld - hidden, big, len(first.top_ids)) + unnamed_note(ctx)
    if searched.size:
        precision = yield from _search_held(ctx, first, searched, logprobs, bounds, precision, notes)
    return MethodResult(logprobs, bounds, precision, behaviour, notes)


def _check_forcing(ctx: Context, first: Answer, k: int) -> Generator[list[Query], list[Answer], None]:
    """The check (module doc), after the unbiased top-k `first`: force a token of it (k = 1: push the top
    down by -B) and raise EndpointUnsuitable unless the forced token is generated and reports its own
    unbiased logprob. One call at k = 1, else the up to three candidates at once."""
    big = ctx.bias_max
    if len(first.top_ids) == 1:  # one logprob a call: the check forces the runner-up by pushing the top down
        (probe,) = yield [Query.make({first.top_ids[0]: -big}, top_logprobs=1)]
        steers, post_bias = lowered_top_response(first, probe)
        value = first.top_logprobs[0]
        own = not post_bias and probe.sampled_logprob is not None and probe.sampled_logprob <= value + 1e-3
        tried = f"token {first.top_ids[0]} (the top) biased by {-big:+g}"
        forced = f"forcing the runner-up {probe.sampled} (below the top's {value:.4f})"
    else:
        ranked = list(zip(first.top_ids, first.top_logprobs))[::-1]
        candidates = ([c for c in ranked if c[0] not in ctx.withheld] or ranked)[:3]
        probes = yield [Query.make({i: big}, top_logprobs=k) for i, _ in candidates]
        (target, value), probe = next(
            ((c, p) for c, p in zip(candidates, probes) if not p.withheld), (candidates[0], probes[0])
        )
        steers = probe.sampled == target
        own = probe.sampled_logprob is not None and abs(probe.sampled_logprob - value) <= 1e-3 + 1e-3 * abs(value)
        tried = f"token {target} biased by {big:+g}"
        forced = f"forcing token {target} (unbiased {value:.4f})"
    if not steers:
        raise EndpointUnsuitable(Worded(
            "forced needs logit_bias to change the generated token, but {tried} did not change it. "
            'Use {method}="topk" if the returned logprobs move with the bias; otherwise only the top-k '
            'can be had ({method}="visible").', tried=tried,
        ))
    if not own:
        shown = "withheld (-9999)" if probe.sampled_logprob is None else f"{probe.sampled_logprob:.4f}"
        raise EndpointUnsuitable(Worded(
            "forced needs the generated token's own unbiased logprob, but {forced} reported {shown}. "
            'Use {method}="bisection": the bias does steer sampling.', forced=forced, shown=shown,
        ))


def _forcing_notes(hidden: int, withheld: int, too_far: int, big: float, k: int) -> list[str]:
    """The notes on forced tokens left unrecovered: `hidden` generated with their logprob withheld (-9999),
    `withheld` whose whole answer was withheld, `too_far` never generated (more than `big` nats below the
    top); k: the logprobs the unbiased call returned."""
    notes = []
    if hidden:
        notes.append(
            f"the endpoint generated {plural(hidden, 'forced token')} but withheld its logprob (-9999): unrecovered, "
            f"each below the last top-{k} value"
        )
    if too_far:
        notes.append(f"{plural(too_far, 'token')} could not be forced (more than {big:g} nats below the top)")
    if withheld:
        notes.append(
            f"the endpoint withheld the logprobs of {withheld} forced tokens (incomplete UTF-8) and could not list "
            f"such tokens: unrecovered, each below the last top-{k} value"
        )
    return notes


def _force_each(pending: list[int], big: float) -> Plan:
    """One call per token, forced by +B. The first is asked alone: a token outside the top-k that is
    generated but reported withheld (OpenAI's -9999) means the check's tokens, all from the top-k, showed
    a value this endpoint hides for every other token, so the method stops before the other V - k - 1
    calls (bisection works there). The queries are the same as when all were asked at once, so a
    checkpoint made either way replays."""
    if not pending:
        return []
    (head,) = yield [Query.make({pending[0]: big}, top_logprobs=0)]
    if head.sampled == pending[0] and head.sampled_logprob is None:
        raise EndpointUnsuitable(Worded(
            "forced needs the generated token's own logprob, but forcing token {token} (outside the top-k) "
            'reported it withheld (-9999): the endpoint reveals it only inside the top-k. Use {method}="bisection": '
            "the bias does steer sampling.", token=pending[0],
        ))
    rest = yield [Query.make({i: big}, top_logprobs=0) for i in pending[1:]]
    return [head, *rest]


def _search_held(ctx: Context, first, searched: np.ndarray, logprobs: np.ndarray, bounds: dict, precision: float, notes):
    """Recover the held tokens outside the top-k by bisection over each one's bias (module doc); returns the
    precision, widened by the brackets' half-width."""
    big = ctx.bias_max
    found = reference(first, ctx)
    floor = first.top_logprobs[-1]
    if found is None:  # see `reference`: only a query too short for the held tokens above r
        bounds.update({int(i): floor for i in searched})
        notes.append(f"{plural(searched.size, 'token')} whose answers the endpoint withholds could not be searched: unrecovered")
        return precision
    ref, above = found
    ref_lp = first.top()[ref]
    lo = np.full(ctx.vocab_size, -2.0 * big)
    hi = np.full(ctx.vocab_size, floor - ref_lp)
    lo[ref] = hi[ref] = 0.0
    marked = np.zeros(ctx.vocab_size, dtype=bool)
    marked[searched] = True
    counts = yield from _bisection.search(ctx, lo, hi, ref, marked, marked.copy(), {j: -big for j in above})
    done = (hi[searched] - lo[searched] <= ctx.eps) & (hi[searched] > -big)
    resolved = searched[done]
    logprobs[resolved] = ref_lp + (lo[resolved] + hi[resolved]) / 2
    bounds.update({int(i): float(ref_lp + hi[i]) for i in searched[~done]})
    notes.append(
        f"{resolved.size} of {searched.size} tokens whose answers the endpoint withholds were found by bisection "
        f"over their bias ({plural(counts['calls'], 'call')}, eps {ctx.eps:g})"
    )
    if resolved.size:
        precision += float((hi[resolved] - lo[resolved]).max()) / 2
    return precision


def calls(vocab_size: int, top_k: int, eps: float, limits: Limits, targets: int = 0) -> int:
    """1 + min(k, 3) + n, n = V - k (or the targets outside the top-k): the top-k, the forcing check (up to
    3 candidates at once, 1 call at k = 1), then one call a token outside the top-k. Exact where the
    endpoint withholds no answer (each held token is searched by bisection, ~18 calls) and every token
    lies within the bias limit of the top."""
    return 1 + min(top_k, 3) + (targets or vocab_size - top_k)


SPEC = MethodSpec(
    "forced", plan, help="one call per token: pre-bias logprobs, bias steers sampling (V-k+4 calls)",
    needs=Needs(bias_steers_sampling=True, forced_logprob_reported=True), calls=calls, exact_count=True,
    picked_when="logprobs are pre-bias, the bias steers sampling and a forced token reports its own logprob "
    "(llama-server, vLLM)",
)
