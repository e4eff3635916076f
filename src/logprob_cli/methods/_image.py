"""`topk+image`, `forced+image`, `bisection+image`: a whole vector from about r values, through the model's low-rank image.

A model's logits are z = W h (+ an output bias u), W its V x d output matrix, so every logprob
vector it can give, log p = z - logsumexp(z) 1, lies in span(B), B = [W, u, 1] (V x r, r <= d + 2;
Finlayson et al. 2024). With Q an orthonormal basis of that span (`Image`), a prompt's vector is
l = Q c for one c in R^r, fixed by its values on r well-chosen tokens.

Which tokens: greedy pivoting on the rows of Q (pivoted QR of Q^T, done as a pivoted Cholesky of
Q Q^T that never forms it): each step takes the token whose row has the largest norm once the rows
taken are projected out. Its r pivots S0 make Q[S0] well conditioned; a second pass over the other
tokens gives `MARGIN` more for the fit (S = S0 + those) and `CHECKS` more read only to verify (C).

The plan runs the base method (`topk`, `forced` or `bisection`) with targets S + C, so it reads them as
it reads any chosen tokens (at eps / 2 Lambda, below), then solves the least squares c = argmin |Q_F c - y_F| over F = the tokens of S
it read plus the top-k its first call showed, and sets l = Q c - logsumexp(Q c) 1.

Verification: with the read values y = l_true + delta, |delta| <= p (the base method's precision),
and A = Q_F, the residual of a token t is (Q_t A^+ delta_F - delta_t) for t in C, ((A A^+ - I) delta)_t
for t in F, so |res_t| <= (1 + |Q_t A^+|_1) p for the right model. The image fits when every
|res_t| <= FIT_FACTOR times that; otherwise (another model, a non-linear output, a wrong file) the
result is the base method's values for what was read, every other token unrecovered (with
Context.whole_fallback, --image auto's: the base method's whole vector, read afresh), and a note
says the image did not fit: never a vector from a wrong image.

Learned (`Learner`, --image auto): the image of the run's first whole vectors, the rank from their
singular values once max(LEARN_MARGIN, r / 2) vectors in a row add no direction (class doc).

Precision (stated in the result): with rho = max(p, the largest residual on F and C) the observed
error level of the read values and Lambda = max_i |Q_i A^+|_1 over every token i (the conditioning of
the choice, a Lebesgue constant: the value of token i is Q_i A^+ y_F, so its error |Q_i A^+ delta_F|
is at most |Q_i A^+|_1 rho), each value of Q c is within Lambda rho of the truth, and normalising
moves every value by at most that again: precision = 2 Lambda rho. A worst case over the signs of the
errors: measured errors stay well below it.

The base reads at eps / 2 Lambda(S), Lambda(S) the constant above for the planned fit tokens, so that 2 Lambda rho,
with rho (about half the base's eps, plus rounding) comes out at or below the requested eps: only bisection's
reads have a precision that eps sets (topk's and forced's are exact up to rounding, and ignore it).

Calls: the base method's for r + MARGIN + CHECKS chosen tokens (fewer where the first call shows some), at
eps / 2 Lambda. For the count (`image_calls`, which knows only the rank) Lambda is taken as r / 4: measured 15
(simulator, r = 66) and 104 (SmolLM2, r = 577); bisection's calls grow as ln(Lambda / eps), so a factor 2 off
in Lambda moves its count by about 5%. Bisection spends about 10% more on the pivoted tokens than on as many
chosen tokens (which its own count was fitted on): pivoting picks tokens whose logits vary most, far from the
top (BISECTION_SPREAD, measured on the simulator).

Argmax-only (`bisection+image`): every answer says only which token won under the biases; reading the r + 16
tokens by bisection and solving costs about 355 calls a prompt for all 100,000 tokens of the simulator at
eps 1e-3 (OpenAI's contract: pre-bias logprobs, -9999 for a forced token), where plain bisection needs about
250,000. Measured: `python benchmarks/image_bisection.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from logprob_cli.endpoints import EndpointUnsuitable, Limits
from logprob_cli.errors import Worded
from logprob_cli.methods import _bisection, _forced, _topk
from logprob_cli.methods._base import Context, MethodResult, Plan
from logprob_cli.methods._spec import MethodSpec

LEARN_MARGIN = 8  # whole vectors beyond the rank, adding no direction, before a learned image is trusted
MARGIN = 8  # fit tokens beyond the rank: least squares, so one misread token shows as a residual
CHECKS = 8  # tokens read only to verify the solved vector
FIT_FACTOR = 4.0  # how far a residual may exceed its noise bound before the image is judged not to fit
BISECTION_SPREAD = 1.1  # bisection's calls for the pivoted tokens against as many chosen ones (module doc, "Calls")
RANK_TOLERANCE = 1e-6  # singular values below this fraction of the largest (unit-norm columns) are dropped


@dataclass(frozen=True, eq=False)
class Image:
    """An orthonormal basis of a model's logprob image and where it came from.

    basis: V x r float64 with orthonormal columns whose span holds the all-ones vector.
    source: where the image came from (a file name, "simulator seed 0", ...), recorded in the output.
    """

    basis: np.ndarray
    source: str

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.basis.shape[0])

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, source: str) -> Image:
        """The image of a V x d output matrix (its columns: W's, an output bias if any), the ones vector added.

        Each column is scaled to unit norm, then B = QR (Householder) and R's singular values tell the rank:
        those below RANK_TOLERANCE of the largest are dropped, so a repeated or zero column costs nothing."""
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.ndim == 1:
            matrix = matrix[:, None]
        if matrix.ndim != 2 or not np.isfinite(matrix).all():
            raise ValueError(f"an image needs a finite V x d matrix; got shape {matrix.shape}")
        columns = np.hstack([matrix, np.ones((matrix.shape[0], 1))])
        norms = np.linalg.norm(columns, axis=0)
        columns = columns[:, norms > 0] / norms[norms > 0]
        q, r = np.linalg.qr(columns)
        u, s, _ = np.linalg.svd(r)
        keep = s > RANK_TOLERANCE * s[0]
        return cls(np.ascontiguousarray(q @ u[:, keep]), source)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, precision: float, source: str) -> Image:
        """The image spanned by N whole logprob vectors (the rows of `vectors`, N x V), read to `precision` nats:
        with their mean value removed (their components along the ones vector), their singular values above
        p sqrt(V N) (the norm of an error of p on every entry, which bounds the errors' largest singular value)
        are the model's, the rest the reading errors', so the rank r is 1 + their count, never assumed; the basis
        is the ones vector and those r - 1 left singular vectors: the least-squares subspace of the vectors, which
        averages their reading errors. Fewer vectors than the model's rank give part of its image, which the
        verification then refuses."""
        centred = np.asarray(vectors, dtype=np.float64).T
        centred = centred - centred.mean(axis=0)
        left, sigma, _ = np.linalg.svd(centred, full_matrices=False)
        floor = max(precision * math.sqrt(centred.size), RANK_TOLERANCE * sigma[0])
        ones = np.ones((centred.shape[0], 1)) / math.sqrt(centred.shape[0])
        return cls(np.hstack([ones, left[:, sigma > floor]]), source)

    def reading(self, avoid: frozenset[int] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
        """(S, C): the r + MARGIN tokens the solve uses and the CHECKS tokens read to verify (module doc), none
        of them in `avoid` (the tokens whose answers the endpoint withholds, which forced could only search)."""
        cache = self.__dict__.setdefault("_readings", {})  # frozen fields; the cache is the one attribute set later
        if avoid not in cache:
            taken = np.zeros(self.vocab_size, dtype=bool)
            taken[list(avoid)] = True
            first = pivots(self.basis, min(self.rank, self.vocab_size - len(avoid)), taken)
            taken[first] = True
            extra = pivots(self.basis, min(MARGIN + CHECKS, self.vocab_size - int(taken.sum())), taken)
            cache[avoid] = (np.concatenate([first, extra[:MARGIN]]), extra[MARGIN:])
        return cache[avoid]


    def conditioning(self, fit: np.ndarray) -> float:
        """The Lebesgue constant of solving through the tokens `fit` (module doc, "Precision"), cached by them."""
        cache = self.__dict__.setdefault("_conditioning", {})
        key = fit.tobytes()
        if key not in cache:
            cache[key] = lebesgue_constant(self.basis, np.linalg.pinv(self.basis[fit]))
        return cache[key]


class Learner:
    """The image learned from whole vectors of one model (`--image auto`), added in the order they finished.

    The rank: each vector l (float64 of what the run stored) is orthogonalised against the directions found so far
    (the ones vector first; Gram-Schmidt applied twice); its component outside their span, e = l - P P^T l, is a new
    direction where |e| > max(RANK_TOLERANCE |l|, FIT_FACTOR p sqrt(V)), p the vector's stated precision: p sqrt(V)
    is the norm of an error of p on every token, so a component no larger could be the reading error alone, and
    FIT_FACTOR is the slack the verification allows too (on the simulator, V = 5,000: the 65 vectors that add a
    direction leave 35 to 400 outside the span, the others 0.0005 to 0.002, against p sqrt(V) = 0.0017). Once the
    last `settle(r)` vectors added none (r the directions found), the learning stops.

    The rank and the basis: not those directions, which carry the reading errors of the one vector each came from,
    but `Image.from_vectors` of all the N vectors seen, p the largest precision stated: the rank from their singular
    values (on the simulator: 140 and above against 2e-4, the bound 0.02), the basis their least-squares subspace. Averaging over the extra
    vectors is what `settle` pays for: on the simulator (V = 5,000, errors of float32 reads at bias 100, r = 66)
    the vectors solved through it are off by at most 2e-4 nats from 73 vectors, 7e-5 from 100, 5e-5 from 200.

    The image depends only on the vectors and their order, so a resumed run that adds the same vectors in the same
    order rebuilds it, bit for bit on the same machine. A vector with an unrecovered token cannot fix a direction
    (`usable`). Vectors of two models give the union of their images (rank up to twice as high): vectors of either
    still lie in it, so a model changed during learning makes the solve cost more, never a wrong vector; one
    changed later is caught by the verification.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.directions = np.ones((vocab_size, 1)) / math.sqrt(vocab_size)
        self.vectors: list[np.ndarray] = []
        self.precision = 0.0  # the largest stated precision of the vectors seen
        self.unchanged = 0  # vectors in a row that added no direction

    @staticmethod
    def usable(logprobs: np.ndarray) -> bool:
        """Whether a vector can teach the image: every token recovered."""
        return bool(np.isfinite(logprobs).all())

    @staticmethod
    def settle(rank: int) -> int:
        """The vectors in a row that must add no direction before the image is built: LEARN_MARGIN, or half the
        rank where that is more (class doc, "The basis")."""
        return max(LEARN_MARGIN, math.ceil(rank / 2))

    def wanted(self) -> int:
        """The vectors still needed if no more of them adds a direction, settle(r) less those in a row that added
        none (at least 1 until the image is ready): a run starts no more whole vectors than that at once, so few
        are in flight when the image is ready."""
        return self.settle(self.directions.shape[1]) - self.unchanged

    def add(self, logprobs: np.ndarray, precision: float, source: str) -> Image | None:
        """Learn from one more whole vector (class doc); the image, named `source`, once ready, else None."""
        vector = np.asarray(logprobs, dtype=np.float64)
        if vector.shape != (self.vocab_size,) or not self.usable(vector):
            raise ValueError(f"a learned image needs whole vectors of {self.vocab_size:,} tokens")
        self.vectors.append(vector.astype(np.float32))
        self.precision = max(self.precision, precision)
        outside = vector - self.directions @ (self.directions.T @ vector)
        outside -= self.directions @ (self.directions.T @ outside)
        size = float(np.linalg.norm(outside))
        noise = FIT_FACTOR * precision * math.sqrt(self.vocab_size)
        if size > max(RANK_TOLERANCE * float(np.linalg.norm(vector)), noise):
            self.directions = np.hstack([self.directions, (outside / size)[:, None]])
            self.unchanged = 0
            return None
        self.unchanged += 1
        if self.unchanged < self.settle(self.directions.shape[1]):
            return None
        return Image.from_vectors(np.vstack(self.vectors), self.precision, source)


def learning_prompts(rank: int) -> int:
    """The whole vectors --image auto reads before its image is ready, for a model whose image has this rank:
    rank - 1 that each add a direction (the ones vector is the rank's last), then Learner.settle(rank) that add
    none."""
    return rank - 1 + Learner.settle(rank)


def pivots(q: np.ndarray, count: int, excluded: np.ndarray) -> np.ndarray:
    """`count` row ids of q chosen greedily, none of them `excluded`: each the row of largest norm once the
    rows chosen before are projected out (pivoted Cholesky of q q^T: one product with q a step)."""
    residual = np.einsum("ij,ij->i", q, q)
    residual[excluded] = -np.inf
    factors = np.zeros((q.shape[0], count))
    chosen: list[int] = []
    for step in range(count):
        i = int(np.argmax(residual))
        if residual[i] <= 0:  # only excluded rows left: cannot happen while count fits the vocabulary
            break
        column = q @ q[i] - factors[:, :step] @ factors[i, :step]
        factors[:, step] = column / math.sqrt(residual[i])
        residual -= factors[:, step] ** 2
        residual[i] = -np.inf
        chosen.append(i)
    return np.asarray(chosen, dtype=np.int64)


def plan(ctx: Context, base: Callable[[Context], Plan], name: str) -> Plan:
    """The plan (module doc): the base method reads S + C, then the solve and its verification."""
    image = _image_for(ctx, name)
    fit, check = image.reading(ctx.withheld)
    if ctx.targets and len(ctx.targets) <= fit.size + check.size:  # reading them is cheaper than the image
        return (yield from base(ctx))
    chosen = tuple(int(i) for i in np.concatenate([fit, check]))
    read = yield from base(dataclasses.replace(ctx, targets=chosen, eps=ctx.eps / (2 * image.conditioning(fit))))
    solved = solve(image, read, check)
    if isinstance(solved, str):
        misfit = f"the image ({image.source}, rank {image.rank}) did not fit this vector: {solved}"
        if ctx.whole_fallback:
            whole = yield from base(dataclasses.replace(ctx, image=None))
            whole.notes.append(f"{misfit}; read whole by {name.removesuffix('+image')} instead")
            return whole
        read.notes.append(f"{misfit}; only the tokens read are given")
        return read
    logprobs, precision, note = solved
    if ctx.targets:
        keep = np.zeros(ctx.vocab_size, dtype=bool)
        keep[list(ctx.targets)] = True
        logprobs[~keep & np.isnan(read.logprobs)] = math.nan
    behaviour = {**read.behaviour, "image_source": image.source, "image_rank": image.rank}
    return MethodResult(logprobs, {}, precision, behaviour, [*read.notes, note])


def _image_for(ctx: Context, name: str) -> Image:
    """ctx.image, refused (EndpointUnsuitable) where there is none or its rows are not the vocabulary."""
    image = ctx.image
    if image is None:
        raise EndpointUnsuitable(Worded("{method} {name} needs the model's image: give {image}", name=name))
    if image.vocab_size != ctx.vocab_size:
        raise EndpointUnsuitable(
            f"the image ({image.source}) has {image.vocab_size:,} rows but the endpoint's vocabulary has "
            f"{ctx.vocab_size:,} tokens: it is not this model's output matrix"
        )
    return image


def solve(image: Image, read: MethodResult, check: np.ndarray) -> tuple[np.ndarray, float, str] | str:
    """(the normalised vector Q c, its precision, a note), or why the image does not fit (module doc)."""
    q, values = image.basis, read.logprobs
    known = ~np.isnan(values)
    checked = np.zeros_like(known)
    checked[check] = True
    fit = np.flatnonzero(known & ~checked)
    verify = np.flatnonzero(known & checked)
    a = q[fit]
    sigma = np.linalg.svd(a, compute_uv=False) if fit.size >= image.rank else np.zeros(1)
    if sigma[-1] <= RANK_TOLERANCE * sigma[0]:
        return f"{fit.size} tokens were read, too few to fix a vector of rank {image.rank}"
    pinv = np.linalg.pinv(a)
    c = pinv @ values[fit]
    rows = np.concatenate([fit, verify])
    residual = np.abs(q[rows] @ c - values[rows])
    allowed = FIT_FACTOR * (1.0 + np.abs(q[rows] @ pinv).sum(axis=1)) * read.precision
    worst = int(np.argmax(residual / allowed))
    if residual[worst] > allowed[worst]:
        return (f"token {rows[worst]} is off by {residual[worst]:.3g} nats where the reading precision "
                f"allows {allowed[worst]:.3g}")
    logits = q @ c
    top = logits.max()
    logprobs = logits - (top + math.log(np.exp(logits - top).sum()))
    rho = max(read.precision, float(residual.max()))
    conditioning = lebesgue_constant(q, pinv)
    note = (f"whole vector solved through the image ({image.source}, rank {image.rank}) from {fit.size} values, "
            f"verified on {verify.size} more (largest residual {residual.max():.2g} nats)")
    return logprobs, 2 * conditioning * rho, note


def lebesgue_constant(q: np.ndarray, pinv: np.ndarray, rows: int = 8192) -> float:
    """max_i |Q_i A^+|_1 over every row of q (module doc), a block of `rows` tokens at a time."""
    return max(float(np.abs(q[i : i + rows] @ pinv).sum(axis=1).max()) for i in range(0, q.shape[0], rows))


def image_calls(base_calls: Callable[..., int], spread: float, vocab_size: int, top_k: int, eps: float,
                limits: Limits, targets: int = 0, rank: int | None = None) -> int:
    """The base method's calls for the r + MARGIN + CHECKS tokens read at eps / 2 Lambda (module doc, "Calls"),
    times `spread` (or for `targets` at eps, when fewer). The rank comes from the image (the caller passes it:
    MethodSpec.calls of a method that needs one); without it the count is unknown (ValueError)."""
    if rank is None:
        raise ValueError(Worded("the calls of an image method depend on the image's rank: give the image ({image})"))
    reads = min(rank + MARGIN + CHECKS, vocab_size)
    if targets and targets <= reads:  # read directly (plan): at the requested eps
        return base_calls(vocab_size, top_k, eps, limits, targets)
    return math.ceil(spread * base_calls(vocab_size, top_k, eps / max(1.0, rank / 2), limits, reads))


SPECS = tuple(
    MethodSpec(
        f"{base.SPEC.name}+image", partial(plan, base=base.plan, name=f"{base.SPEC.name}+image"),
        help=f"{base.SPEC.name}, reading about r + {MARGIN + CHECKS} tokens and solving the rest through the "
        "model's rank-r image (needs image=)",
        needs=dataclasses.replace(base.SPEC.needs, image=True),
        calls=partial(image_calls, base.SPEC.calls, spread), exact_count=False, checks_bias=base.SPEC.checks_bias,
    )
    for base, spread in ((_topk, 1.0), (_forced, 1.0), (_bisection, BISECTION_SPREAD))
)
