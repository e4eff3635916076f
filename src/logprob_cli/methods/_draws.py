"""Chosen tokens located by drawn choices: the first phase of bisection's target search where the endpoint
draws several choices a request at a temperature (OpenAI's `n`, up to 128; `Limits.draws`).

A greedy call tells only which of a query's n targets (or the top token t0) wins: at most ln(n + 1) nats.
A call drawing m choices at temperature T tells far more once a target's bracket is narrow. Each choice is a
draw from softmax((z + b) / T). Let D_i = z_i - z_t0 (relative to the unbiased top t0, as in bisection), bias
target i by b_i and leave the visible top-k tokens r unbiased (their D_r = lp_r - lp_t0 the first answer
shows). Of the choices that drew target i or a visible token, the share of target i is, whatever the rest of
the vocabulary drew (a ratio of two multinomial cells),
    c_i | c_i + C  ~  Binomial(c_i + C, sigmoid(s_i)),   s_i = (D_i + b_i) / T - log sum_r exp(D_r / T),
with c_i the draws of target i and C those of the visible tokens. So each target has its own likelihood in
D_i, and a posterior: a prior on the proven bracket (lo, hi], times these likelihoods, on a grid refined to
where the posterior lies. The prior is proportional to |D|^-1.5: a token beyond the visible top-k lies a few
to a few tens of nats below the top, rarely near the -2B floor, and this scale-free density puts the first
splits there (the median of (-200, -3.3] is about -13; a uniform prior's is -100), where the draws are
informative (at T <= 2 a bias misses by more than ~10 nats tells only the side). It is a belief that
decides which queries to ask, never a value: the proofs below stand whatever it is. Measured against the
uniform prior (benchmarks/target_calls.py --draws 128, 30 prompts, eps 1e-3): 14.4 calls a prompt for 3
targets instead of 15.7, 25.7 for 10 instead of 27.5 (|D|^-1: 14.6; |D|^-2: 15.0).

Query design: every open target biased by minus its posterior median (so it draws about as often as the
visible top), T = K_T times the largest posterior standard deviation among them, within [T_MIN, T_MAX]
(OpenAI takes temperatures up to 2). A draw count then measures D_i to about T sqrt((1/c_i + 1/C)), a
fraction of the spread it started from, so the spread shrinks by a roughly constant factor a call for
every target at once (greedy bisection shrinks by at most (n + 1) a call for all n together). K_T = 0.3
measured cheapest (0.2 to 0.5 within 2%; 1: +17%, 2: +65%).

The phase ends for a target when the central interval holding all but 2 TAIL of its posterior is at most
eps wide (or wholly below -B: it cannot be lifted to t0 by any bias), or for all when T would fall
below T_MIN (finer draws would need temperatures engines treat as greedy) or after MAX_CALLS. These
intervals are a belief, not a proof: bisection then proves each with greedy calls (one call with every
target below its interval's top, one a target at its interval's bottom) and searches on from what
those calls prove where one fails.

Measured (benchmarks/target_calls.py: the float32 simulator under OpenAI's contract, m = 128, 3 targets
ranked 50 to 5,000, eps 1e-3, 60 prompts): 8.1 drawing calls and 4 proving calls for the 3, against 28.6 greedy ones.
"""

from __future__ import annotations

import math
from typing import Generator

import numpy as np

from logprob_cli.endpoints import Answer, Limits, Query

K_T = 0.3  # temperature, in units of the widest open posterior's standard deviation
T_MIN = 2e-5  # below this, engines may draw greedily (vLLM: 1e-5) and float32 logits / T lose their meaning
T_MAX = 2.0  # OpenAI's highest temperature
TAIL = 1e-4  # posterior mass left out on each side of a target's interval
PRIOR = 1.5  # the prior density of D on the bracket, proportional to |D|^-PRIOR (module doc)
PRIOR_FLOOR = 0.5  # |D| below this counts as this in the prior (D near 0 is the top's own level)
GRID = 2001  # points of a target's posterior grid
MAX_CALLS = 40  # drawing calls at most (measured runs: 12 or fewer)
MOST_DRAWS = 128  # choices a call asks for at most (OpenAI's cap on n)
FEWEST_DRAWS = 64  # fewer choices a call carry too little to beat greedy bisection (measured: 32 draws +0%)


def usable(limits: Limits, targets: int) -> bool:
    """Whether this phase runs for `targets` chosen tokens under `limits`: the endpoint draws enough choices a
    request to beat greedy bisection, and one query can bias every target."""
    return limits.draws >= FEWEST_DRAWS and 0 < targets <= limits.bias_entries


