"""A built-in simulated endpoint: the offline default and the ground truth for tests.

It answers what an OpenAI-style endpoint answers for `max_tokens=1`: the greedy token and
the top-k logprobs. It computes as an engine does, in low precision, so numerical
weaknesses of a method show here as they would on a real server:

    z'   = z + b                       (float32, or bfloat16 when precision="bfloat16")
    lp'  = (z' - max z') - log(sum(exp(z' - max z')))      in float32

The model looks like a real LM's output layer: logits z = W h + u, with W a fixed V x d
matrix (d = 64), h a prompt-dependent vector pulled toward a few plausible tokens (a
peaked head), and u a Zipf-like unigram term; the tail reaches below -40 nats. The
logits are a deterministic function of the prompt and the seed.

Every behaviour a method depends on is a switch (see `SimulatorConfig`), so each
method's failure mode can be produced on purpose. `true_logprobs` gives the exact
distribution (float64 log-softmax of the float32 logits) and `calls` counts requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Iterable, Literal

import numpy as np

from logprob_cli.endpoints._base import (
    Answer, Endpoint, EndpointDescription, EndpointRejected, Limits, Prompt, Query, approx_tokens, with_chosen,
)
from logprob_cli.wording import plural

SIMULATOR_MODEL = "simulator"
_SUBNORMAL_EXP = np.float32(-87.3)  # exp(x) < float32's smallest normal below this
# One consonant and one vowel each: a prefix-free code, so distinct syllable strings stay distinct words.
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]


@dataclass(frozen=True)
class SimulatorConfig:
    """The simulated endpoint's model and behaviour.

    vocab_size, hidden_size, seed: the model (a V x d output layer, deterministic per seed).
    top_logprobs_cap: the most top logprobs a request may ask for (OpenAI: 20).
    bias_max, bias_entries: logit_bias values are clipped to [-bias_max, bias_max]; more
        than bias_entries entries is rejected.
    logprobs_after_bias: returned logprobs reflect the bias (True) or are the unbiased
        ones (False: OpenAI since 2024, vLLM and llama.cpp defaults).
    bias_steers_sampling: the bias changes which token is generated.
    sampled_logprob: a generated token outside the returned top-k reports its own
        logprob ("report": llama.cpp, vLLM) or -9999 ("sentinel": OpenAI's contract).
    precision: arithmetic of the biased logits and returned values.
    tie_noise: standard deviation (nats) of fresh per-call noise on every logit, the
        nondeterminism of a real engine at temperature 0; 0 means none.
    chosen_ids: how many chosen token ids a request may list to get their logprobs besides the
        top-k (vLLM's logprob_token_ids, here alongside the top-k); 0 (default): none.
    max_draws: how many choices a request may draw at a temperature (OpenAI's `n`, which it documents up to
        128); 1 (default): none beyond the greedy one.
    """

    vocab_size: int = 100_000
    hidden_size: int = 64
    seed: int = 0
    top_logprobs_cap: int = 20
    bias_max: float = 100.0
    bias_entries: int = 300
    logprobs_after_bias: bool = True
    bias_steers_sampling: bool = True
    sampled_logprob: Literal["report", "sentinel"] = "report"
    precision: Literal["float32", "bfloat16"] = "float32"
    tie_noise: float = 0.0
    chosen_ids: int = 0
    max_draws: int = 1

    def __post_init__(self) -> None:
        """Refuses a value the simulator would ignore or crash on, naming the field and its allowed range."""
        _check_int("vocab_size", self.vocab_size, 300, MAX_VOCAB_SIZE)
        _check_int("hidden_size", self.hidden_size, 1, MAX_HIDDEN_SIZE)
        _check_int("seed", self.seed, 0, None)
        _check_int("top_logprobs_cap", self.top_logprobs_cap, 1, self.vocab_size)
        _check_int("bias_entries", self.bias_entries, 1, None)
        _check_int("chosen_ids", self.chosen_ids, 0, None)
        _check_int("max_draws", self.max_draws, 1, None)
        _check_float("bias_max", self.bias_max, "a finite number above 0", lambda x: x > 0)
        _check_float("tie_noise", self.tie_noise, "a finite number, 0 or above", lambda x: x >= 0)
        for name in ("logprobs_after_bias", "bias_steers_sampling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be float32 or bfloat16, got {self.precision!r}")
        if self.sampled_logprob not in ("report", "sentinel"):
            raise ValueError(f"sampled_logprob must be report or sentinel, got {self.sampled_logprob!r}")


MAX_VOCAB_SIZE = 2_000_000  # the V x d float32 output layer must fit in memory (2M x 64 = 512 MB)
MAX_HIDDEN_SIZE = 1024


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    allowed = f"an integer from {low:,} to {high:,}" if high is not None else f"an integer, {low:,} or above"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value:,}")


def _check_float(name: str, value: Any, allowed: str, ok: Any) -> None:
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def prompt_digest(content: Any) -> bytes:
    """A stable digest of a prompt's text or messages."""
    return hashlib.blake2b(json.dumps(content, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).digest()


class SimulatedModel:
    """The logits of the simulated LM: z = W h(prompt) + u, computed in float32."""

    def __init__(self, vocab_size: int, hidden_size: int, seed: int, precision: str = "float32"):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.seed = seed
        self.precision = precision
        rng = np.random.default_rng([seed, vocab_size, hidden_size])
        self._rank = rng.permutation(vocab_size)
        self._unigram = (-1.0 * np.log(self._rank + 2.0)).astype(np.float32)
        self._w = rng.standard_normal((vocab_size, hidden_size), dtype=np.float32)
        self._frequent = np.argsort(self._rank)[: min(2000, vocab_size)]
        self._cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def output_matrix(self) -> np.ndarray:
        """[W, u]: the V x (d + 1) float32 output layer and unigram term, whose columns (with the ones vector)
        span every logprob vector of this model: its image, for the image methods."""
        return np.hstack([self._w, self._unigram[:, None]])

    def logits(self, content: Any) -> np.ndarray:
        """The model's float32 logits for a prompt (bfloat16-rounded in bfloat16 mode)."""
        return self._entry(content)[0]

    def order(self, content: Any) -> np.ndarray:
        """Token ids sorted by descending logit (ties by id)."""
        return self._entry(content)[1]

    def _entry(self, content: Any) -> tuple[np.ndarray, np.ndarray]:
        key = prompt_digest(content)
        hit = self._cache.get(key)
        if hit is None:
            rng = np.random.default_rng([self.seed, *np.frombuffer(key, dtype=np.uint32)])
            h = rng.standard_normal(self.hidden_size).astype(np.float32) * 0.6
            targets = rng.choice(self._frequent, 3, replace=False)
            for t, weight in zip(targets, rng.dirichlet([1.0, 1.0, 1.0])):
                h += (2.2 * weight * self._w[t] / np.linalg.norm(self._w[t])).astype(np.float32)
            z = (self._w @ h + self._unigram).astype(np.float32)
            if self.precision == "bfloat16":
                z = to_bfloat16(z)
            order = np.lexsort((np.arange(self.vocab_size), -z))
            hit = (z, order)
            if len(self._cache) > 64:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = hit
        return hit


@lru_cache(maxsize=8)
def _shared_model(vocab_size: int, hidden_size: int, seed: int, precision: str) -> SimulatedModel:
    return SimulatedModel(vocab_size, hidden_size, seed, precision)


class SimulatedEndpoint(Endpoint):
    """The simulator behind the `Endpoint` contract (see module docstring): in process, one answer at a time,
    token ids exact, nothing withheld and no mapping to check."""

    model = SIMULATOR_MODEL
    in_process = True
    one_call_at_a_time = True
    token_context = True

    def __init__(self, config: SimulatorConfig | None = None, system: str | None = None):
        self.config = config or SimulatorConfig()
        self.system = system or None
        c = self.config
        self.vocab_size = c.vocab_size
        self.limits = Limits(c.top_logprobs_cap, c.bias_max, c.bias_entries, token_ids=c.chosen_ids, draws=c.max_draws)
        self.sim = _shared_model(c.vocab_size, c.hidden_size, c.seed, c.precision)
        self.image_rank = c.hidden_size + 2  # W's columns, the unigram term u, the ones vector
        self.calls = 0
        self._noise = np.random.default_rng([c.seed, 7])

    def describe(self) -> EndpointDescription:
        system = {"system": self.system} if self.system else {}  # absent without one, as before it was honoured
        settings = asdict(self.config)
        if not settings["chosen_ids"]:
            del settings["chosen_ids"]  # absent when off, as before it existed, so checkpoints still resume
        if settings["max_draws"] == 1:
            del settings["max_draws"]  # likewise
        return EndpointDescription(
            "simulator", self.model,
            f"built-in simulated endpoint (offline, no API key; {self.vocab_size:,}-token vocabulary)",
            {**settings, **system},
        )

    def token_text(self, token_id: int) -> str:
        """The token's bytes (simulator_token_bytes) as text, invalid UTF-8 replaced; f"#{id}" outside the vocabulary."""
        if not 0 <= token_id < self.vocab_size:
            return f"#{token_id}"
        return simulator_token_bytes(token_id).decode("utf-8", errors="replace")

    async def split_text(self, text: str) -> tuple[int, ...]:
        """`simulator_split` in a worker thread (its first call builds the vocabulary's bytes -> id map)."""
        return await asyncio.to_thread(simulator_split, text, self.vocab_size)

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """What the simulator bills when served (server.py): about four bytes a token of what the model reads."""
        return approx_tokens(self.content(prompt))

    def content(self, prompt: Prompt | Any) -> Any:
        """What the model reads for a prompt (a `Prompt`, its text or its messages): the chat messages
        as given; plain text as is, or, with a system message, as [system, user] messages as a chat
        API sends them (so the served simulator, asked with --system, answers the same).

        A Prompt with `context_ids` (a position of a completion, `token_context`) reads [that content,
        *context_ids]: the form llama-server's completions API takes for a text followed by exact token ids.
        So the simulator's distribution after a prompt and tokens t1..tk is, by definition, its distribution
        for the content [prompt, t1, ..., tk] (`true_logprobs` of that list is the ground truth), distinct for
        every token sequence and independent of how the tokens' bytes would re-tokenize."""
        value = prompt.content() if isinstance(prompt, Prompt) else prompt
        if self.system and isinstance(value, str):
            value = [{"role": "system", "content": self.system}, {"role": "user", "content": value}]
        if isinstance(prompt, Prompt) and prompt.context_ids:
            return [value, *(int(i) for i in prompt.context_ids)]
        return value

    def true_logprobs(self, prompt: Prompt | Any) -> np.ndarray:
        """The exact log-probabilities (float64) of the model's logits for a prompt."""
        z = self.sim.logits(self.content(prompt)).astype(np.float64)
        m = z.max()
        return z - m - np.log(np.exp(z - m).sum())

    async def ask(self, prompt: Prompt, query: Query) -> Answer:
        """`answer`, after yielding to the event loop once as a network call would: the answer itself is
        computed without a pause, so without the yield one task could answer a whole queue of calls while
        Ctrl-C and every other task of the loop wait."""
        await asyncio.sleep(0)
        return self.answer(prompt, query)

    def answer(self, prompt: Prompt | Any, query: Query) -> Answer:
        """Answer a query synchronously (the `ask` contract without the event loop)."""
        c = self.config
        self.limits.check(query, c.vocab_size)
        if query.top_logprobs > c.top_logprobs_cap or query.top_logprobs < 0:
            raise EndpointRejected(f"top_logprobs must be between 0 and {c.top_logprobs_cap}, got {query.top_logprobs}")
        if len(query.bias) > c.bias_entries:
            raise EndpointRejected(f"logit_bias may have at most {plural(c.bias_entries, 'entry', 'entries')}, got {len(query.bias)}")
        ids = np.fromiter((i for i, _ in query.bias), dtype=np.int64, count=len(query.bias))
        if ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
            raise EndpointRejected(f"logit_bias has a token id outside the vocabulary [0, {c.vocab_size})")
        self.calls += 1
        content = self.content(prompt)
        z = self.sim.logits(content)
        noisy = c.tie_noise > 0
        base = z + self._noise.standard_normal(z.size, dtype=np.float32) * np.float32(c.tie_noise) if noisy else z
        biased = self._biased(base, query)

        seen = biased if c.logprobs_after_bias else base
        steer = biased if c.bias_steers_sampling else base
        k = query.top_logprobs
        if noisy or not ids.size or not c.bias_steers_sampling or not c.logprobs_after_bias:
            top_seen = _top(seen, k)
            sampled = int(_top(steer, 1)[0])
        else:
            # The top of the biased logits lies among the biased ids and the unbiased leaders.
            candidates = np.union1d(ids, self.sim.order(content)[: k + ids.size + 1])
            local = _top(biased[candidates], max(k, 1))
            top_seen = candidates[local][:k]
            sampled = int(candidates[local[0]])
        drawn = self._draw(content, query, steer, sampled) if query.draws > 1 else ()
        if drawn:
            sampled = drawn[0]  # the first choice's token is the answer's own, as a server's first choice

        log_norm = _log_normalizer(seen)
        top_lp = self._reported(seen, top_seen, log_norm)
        reported: float | None = float(self._reported(seen, np.asarray([sampled]), log_norm)[0])
        if sampled not in top_seen[:k] and c.sampled_logprob == "sentinel":
            reported = None
        answer = Answer(sampled, reported, tuple(int(i) for i in top_seen), tuple(float(x) for x in top_lp), drawn=drawn)
        if not query.token_ids:
            return answer
        chosen = np.asarray(query.token_ids, dtype=np.int64)
        return with_chosen(answer, query, dict(zip(query.token_ids, self._reported(seen, chosen, log_norm).tolist())))

    def _draw(self, content: Any, query: Query, steer: np.ndarray, greedy: int) -> tuple[int, ...]:
        """`query.draws` choices drawn from softmax(steer / T) (T = query.temperature; 0: every choice the greedy
        token). The draws are a function of the prompt and the query (a replay draws the same), independent across
        distinct queries."""
        if query.temperature <= 0:
            return (greedy,) * query.draws
        scaled = steer.astype(np.float64) / query.temperature
        weights = np.exp(scaled - scaled.max())
        key = hashlib.blake2b(json.dumps(content, sort_keys=True).encode() + query.key(), digest_size=16).digest()
        rng = np.random.default_rng([self.config.seed, 11, *np.frombuffer(key, dtype=np.uint32)])
        counts = rng.multinomial(query.draws, weights / weights.sum())
        return tuple(int(i) for i in rng.permutation(np.repeat(np.arange(steer.size), counts)))

    def reported_logprobs(self, prompt: Prompt | Any, query: Query, ids: Iterable[int]) -> np.ndarray:
        """The logprobs an answer to `query` reports for `ids` (as a generated token or a top-k entry, without
        the fresh tie noise of a call): the served simulator's values for the choices after the first of a
        query drawing several (server.py)."""
        z = self.sim.logits(self.content(prompt))
        seen = self._biased(z, query) if self.config.logprobs_after_bias else z
        return self._reported(seen, np.fromiter(ids, dtype=np.int64), _log_normalizer(seen))

    def _biased(self, logits: np.ndarray, query: Query) -> np.ndarray:
        """The logits with the query's bias added (clipped to +-bias_max) in the simulator's precision."""
        c = self.config
        ids = np.fromiter((i for i, _ in query.bias), dtype=np.int64, count=len(query.bias))
        bias = np.clip(np.fromiter((b for _, b in query.bias), dtype=np.float32, count=ids.size), -c.bias_max, c.bias_max)
        biased = logits.copy()
        biased[ids] += bias
        if c.precision == "bfloat16" and ids.size:
            biased[ids] = to_bfloat16(biased[ids])
        return biased

    def _reported(self, seen: np.ndarray, ids: np.ndarray, log_norm: tuple[np.float32, np.float32]) -> np.ndarray:
        """The logprobs the simulator reports for `ids`: (z - max) - log sum exp in float32, rounded to
        bfloat16 in that precision; the same numbers for an id whether it is reported in the top-k, as the
        generated token or as a chosen id."""
        logprobs = (seen[ids] - log_norm[0]) - log_norm[1]
        return to_bfloat16(logprobs) if self.config.precision == "bfloat16" else logprobs




def _log_normalizer(x: np.ndarray) -> tuple[np.float32, np.float32]:
    """(max, log sum exp(x - max)) in float32, as an engine's log-softmax kernel does.

    Terms whose exp would be subnormal are flushed to zero, as GPU kernels do (and as
    x86 needs for speed: subnormal arithmetic is ~100x slower there).
    """
    m = x.max()
    shifted = x - m
    terms = np.zeros_like(shifted)
    np.exp(shifted, out=terms, where=shifted > _SUBNORMAL_EXP)
    return m, np.log(terms.sum(dtype=np.float32))


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, best first, ties broken by the lower index."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    k = min(k, values.size)
    part = np.argpartition(-values, k - 1)[:k] if k < values.size else np.arange(values.size)
    # Pull in every index tied with the k-th value so the tie-break by index is exact.
    kth = values[part].min()
    tied = np.flatnonzero(values >= kth)
    return tied[np.lexsort((tied, -values[tied]))][:k]


def simulator_token_bytes(token_id: int) -> bytes:
    """The simulator's vocabulary: ids 0-255 are single bytes, the rest made-up words.

    Word ids map one-to-one onto (leading space, syllable string) by a bijective base-N
    numeral, so every token's bytes are distinct.
    """
    if token_id < 256:
        return bytes([token_id])
    j = token_id - 256
    space, n = j % 2, j // 2
    parts = []
    base = len(_SYLLABLES)
    n += 1
    while n > 0:
        n -= 1
        parts.append(_SYLLABLES[n % base])
        n //= base
    word = "".join(reversed(parts))
    return ((" " if space else "") + word).encode()


@lru_cache(maxsize=4)
def _simulator_ids(vocab_size: int) -> tuple[dict[bytes, int], int]:
    """The simulator vocabulary's bytes -> id map and its longest token's length in bytes."""
    ids = {simulator_token_bytes(i): i for i in range(vocab_size)}
    return ids, max(map(len, ids))


def simulator_split(text: str, vocab_size: int) -> tuple[int, ...]:
    """The ids `text`'s UTF-8 bytes split into in the simulator's vocabulary of `vocab_size` tokens.

    The simulator has no tokenizer of its own, so the split is greedy, longest match first: at each
    position the longest token whose bytes start there. A text that is exactly one token's bytes is that
    one token, and every text splits (ids 0-255 are the single bytes).
    """
    ids, longest = _simulator_ids(vocab_size)
    data, split, start = text.encode("utf-8"), [], 0
    while start < len(data):
        end = min(len(data), start + longest)
        while data[start:end] not in ids:
            end -= 1
        split.append(ids[data[start:end]])
        start = end
    return tuple(split)
