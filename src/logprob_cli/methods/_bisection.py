"""`bisection`: argmax-only extraction (Morris et al. 2023), many tokens per call (Carlini et al. 2024).

Only the generated token is read. Let t0 be the unbiased argmax and D_i = z_i - z_t0 <= 0.
A query biases a set M of tokens by b_i = -tau_i in [0, B] (B = the bias limit, t0 unbiased),
and the endpoint generates argmax_j (D_j + b_j). With X_i = D_i - tau_i:
  - t0 generated:        X_i < 0, so  D_i < tau_i                       for every i in M;
  - j in M generated:    X_j > 0, so  D_j > tau_j,  and  X_i < X_j <= hi_j - tau_j, so
                         D_i < tau_i + (hi_j - tau_j)                    for the other i in M.
Each token keeps a bracket lo_i < D_i <= hi_i; hi starts at 0.

Search: every round splits the unresolved tokens into queries of up to `bias_entries` tokens
(each query spans all bracket widths, so a narrow winner's relative bound tightens the wide
brackets beside it; held tokens, below, are placed apart) and sets each threshold near the top
of its bracket, so that a token exceeds it with probability q = LAMBDA / |M| (at most 1/2):
about LAMBDA tokens per query exceed. A call nobody wins lowers every hi to tau; a winner's bracket
becomes the slice [tau_j, hi_j]. Under a calibrated belief the expected log-shrink per call,
LAMBDA e^-LAMBDA + (1 - e^-LAMBDA) ln(|M| / LAMBDA), peaks near LAMBDA = 2 (4.6 nats at
|M| = 300; the bound is ln 301 = 5.7). The belief about D_i is the pooled bracket density
(every token uniform on its bracket, summed over the vocabulary) restricted to [lo_i, hi_i]:
uniform at first, it learns where the logits lie as brackets shrink. The slice is kept
within [eps, w / 2] (w = hi - lo): a winner never lands finer than eps, where the extra
precision would be wasted. Measured on the simulator (vocabularies 5,000 and 20,000):
2.1 calls per token at eps 1e-2 and 2.5 at eps 1e-3, against ~1.8 for the information bound
and ~34 for one token at a time.

Range: a token with D_i < -B never wins. lo starts at -2B: the virtual half below -B stands
for "out of range", so a token that keeps losing is soon tested at tau = -B (b = B); losing
there proves D_i < -B: the token is unrecovered, with the upper bound below.

Values: a token is resolved when hi - lo <= eps, D_i = (lo + hi) / 2, and
log p_i = D_i - log Z with log Z = logsumexp of D over t0 and the resolved tokens and of hi
over the unrecovered ones (so 1 - sum p leaves room for them). The true log Z lies between
logsumexp(lo) over t0 and the resolved tokens and logsumexp(hi) over all tokens, so
    |error| <= max half-width + max(log Z - logsumexp(lo), logsumexp(hi) - log Z),
and an unrecovered token has log p_i <= hi_i - logsumexp(lo).

Withheld answers: an endpoint may return nothing at all when it generates one of a known set of
"held" tokens (ctx.withheld; llama-server: tokens whose bytes end in an incomplete UTF-8
sequence). A query holds at most one held token, so a withheld answer names its winner: that
token was generated, read as above. This needs t0 not held. If it is (the endpoint layer still
returns its unbiased top-k, as llama-server's pre-bias logprobs allow), t0 hands its part to r, the
best token of the check's top-k that is not held: every query also biases the held tokens ranked
above r (t0 among them) by -B, which leaves r the argmax of the unbiased rest when each of their
gaps D_j = lp_j - lp_r is below B, so D is taken relative to r, and those few tokens' D_j are the
first answer's own values (exact up to its rounding). Such an r exists once the check has passed
(it saw a non-held top-k token win with a bias of at most B); only a query too short for those
tokens (bias_entries at most their number) makes bisection refuse.
While other tokens are open, each query holds one held token (widest bracket first, so they take
turns) beside up to `bias_entries` - 1 others, and its threshold leaves it the chance Q_HELD = 1/4
of exceeding (more than q): at q = LAMBDA / |M| a held token would learn almost nothing per turn,
while a held winner's wide slice bounds its neighbours only loosely, so a larger chance takes the
query from them; 1/4 measured cheapest (1/10: +11% calls, 1/2: +12%). Once only held tokens are
open, each is searched alone (`search`, which forced reuses for its held tokens). A withheld answer
for a query without a held token (noise, or an endpoint that withholds others too, or one that
could not list them) tells nothing: it is asked again next round, and counted in a note. Measured
on llama-server's tiny model (vocabulary 459, 65 held tokens; six prompts, in-process replay of its
own distribution): 3.3 calls per token, against 2.7 had nothing been withheld (6.7 with every held
token in its own query each round).

Noise (temperature-0 near-ties): thresholds lie strictly inside brackets, so no answer about
a token in M can invert its bracket. A token outside the query that is generated beat t0,
which says D >= 0 against its hi <= 0: its bracket widens to reach 0 (reopening it if that
makes it wider than eps), and the query's tokens read the answer as a t0 win. Such answers
are counted in a note: the precision above assumes deterministic answers.

Rounds are capped at SAFETY ln(2B / eps) / q (q at full queries), SAFETY times the rounds a
bracket needs when it shrinks by the factor 1 - q each round (measured runs use less than
half of the cap); tokens still open then are unrecovered, with their proven bound.

Targets: only the n chosen tokens the first call did not show are searched, all in one query a
round (n <= bias entries), D relative to t0 as above, starting in (-2B, lp_k - lp_t0] (every
token outside the top-k lies below its last value lp_k). Values are anchored on t0's own
logprob, which the first answer shows (pre-bias on OpenAI): log p_i = lp_t0 + D_i, with no
normalization, so the precision is the largest half-width plus the rounding of lp_t0; a target
that never wins at b = B has log p_i <= lp_t0 + hi_i. With few tokens a query, the chance q
that each exceeds its threshold maximises the expected log-shrink of a call,
    (1 - q)^n n (-ln(1 - q)) + (1 - (1 - q)^n) (-ln q)
(nobody wins: each bracket shrinks by 1 - q; a winner: its bracket by q), which gives q = 1/2, .34,
.27, .22 for n = 1 to 4 (LAMBDA / n = .5, .5, .5, .5 would waste a third of each call at n = 3).
Information bound: a call has n + 1 outcomes, so n targets need at least n ln(W / eps) / ln(n + 1)
calls for brackets of width W: about 8 calls a target at n = 3, eps 1e-3 and W = B = 100.
"""