def extra_tokens(vocab_size: int, top_k: int, eps: float, limits: Limits, targets: int = 0) -> int:
    """The completion tokens the drawing calls bill beyond one a call (bisection's MethodSpec.extra_tokens): each
    draws min(draws, MOST_DRAWS) choices."""
    return calls(targets, eps) * (min(limits.draws, MOST_DRAWS) - 1) if usable(limits, targets) else 0


def calls(targets: int, eps: float) -> int:
    """The drawing calls for n targets at eps: 3.6 + 0.47 n + (1.06 + 0.14 n) log10(0.1 / eps), rounded (eps <= 0.1;
    the last term 0 above). A fit to measured runs (benchmarks/target_calls.py --draws 128: n 1, 2, 3, 5 and 10, eps
    1e-3 to 1e-1, 60 prompts each: with the n + 1 proving calls and the 2 before, within 6% of every mean)."""
    return round(3.6 + 0.47 * targets + (1.06 + 0.14 * targets) * max(0.0, math.log10(0.1 / eps)))


class Posterior:
    """One target's posterior over D on (lo, hi]: the drawn counts so far, read as the module doc says."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi
        self.seen: list[tuple[float, float, int, int, float]] = []  # (bias, T, c_i, C, log sum_r exp(D_r / T))

    def log_likelihood(self, x: np.ndarray) -> np.ndarray:
        total = np.zeros_like(x)
        for bias, temperature, mine, visible, log_w in self.seen:
            s = (x + bias) / temperature - log_w
            total -= mine * np.logaddexp(0.0, -s) + visible * np.logaddexp(0.0, s)
        return total

    def summary(self) -> tuple[float, float, float, float]:
        """(interval low, interval high, median, standard deviation), the grid refined to the posterior's bulk."""
        a, b = self.lo, self.hi
        for _ in range(4):
            x, cdf, p = self._grid(a, b)
            na, nb = _quantile(x, cdf, TAIL, below=True), _quantile(x, cdf, 1 - TAIL, below=False)
            step = x[1] - x[0]
            a, b = na, nb
            if nb - na > 20 * step:
                break
        x, cdf, p = self._grid(a, b)
        mean = float((p * x).sum())
        sd = math.sqrt(max(float((p * (x - mean) ** 2).sum()), 1e-18))
        return _quantile(x, cdf, TAIL, True), _quantile(x, cdf, 1 - TAIL, False), _quantile(x, cdf, 0.5, True), sd

    def _grid(self, a: float, b: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.linspace(a, b, GRID)
        log_p = self.log_likelihood(x) - PRIOR * np.log(np.maximum(-x, PRIOR_FLOOR))
        p = np.exp(log_p - log_p.max())
        p /= p.sum()
        return x, np.cumsum(p), p


def _quantile(x: np.ndarray, cdf: np.ndarray, q: float, below: bool) -> float:
    """The grid point at or just outside the posterior's q-quantile (below: the one before)."""
    i = int(np.searchsorted(cdf, q))
    return float(x[max(0, i - 1)] if below else x[min(x.size - 1, i + 1)])


def locate(
    targets: np.ndarray, lo: np.ndarray, hi: np.ndarray, visible: dict[int, float], draws: int, eps: float, big: float
) -> Generator[list[Query], list[Answer], tuple[dict[int, tuple[float, float]], int]]:
    """The drawing phase (module doc): for each target, the interval the draws place D_i in (a belief), and the calls.

    `visible`: D_r of the visible tokens (t0's 0 among them); lo, hi: the proven brackets; `draws`: the choices a
    request may draw. Ends early, with what it has, where an answer carries no draws (the endpoint ignored `n`).
    """
    posts = {int(i): Posterior(float(lo[i]), float(hi[i])) for i in targets}
    ids = np.fromiter(visible, dtype=np.int64)
    d_visible = np.fromiter(visible.values(), dtype=np.float64)
    m = min(draws, MOST_DRAWS)
    calls = 0
    while calls < MAX_CALLS:
        found = {i: post.summary() for i, post in posts.items()}
        open_ = [i for i, (a, b, _, _) in found.items() if b - a > eps and b > -big]
        if not open_:
            break
        temperature = min(T_MAX, K_T * max(found[i][3] for i in open_))
        if temperature < T_MIN:
            break
        biases = {i: float(np.clip(-found[i][2], -big, big)) for i in open_}
        (answer,) = yield [Query.make(biases, draws=m, temperature=temperature)]
        calls += 1
        if not answer.drawn:
            break
        drawn = np.asarray(answer.drawn, dtype=np.int64)
        visible_count = int(np.isin(drawn, ids).sum())
        log_w = float(np.logaddexp.reduce(d_visible / temperature))
        for i, bias in biases.items():
            posts[i].seen.append((bias, temperature, int((drawn == i).sum()), visible_count, log_w))
    found = {i: post.summary() for i, post in posts.items()}
    return {i: (a, b) for i, (a, b, _, _) in found.items()}, calls

