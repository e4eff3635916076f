"""What every extraction method shares: its context, its result, and the behaviour check.

A method is a plan: a generator that yields a batch of independent `Query`s, receives
the list of `Answer`s in the same order, and finally returns a `MethodResult`. It does
no I/O, so it runs the same against the simulator, a server, or answers replayed from
the journal; a plan must be deterministic given its answers (resume relies on it).

Notation used by the method docstrings: z = the model's logits, log p = log softmax(z),
b_i = the bias on token i, lp'_i = the logprob the endpoint returns under the bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generator

import numpy as np

from logprob_cli.errors import Worded
from logprob_cli.endpoints import Answer, EndpointUnsuitable, Limits, Query

if TYPE_CHECKING:
    from logprob_cli.methods._image import Image

Plan = Generator[list[Query], list[Answer], "MethodResult"]

FLOAT32_ROUNDOFF = 2.0**-24
BFLOAT16_ROUNDOFF = 2.0**-9
DEFAULT_EPS = 1e-3  # bisection's default precision in nats


@dataclass(frozen=True)
class Context:
    """What a plan may know about the run: vocabulary, request limits and settings.

    top_k: logprobs to ask for per call (the k of the method names).
    eps: bisection's target precision in nats (bracket width).
    withheld: token ids whose generation makes the endpoint withhold the whole answer
        (llama.cpp: tokens ending in an incomplete UTF-8 sequence), so that a withheld answer
        names its winner when a query biases only one of them.
    targets: the ids the user asked for, in their order (empty: the whole vocabulary). A plan
        then reads only these (besides what its first call shows), and its result leaves every
        other token NaN, with no bound.
    image: the model's low-rank image (methods/_image.py), for the image methods; None: not given.
    unnamed: token ids the endpoint's answers can never name (llama-cpp-python: a text other tokens
        share), so no answer carries their value: no plan asks for them, and every result leaves
        them NaN with no bound.
    whole_fallback: where the image does not fit a vector, an image method reads it whole with its base method
        (--image auto, whose rows are all whole vectors) instead of giving only the tokens it read.
    bias_observed: (the bias steers sampling, logprobs are post-bias) as the run's probe observed them (auto);
        check_bias then trusts them and spends one call instead of two. None: each plan checks for itself.
    """

    vocab_size: int
    limits: Limits
    top_k: int = 20
    eps: float = DEFAULT_EPS
    withheld: frozenset[int] = frozenset()
    targets: tuple[int, ...] = ()
    image: Image | None = None
    unnamed: frozenset[int] = frozenset()
    whole_fallback: bool = False
    bias_observed: tuple[bool, bool] | None = None

    @property
    def bias_max(self) -> float:
        return float(self.limits.bias_max)


@dataclass
class MethodResult:
    """A full vector: log-probabilities (NaN where unrecovered) and how good they are.

    upper_bounds: for each unrecovered token, the upper bound on its log-probability
        that the answers prove (NaN where none is known).
    precision: the method's own bound on the absolute error of recovered values (nats).
    behaviour: what the check found about the endpoint.
    """

    logprobs: np.ndarray
    upper_bounds: dict[int, float]
    precision: float
    behaviour: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def unrecovered_ids(self) -> np.ndarray:
        return np.flatnonzero(np.isnan(self.logprobs))

    def probability_sum(self) -> float:
        lp = self.logprobs[~np.isnan(self.logprobs)]
        return float(np.exp(lp).sum()) if lp.size else 0.0

    def reading(self, token_id: int) -> tuple[float | None, float | None, float | None]:
        """One token as a chosen token is reported: (logprob, None, precision) where recovered, else
        (None, the upper bound the answers prove or None where none is known, None)."""
        value = float(self.logprobs[token_id])
        if not math.isnan(value):
            return value, None, float(self.precision)
        bound = self.upper_bounds.get(token_id)
        return None, None if bound is None or math.isnan(bound) else float(bound), None

    def unrecovered_mass_bound(self) -> float:
        """An upper bound on the total probability of the unrecovered tokens."""
        missing = self.unrecovered_ids
        if not missing.size:
            return 0.0
        remainder = max(0.0, 1.0 - self.probability_sum())
        bounds = np.array([self.upper_bounds.get(int(i), math.nan) for i in missing])
        return remainder if np.isnan(bounds).any() else min(remainder, float(np.exp(bounds).sum()))


def roundoff(values: list[float] | tuple[float, ...]) -> float:
    """The unit roundoff of the returned numbers: bfloat16 if (a sample of) them all sit on its grid, else float32."""
    sample = np.asarray(values[:4096], dtype=np.float64)
    as32 = sample.astype(np.float32)
    on_grid = (as32.astype(np.float64) == sample).all() and not (as32.view(np.uint32) & 0xFFFF).any()
    if sample.size and on_grid and (sample != np.round(sample)).any():
        return BFLOAT16_ROUNDOFF
    return FLOAT32_ROUNDOFF


def bias_response(before: Answer, after: Answer, target: int, bias: float) -> tuple[bool, bool]:
    """What biasing `target` by `bias` did, from the unbiased answer and the biased one.

    (bias steers sampling: target was generated; logprobs are post-bias: lp'_target - lp'_top
    moved by the bias, identity 1 with two biases, or lp'_target alone moved when the old top
    left the list).
    """
    top, value = before.top_ids[0], before.top()[target]
    seen = after.top()
    moved = False
    if target in seen and top in seen:
        shift = (seen[target] - seen[top]) - (value - before.top_logprobs[0])
        moved = abs(shift - bias) < 0.05 * bias + 0.1
    elif target in seen:
        moved = abs(seen[target] - value) > 0.05 * bias
    return after.sampled == target, moved


def check_bias(ctx: Context, needs: str, method: str) -> Generator[list[Query], list[Answer], tuple[Answer, dict]]:
    """Two calls (up to four; one where the probe observed the bias) that tell how the endpoint treats logit_bias,
    before a method spends more.

    Call 1 asks for the unbiased top-k. Call 2 biases the last visible token t that is not held
    (ctx.withheld; the one before if the endpoint still withholds t's answer, up to three tries) by
    b = (lp_top - lp_t) + 2, enough to make it the argmax by 2 nats, and reads back:
      - bias steers sampling: t is the generated token;
      - logprobs are post-bias: lp'_t - lp'_top moved by b (identity 1 with two biases).
    Where the endpoint returns one logprob a call (k = 1), call 2 lowers the top token by -B
    instead (`lowered_top_response`). `needs` is "post_bias" (exact, topk: k >= 2) or "steers"
    (bisection). Where the run's probe observed both (`Context.bias_observed`), call 2 is not sent: the
    probe's findings stand for it. Returns the first answer and the findings, with the calls made as
    "check_calls"; raises EndpointUnsuitable naming a method that would work.
    """
    k = max(ctx.top_k, 1)
    (first,) = yield [Query.make(top_logprobs=k)]
    found: dict[str, Any] = {"top_logprobs_returned": len(first.top_ids), "check_calls": 1}
    if first.withheld:
        raise _unbiased_withheld(method)
    least = 2 if needs == "post_bias" else 1
    if len(first.top_ids) < least:
        raise _too_few_returned(len(first.top_ids), k, least, method)
    if ctx.bias_observed is not None:
        steers, moved = ctx.bias_observed
        found.update(bias_steers_sampling=steers, logprobs_after_bias=moved)
        if (needs == "post_bias" and not moved) or (needs == "steers" and not steers):
            raise EndpointUnsuitable(
                f"{method} needs " + ("logprobs that move with the bias" if needs == "post_bias" else "a bias that steers "
                "sampling") + ", and the run's probe found this endpoint has none, so it cannot run here"
            )
        return first, found
    if len(first.top_ids) == 1:
        target, b = first.top_ids[0], -ctx.bias_max
        (second,) = yield [Query.make({target: b}, top_logprobs=1)]
        found["check_calls"] += 1
    else:
        target, b, second = yield from _lift_last(ctx, first, k, found)
    if second.withheld:
        raise _biased_withheld(len(first.top_ids), target, b, method)
    if len(first.top_ids) == 1:
        steers, moved = lowered_top_response(first, second)
    else:
        steers, moved = bias_response(first, second, target, b)
    found.update(bias_steers_sampling=steers, logprobs_after_bias=moved)
    if needs == "post_bias" and not moved:
        raise _not_post_bias(method, target, b, steers)
    if needs == "steers" and not steers:
        raise _not_steering(method, target, b, second.sampled, moved)
    return first, found


def _unbiased_withheld(method: str) -> EndpointUnsuitable:
    """check_bias's refusal when call 1, the unbiased query, was withheld."""
    return EndpointUnsuitable(
        f"the endpoint withheld its whole answer to the unbiased query (llama-server does so when the greedy "
        f"token ends in an incomplete UTF-8 sequence and it cannot list such tokens), so {method} cannot start: "
        'use method="visible", or "direct" if the server returns the whole vocabulary'
    )


def _too_few_returned(returned: int, k: int, least: int, method: str) -> EndpointUnsuitable:
    """check_bias's refusal when call 1 returned fewer than the `least` logprobs `method` needs."""
    hint = 'try method="auto"' if returned == 1 else "check that the endpoint supports top_logprobs"
    return EndpointUnsuitable(
        f"the endpoint returned {returned} top logprobs when asked for {k}; {method} needs at least "
        f"{least} ({hint})"
    )


def _biased_withheld(returned: int, target: int, b: float, method: str) -> EndpointUnsuitable:
    """check_bias's refusal when every biased call 2 was withheld."""
    return EndpointUnsuitable(
        f"the endpoint withheld its answer each time a token of the top-{returned} was biased "
        f"(last: token {target} by {b:+.2f}), so {method} cannot tell what the bias does here"
    )


def _not_post_bias(method: str, target: int, b: float, steers: bool) -> EndpointUnsuitable:
    """check_bias's refusal when `method` needs post-bias logprobs and biasing `target` by `b` left its logprob."""
    if steers:
        alternative = 'Use {method}="bisection": the bias does steer which token is generated.'
    else:
        alternative = "The bias changed nothing at all, so no method can see beyond the top-k here."
    return EndpointUnsuitable(Worded(
        "{name} needs returned logprobs that move with logit_bias, but this endpoint reports them "
        "before the bias (token {target} biased by {bias:+.2f} kept its logprob). " + alternative,
        name=method, target=target, bias=b,
    ))


def _not_steering(method: str, target: int, b: float, sampled: int, moved: bool) -> EndpointUnsuitable:
    """check_bias's refusal when `method` needs the bias to steer sampling and token `sampled` stayed generated."""
    if moved:
        alternative = 'Use {method}="topk" or "exact": the returned logprobs do move with the bias.'
    else:
        alternative = "The bias changed nothing at all, so no method can see beyond the top-k here."
    return EndpointUnsuitable(Worded(
        "{name} needs logit_bias to change the generated token, but biasing token {target} by {bias:+.2f} "
        "({how}) left token {sampled} generated. " + alternative,
        name=method, target=target, bias=b, sampled=sampled,
        how="enough to make it the most likely" if b > 0 else "the top token, pushed down",
    ))


def _lift_last(ctx: Context, first: Answer, k: int, found: dict[str, Any]) -> Generator[list[Query], list[Answer], tuple]:
    """check_bias's call 2 where k >= 2: (target, bias, answer); the answer is withheld only if every try was."""
    for rank in probe_ranks(first, ctx.withheld)[:3]:
        # A token whose answer the endpoint withholds (llama.cpp: incomplete UTF-8) tells nothing: try the next.
        target = first.top_ids[rank]
        gap = first.top_logprobs[0] - first.top_logprobs[rank]
        b = min(ctx.bias_max, gap + 2.0)
        (second,) = yield [Query.make({target: b}, top_logprobs=k)]
        found["check_calls"] += 1
        if not second.withheld:
            break
    return target, b, second


def lowered_top_response(before: Answer, after: Answer) -> tuple[bool, bool]:
    """What lowering the unbiased top token by a large bias did, read through one-entry answers (k = 1).

    (bias steers sampling: another token was generated; logprobs are post-bias: the one returned entry
    is no longer the old top at its old value). Pre-bias logprobs keep listing the old top unchanged.
    """
    top, value = before.top_ids[0], before.top_logprobs[0]
    steers = not after.withheld and after.sampled != top
    listed = after.top()
    moved = top not in listed or abs(listed[top] - value) > 1e-3 + 1e-3 * abs(value)
    return steers, bool(after.top_ids) and moved


def probe_ranks(answer: Answer, withheld: frozenset[int]) -> list[int]:
    """Ranks of the answer's top-k worth biasing to see what the bias does, last first: every rank
    but the top whose token's answers are not withheld, or the last rank when there is none."""
    ranks = [r for r in range(len(answer.top_ids) - 1, 0, -1) if answer.top_ids[r] not in withheld]
    return ranks or [len(answer.top_ids) - 1]


def reference(first: Answer, ctx: Context) -> tuple[int, dict[int, float]] | None:
    """The best token of the unbiased top-k whose answers are not withheld, and the held tokens above it.

    Returns (r, {j: log p_j - log p_r} for the held tokens ranked above r). Biasing those tokens by -B
    makes r the unbiased argmax of every query when each gap is below B, so that a withheld answer can
    only name a held token the query lifts. None when that cannot be done: every returned token held,
    a gap of B or more (neither passes the checks), or more such tokens than a query has bias entries.
    """
    for rank, (i, lp) in enumerate(zip(first.top_ids, first.top_logprobs)):
        if i not in ctx.withheld:
            above = {j: v - lp for j, v in zip(first.top_ids[:rank], first.top_logprobs[:rank])}
            usable = len(above) < ctx.limits.bias_entries and max(above.values(), default=0.0) < ctx.bias_max
            return (i, above) if usable else None
    return None


def vector_from(answer: Answer, vocab_size: int) -> np.ndarray:
    """A vector of NaN (unknown) with the answer's top-k logprobs filled in, by token id."""
    logprobs = np.full(vocab_size, np.nan)
    logprobs[list(answer.top_ids)] = answer.top_logprobs
    return logprobs


def still_unknown(ctx: Context, logprobs: np.ndarray) -> np.ndarray:
    """The ids a plan has yet to read: the targets not known yet (in their order), or, without targets,
    every token not known yet (by id); never an unnamed one (ctx.unnamed), which no answer can give."""
    if ctx.targets:
        ids = np.asarray(ctx.targets, dtype=np.int64)
    else:
        ids = np.arange(logprobs.size, dtype=np.int64)
    ids = ids[np.isnan(logprobs[ids])]
    return ids[~np.isin(ids, list(ctx.unnamed))] if ctx.unnamed else ids


def unnamed_note(ctx: Context) -> list[str]:
    """The note a result carries for the unnamed tokens it leaves out (the targets among them, or all of them)."""
    left = [i for i in ctx.targets if i in ctx.unnamed] if ctx.targets else ctx.unnamed
    if not left:
        return []
    return [
        f"{len(left):,} token{'s' * (len(left) != 1)} render{'s' * (len(left) == 1)} as a text another token shares "
        "(or as none), and the "
        "endpoint names tokens by text only: unrecovered, with no bound"
    ]


def chunks(items: list[int] | np.ndarray, size: int) -> list[list[int]]:
    """Split items into consecutive lists of at most `size`."""
    items = [int(i) for i in items]
    return [items[i : i + size] for i in range(0, len(items), size)]