from __future__ import annotations

import math
from typing import Callable, Generator

import numpy as np

from logprob_cli.endpoints import Answer, EndpointUnsuitable, Limits, Query
from logprob_cli.methods._base import (
    BFLOAT16_ROUNDOFF, Context, MethodResult, Plan, check_bias, reference, roundoff, still_unknown, vector_from,
)
from logprob_cli.methods import _draws
from logprob_cli.methods._spec import MethodSpec, Needs
from logprob_cli.wording import plural

LAMBDA = 2.0  # expected number of tokens per query above their threshold
SAFETY = 4.0  # round cap, in multiples of the rounds a bracket shrinking by 1 - q needs
GRID = 1024  # points of the pooled belief's distribution function on [-2B, 0]
Q_HELD = 0.25  # chance that a held token (one whose answers the endpoint withholds) exceeds its threshold


def plan(ctx: Context) -> Plan:
    first, behaviour = yield from check_bias(ctx, needs="steers", method="bisection")
    big, eps = ctx.bias_max, ctx.eps
    top, above = first.sampled, {}
    marked = np.zeros(ctx.vocab_size, dtype=bool)  # tokens whose answers the endpoint withholds
    marked[sorted(ctx.withheld)] = True
    if marked[top]:  # see "Withheld answers" in the module doc
        found = reference(first, ctx)
        if found is None:
            raise EndpointUnsuitable(
                f"the top token {top} is one whose answers the endpoint withholds, and the "
                f"{ctx.limits.bias_entries} bias entries a query may carry leave no room to hold it and its peers "
                'down: use method="forced" or "direct"'
            )
        top, above = found
    searchable = np.ones(ctx.vocab_size, dtype=bool)
    lo = np.full(ctx.vocab_size, -2.0 * big)
    hi = np.zeros(ctx.vocab_size)
    for i, d in [(top, 0.0), *above.items()]:
        lo[i] = hi[i] = d
    searchable[[top, *above]] = False
    if ctx.targets:
        return (yield from _search_targets(ctx, first, behaviour, top, above, marked))
    counts = yield from search(ctx, lo, hi, top, marked, searchable, {i: -big for i in above})
    counts["calls"] += behaviour["check_calls"]
    if above:
        behaviour["reference"] = top
    return _result(lo, hi, top, big, eps, behaviour, counts, roundoff(first.top_logprobs))


def _search_targets(
    ctx: Context, first: Answer, behaviour: dict, top: int, above: dict[int, float], marked: np.ndarray
) -> Generator[list[Query], list[Answer], MethodResult]:
    """The targets' search and result (module doc, "Targets")."""
    big, eps = ctx.bias_max, ctx.eps
    logprobs = vector_from(first, ctx.vocab_size)
    wanted = still_unknown(ctx, logprobs)
    top_lp = first.top()[top]
    lo = np.full(ctx.vocab_size, -2.0 * big)
    hi = np.full(ctx.vocab_size, first.top_logprobs[-1] - top_lp)
    searchable = np.zeros(ctx.vocab_size, dtype=bool)
    searchable[wanted] = True
    drawing = _draws.usable(ctx.limits, wanted.size) and not marked.any() and not above
    if drawing:  # module doc, "Targets": located by draws, then proven by greedy calls
        visible = {int(i): lp - top_lp for i, lp in zip(first.top_ids, first.top_logprobs)}
        intervals, drawing_calls = yield from _draws.locate(wanted, lo, hi, visible, ctx.limits.draws, eps, big)
        proving_calls = yield from _prove(intervals, lo, hi, top, big)
    counts = yield from search(ctx, lo, hi, top, marked, searchable, {i: -big for i in above}, chance=few_chance)
    done = (hi[wanted] - lo[wanted] <= eps) & (hi[wanted] > -big)
    resolved = wanted[done]
    logprobs[resolved] = top_lp + (lo[resolved] + hi[resolved]) / 2
    grid = roundoff(first.top_logprobs)
    precision = 2 * grid * max(abs(v) for v in first.top_logprobs)
    if resolved.size:
        precision += float((hi[resolved] - lo[resolved]).max()) / 2
    if grid == BFLOAT16_ROUNDOFF:
        precision += 2 * grid * LOGIT_MAGNITUDE
    calls = counts["calls"] + behaviour["check_calls"] + (drawing_calls + proving_calls if drawing else 0)
    notes = [f"{resolved.size} of {plural(len(ctx.targets), 'target')} found by bisection beyond the top-"
             f"{len(first.top_ids)} ({plural(calls, 'call')}, eps {eps:g}); values anchored on the top token's logprob"]
    if drawing:
        notes.append(
            f"{plural(drawing_calls, 'call')} drew up to {min(ctx.limits.draws, _draws.MOST_DRAWS)} choices each to "
            f"locate them, {plural(proving_calls, 'greedy call')} proved the brackets"
        )
    if wanted.size > resolved.size:
        notes.append(f"{plural(wanted.size - resolved.size, 'target')} never won at bias {big:g} or stayed open: "
                     "unrecovered, with the bound the answers prove")
    bounds = {int(i): float(top_lp + hi[i]) for i in wanted[~done]}
    return MethodResult(logprobs, bounds, precision, behaviour, notes)


def _prove(
    intervals: dict[int, tuple[float, float]], lo: np.ndarray, hi: np.ndarray, top: int, big: float
) -> Generator[list[Query], list[Answer], int]:
    """Greedy calls that prove the drawn intervals [a_i, b_i] (module doc, "Targets"), in one batch: every target
    at threshold b_i (t0 winning proves D_i < b_i for all), and each target within reach alone at a_i (winning
    proves D_i > a_i). The brackets learn what each answer proves, as in the search; returns the calls."""
    ids = np.fromiter(intervals, dtype=np.int64)
    groups = [ids] + [np.asarray([i]) for i in ids if intervals[int(i)][1] > -big]
    thresholds = [np.asarray([max(intervals[int(i)][1], -big) for i in ids])]
    thresholds += [np.asarray([max(intervals[int(g[0])][0], -big)]) for g in groups[1:]]
    answers = yield [Query.make(dict(zip(g.tolist(), (-t).tolist()))) for g, t in zip(groups, thresholds)]
    for group, tau, answer in zip(groups, thresholds, answers):
        if not answer.withheld:
            _learn(lo, hi, group, tau, answer.sampled)
    return len(answers)


def few_chance(size: int) -> float:
    """The chance q that each of `size` tokens of a query exceeds its threshold, maximising the expected
    log-shrink of a call (module doc, "Targets"); for queries of many tokens it tends to LAMBDA / size."""
    grid = np.linspace(0.001, 0.5, 500)
    nobody = (1 - grid) ** size
    gain = nobody * size * -np.log1p(-grid) + (1 - nobody) * -np.log(grid)
    return float(grid[int(np.argmax(gain))])


def pooled_chance(size: int) -> float:
    """q = LAMBDA / size (at most 1/2): about LAMBDA winners a query of many tokens (module doc)."""
    return min(0.5, LAMBDA / size)


def search(
    ctx: Context, lo: np.ndarray, hi: np.ndarray, top: int, marked: np.ndarray, searchable: np.ndarray,
    fixed: dict[int, float], chance: Callable[[int], float] = pooled_chance,
) -> Generator[list[Query], list[Answer], dict[str, int]]:
    """Shrink the brackets lo < D_i <= hi of the `searchable` tokens (D relative to `top`) to eps, in place.

    Every query also carries the `fixed` biases (tokens held down so that `top` is its unbiased argmax);
    `marked` tokens are the held ones; `chance(n)` is the chance each of a query's n tokens is given of
    exceeding its threshold. Returns the calls made, the answers won outside the query
    ("outside") and the withheld answers that named no token ("unexplained").
    """
    big, eps = ctx.bias_max, ctx.eps
    size = ctx.limits.bias_entries - len(fixed)
    max_rounds = math.ceil(SAFETY * math.log(2.0 * big / eps) / min(0.5, LAMBDA / size))
    counts = {"calls": 0, "outside": 0, "unexplained": 0}
    for _ in range(max_rounds):
        pending = np.flatnonzero((hi - lo > eps) & (hi > -big) & searchable)
        if not pending.size:
            break
        belief = _pooled_cdf(lo[searchable], hi[searchable], big)
        by_width = pending[np.argsort(hi[pending] - lo[pending], kind="stable")]
        plain, held = by_width[~marked[by_width]], by_width[marked[by_width]][::-1]  # held: widest first
        if not plain.size:  # only held tokens left: each alone
            n = held.size
        elif held.size and size > 1:  # one held token beside size - 1 others in each query
            n = math.ceil(plain.size / (size - 1))
            held = held[:n]
        else:  # no held token open, or no room beside one (queries of one entry): held ones wait
            n, held = math.ceil(plain.size / size), held[:0]
        order = np.concatenate([held, plain])
        groups = [np.sort(order[i::n]) for i in range(n)]
        thresholds = [_thresholds(lo[g], hi[g], marked[g], big, eps, belief, chance(g.size)) for g in groups]
        answers = yield [Query.make({**fixed, **dict(zip(g.tolist(), (-t).tolist()))}) for g, t in zip(groups, thresholds)]
        counts["calls"] += len(answers)
        for group, tau, answer in zip(groups, thresholds, answers):
            winner = answer.sampled
            if answer.withheld:  # the query's one withheld token won; with none, nothing is known: ask again
                suspects = group[marked[group]]
                if not suspects.size:
                    counts["unexplained"] += 1
                    continue
                winner = int(suspects[0])
            counts["outside"] += winner != top and winner not in group
            _learn(lo, hi, group, tau, winner)
    return counts


def _pooled_cdf(lo: np.ndarray, hi: np.ndarray, big: float) -> tuple[np.ndarray, np.ndarray]:
    """F(x) = sum_i clip((x - lo_i) / w_i, 0, 1) on a grid over [-2B, 0], exact at the grid points.

    Each ramp is (x - lo)_+ / w - (x - hi)_+ / w, and sum_{a_i < x} c_i (x - a_i) is
    x C(x) - A(x) with C, A cumulative sums of c_i and c_i a_i. A tiny slope keeps F increasing.
    """
    grid = np.linspace(-2.0 * big, 0.0, GRID + 1)
    inv = 1.0 / (hi - lo)

    def ramps(a: np.ndarray) -> np.ndarray:
        k = np.searchsorted(grid, a, side="right")
        c = np.bincount(k, weights=inv, minlength=GRID + 2)[: GRID + 1].cumsum()
        s = np.bincount(k, weights=a * inv, minlength=GRID + 2)[: GRID + 1].cumsum()
        return grid * c - s

    return grid, ramps(lo) - ramps(hi) + 1e-9 * (grid + 2.0 * big)


def _thresholds(
    lo: np.ndarray, hi: np.ndarray, held: np.ndarray, big: float, eps: float, belief, q: float
) -> np.ndarray:
    """tau_i with belief mass q above it in [lo_i, hi_i] (at least Q_HELD for a held token), slice clipped
    (see module doc), >= -B."""
    grid, cdf = belief
    q = np.where(held, max(q, Q_HELD), q)
    width = hi - lo
    f_lo, f_hi = np.interp(lo, grid, cdf), np.interp(hi, grid, cdf)
    believed = hi - np.interp(f_hi - q * (f_hi - f_lo), cdf, grid)
    cut = np.minimum(width / 2, np.maximum(believed, eps))
    return np.maximum(-big, hi - cut)


def _learn(lo: np.ndarray, hi: np.ndarray, group: np.ndarray, tau: np.ndarray, winner: int) -> None:
    """Tighten the brackets of one query's tokens (thresholds tau) by its generated token."""
    inside = group == winner
    tau_w = float(tau[inside][0]) if inside.any() else 0.0  # t0 and tokens outside the query: no bias
    if tau_w < hi[winner]:
        lo[winner] = max(lo[winner], tau_w)
    else:  # an unbiased token beat t0 (D >= 0 >= hi): widen its bracket to 0, never invert it
        hi[winner] = tau_w
    level = hi[winner] - tau_w
    hi[group[~inside]] = np.minimum(hi[group[~inside]], tau[~inside] + level)


LOGIT_MAGNITUDE = 64.0  # assumed bound on |z + b| at a comparison, for the bfloat16 rounding term


def _result(lo, hi, top: int, big: float, eps: float, behaviour: dict, counts: dict, grid: float) -> MethodResult:
    """Midpoints of the resolved brackets, normalised; bounds for the rest (see the module doc)."""
    vocab = lo.size
    resolved = (hi - lo <= eps) & (hi > -big)
    resolved[top] = True
    mid = np.where(resolved, (lo + hi) / 2, np.nan)
    log_z = _logsumexp(np.where(resolved, mid, hi))
    log_z_lo = _logsumexp(lo[resolved])
    log_z_hi = _logsumexp(hi)
    half = float((hi - lo)[resolved].max()) / 2
    precision = half + max(log_z - log_z_lo, log_z_hi - log_z)
    if grid == BFLOAT16_ROUNDOFF:
        # The engine compares z_i + b_i and z_top after rounding each to bfloat16.
        precision += 2 * grid * LOGIT_MAGNITUDE
    missing = np.flatnonzero(~resolved)
    below = int((hi[missing] <= -big).sum())
    calls, outside, unexplained = counts["calls"], counts["outside"], counts["unexplained"]
    notes = [f"{calls / vocab:.2f} calls per token ({calls} calls, vocabulary {vocab}, eps {eps:g})"]
    if "reference" in behaviour:
        notes.append(
            f"the top token is one whose answers the endpoint withholds: every query held the tokens above token "
            f"{top} down by {big:g}, and their values are the first answer's"
        )
    if below:
        notes.append(f"{plural(below, 'token')} never won at bias {big:g}: more than {big:g} nats below the top, unrecovered")
    if missing.size > below:
        notes.append(f"{plural(missing.size - below, 'token')} still open at the round cap: unrecovered")
    if outside:
        notes.append(
            f"{outside} answers generated a token outside the query other than the top one: the endpoint is "
            "not deterministic (near-ties at temperature 0), so errors can exceed the stated precision"
        )
    if unexplained:
        notes.append(
            f"{unexplained} answers were withheld although no token of their query is one the endpoint withholds: "
            "asked again"
        )
    if grid == BFLOAT16_ROUNDOFF:
        notes.append(
            "the endpoint computes in bfloat16: every comparison is rounded on its grid, so the precision is "
            f"widened by {2 * grid * LOGIT_MAGNITUDE:g} nats (assuming |logit + bias| < {LOGIT_MAGNITUDE:g})"
        )
    bounds = {int(i): float(hi[i] - log_z_lo) for i in missing}
    return MethodResult(mid - log_z, bounds, precision, behaviour, notes)


def _logsumexp(x: np.ndarray) -> float:
    m = float(x.max())
    return m + math.log(float(np.exp(x - m).sum()))


# calls(): a fit to measured runs on the float32 simulator (module docstring of `calls`).
ENDGAME_CALLS = 75
WIN_PER_TOKEN = 0.76
BASE_PER_TOKEN = 0.50
PER_NAT = 0.182
FIT_ENTRIES = 300


def calls(vocab_size: int, top_k: int, eps: float, limits: Limits, targets: int = 0) -> int:
    """2 + 75 + V (0.76 + r(M) (0.50 + 0.182 ln(1/eps))), r(M) = ln(150) / ln(M/2), M = bias entries a call.

    A fit to measured runs on the float32 simulator (V 300 to 100,000, eps 1e-1 to 1e-5, M 30 to 1,000:
    every run within 4%): every token must win one call to get a lower bound (one winner a call: the
    0.76), the rest shrinks brackets by the information a call carries, ~ln(M/2) nats (r(M) = 1 at
    M = 300), and the last rounds of nearly empty queries cost ~75 calls. A model whose logits spread
    otherwise than the simulator's will differ somewhat. With n targets: `target_calls`."""
    if targets:
        return target_calls(targets, eps, limits)
    info = math.log(FIT_ENTRIES / 2) / math.log(limits.bias_entries / 2)
    per_token = WIN_PER_TOKEN + info * (BASE_PER_TOKEN + PER_NAT * math.log(1 / eps))
    return 2 + ENDGAME_CALLS + math.ceil(vocab_size * per_token)


def target_calls(targets: int, eps: float, limits: Limits) -> int:
    """2 + ceil(n ln(2B / eps) / I(m) (0.9 + 0.1 / m)), for n targets in queries of m each; where the endpoint
    draws enough choices a request (_draws.usable), 2 + drawing(n, eps) + n + 1 instead (_draws.calls).

    n ln(2B / eps) nats must be learnt (each bracket from about 2B to eps) at I(m) nats a call, the
    expected log-shrink at few_chance(m) (module doc, "Targets"); the last factor is a fit to measured
    runs on the float32 simulator (n 1 to 10, eps 1e-3 to 1e-1, 10 prompts each: within 8%), where the
    pooled belief and a winner's bound on its neighbours save a little beside one target alone (plain
    bisection, exact). Measured: 9.6 calls a target at n = 3, eps 1e-3; 5.9 at eps 0.1."""
    if _draws.usable(limits, targets):
        return 2 + _draws.calls(targets, eps) + targets + 1
    groups = math.ceil(targets / limits.bias_entries)
    size = math.ceil(targets / groups)
    q = few_chance(size)
    nobody = (1 - q) ** size
    info = nobody * size * -math.log1p(-q) + (1 - nobody) * -math.log(q)
    need = targets * math.log(2 * limits.bias_max / eps)
    return 2 + math.ceil(need / info * (0.9 + 0.1 / size))


SPEC = MethodSpec(
    "bisection", plan, help="argmax-only search (~2.5 V calls at eps 1e-3, 2.1 V at 1e-2)",
    needs=Needs(bias_steers_sampling=True), calls=calls, exact_count=False, extra_tokens=_draws.extra_tokens,
    picked_when="logprobs are pre-bias, the bias steers sampling, a forced token's own logprob is withheld "
    "(OpenAI's -9999)",
    checks_bias=True,
)
