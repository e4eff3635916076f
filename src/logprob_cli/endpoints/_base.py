"""The endpoint contract: "this prompt, this bias" in, "what the API returned" out.

Methods speak only in token ids and numbers. Every backend (the built-in simulator,
OpenAI-compatible HTTP servers) turns a `Query` into an `Answer` and hides transport,
retries and dialects; an answer is already mapped to token ids and has the OpenAI
"-9999 = not in the top-k" sentinel turned into `None`.

`Endpoint` declares everything the layers above may ask of a backend, each optional
capability with a default, so no caller probes an endpoint's attributes (tests/test_layers.py).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Awaitable, Callable, Iterable, Literal, Mapping

import numpy as np

from logprob_cli.errors import LogprobError


class EndpointError(LogprobError, RuntimeError):
    """The endpoint failed or refused a request; the message says what to do. The CLI exits 1 (a run records it as
    the prompt's failure instead, unless it is EndpointFatal)."""


class EndpointFatal(EndpointError):
    """Every request would fail the same way (credentials, model name, server down): stop the run."""


class EndpointRejected(EndpointError):
    """The endpoint refused this request as invalid (HTTP 400-class, not rate or access): asking it again
    fails again, so a rerun cannot help; another request may pass, and nothing was billed. `reason` is the endpoint's own words (probe reads its limits there)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = message if reason is None else reason


class EndpointUnsuitable(LogprobError, RuntimeError):
    """The endpoint does not behave as a method needs; the message names a method that would work. The CLI exits 1."""


@dataclass(frozen=True)
class Query:
    """One completion request of one token: which ids to bias by how much, how many logprobs to return,
    which chosen ids' logprobs to return besides (vLLM's `logprob_token_ids`), and how many choices to
    draw at which temperature (`draws` > 1: OpenAI's `n`, sampled at `temperature` from softmax((z + b) / T);
    1: the one greedy token, temperature 0).

    `bias` is a tuple of (token id, bias) pairs sorted by id and `token_ids` a sorted tuple of distinct
    ids, so queries are hashable and a query's `key()` is stable across runs (the journal uses it to
    check a replay). The answer to a query with token_ids lists, after its top-k entries, every one of
    those ids the server returned (`Answer`).
    """

    bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0
    token_ids: tuple[int, ...] = ()
    draws: int = 1
    temperature: float = 0.0

    @staticmethod
    def make(
        bias: Mapping[int, float] | None = None, top_logprobs: int = 0, token_ids: Iterable[int] = (),
        draws: int = 1, temperature: float = 0.0,
    ) -> "Query":
        items = tuple(sorted((int(i), float(b)) for i, b in (bias or {}).items() if b != 0.0))
        return Query(items, int(top_logprobs), tuple(sorted({int(i) for i in token_ids})), int(draws), float(temperature))

    def bias_dict(self) -> dict[int, float]:
        return dict(self.bias)

    def key(self) -> bytes:
        """A 16-byte digest of the query's content. A query without token_ids hashes exactly as before they
        existed (journals written then still replay); token_ids follow behind an odd-length marker, so no
        bias-only query's bytes (4 + 16 n of them) can equal a query's with token_ids (4 + 16 n + 9 + 8 m).
        Draws (only where more than one) follow behind another odd-length marker, with their temperature."""
        h = hashlib.blake2b(digest_size=16)
        h.update(struct.pack("<i", self.top_logprobs))
        if self.bias:
            ids, values = zip(*self.bias)
            h.update(np.asarray(ids, dtype="<i8").tobytes())
            h.update(np.asarray(values, dtype="<f8").tobytes())
        if self.token_ids:
            h.update(b"token_ids")
            h.update(np.asarray(self.token_ids, dtype="<i8").tobytes())
        if self.draws > 1:
            h.update(b"draws")
            h.update(struct.pack("<id", self.draws, self.temperature))
        return h.digest()


WITHHELD = -1


@dataclass(frozen=True)
class Answer:
    """What the endpoint returned for one query.

    sampled: the id of the generated (greedy) token, or WITHHELD when the endpoint returned no
        logprobs for the position at all (llama.cpp does so for an incomplete UTF-8 token) or named the
        generated token by a text that several tokens share (llama-cpp-python: `Endpoint.unnamed_tokens`).
    sampled_logprob: its reported logprob, or None when the endpoint withheld it (-9999 sentinel) or the
        generated token cannot be named.
    top_ids / top_logprobs: the returned top-k entries, best first, as token ids and logprobs; for a
        query with token_ids, then every one of those ids the server returned that the top-k does not
        already list, in id order (`with_chosen`).
    prompt_tokens / completion_tokens: the usage the endpoint billed (0 where it says nothing);
        bookkeeping, not part of the answer's identity (equality and the journal's blob ignore it).
    requests: the requests this answer cost: 1, or 0 where it was read from what an earlier request already
        returned (vLLM's prompt_logprobs serve every position of a text at once, `Endpoint.positions_per_call`);
        bookkeeping too.
    drawn: for a query with draws > 1, the token generated by each choice the endpoint returned, in its
        order (WITHHELD for a choice whose token cannot be named); `sampled` is the first. Empty otherwise.
    """

    sampled: int
    sampled_logprob: float | None
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    prompt_tokens: int = field(default=0, compare=False)
    completion_tokens: int = field(default=0, compare=False)
    requests: int = field(default=1, compare=False)
    drawn: tuple[int, ...] = ()

    def top(self) -> dict[int, float]:
        return dict(zip(self.top_ids, self.top_logprobs))

    @property
    def withheld(self) -> bool:
        return self.sampled == WITHHELD

    def to_bytes(self) -> bytes:
        """Compact binary form for the journal: header, then int64 ids and float64 logprobs, then (only where
        there are draws, so answers without them keep their earlier form) their count and int64 ids."""
        n = len(self.top_ids)
        lp = float("nan") if self.sampled_logprob is None else self.sampled_logprob
        head = struct.pack("<qdi", self.sampled, lp, n)
        drawn = struct.pack("<i", len(self.drawn)) + np.asarray(self.drawn, dtype="<i8").tobytes() if self.drawn else b""
        return (
            head
            + np.asarray(self.top_ids, dtype="<i8").tobytes()
            + np.asarray(self.top_logprobs, dtype="<f8").tobytes()
            + drawn
        )

    @staticmethod
    def from_bytes(data: bytes) -> "Answer":
        sampled, lp, n = struct.unpack_from("<qdi", data)
        off = struct.calcsize("<qdi")
        ids = np.frombuffer(data, dtype="<i8", count=n, offset=off)
        lps = np.frombuffer(data, dtype="<f8", count=n, offset=off + 8 * n)
        drawn: tuple[int, ...] = ()
        end = off + 16 * n
        if len(data) > end:
            (count,) = struct.unpack_from("<i", data, end)
            drawn = tuple(int(i) for i in np.frombuffer(data, dtype="<i8", count=count, offset=end + 4))
        return Answer(
            sampled,
            None if np.isnan(lp) else lp,
            tuple(int(i) for i in ids),
            tuple(float(x) for x in lps),
            drawn=drawn,
        )


@dataclass(frozen=True)
class Limits:
    """What a request may ask for: the top-k cap, the bias range (symmetric), the bias-entry cap, and
    `token_ids`: how many chosen ids one request may list (0: the endpoint cannot take a list). Where
    `top_with_token_ids` is False the listed ids take the top-k's place (vLLM), so a request listing ids
    must ask for top_logprobs 0. `draws`: how many choices one request may draw at a temperature (OpenAI's `n`;
    1: only the greedy token)."""

    top_logprobs: int = 20
    bias_max: float = 100.0
    bias_entries: int = 300
    token_ids: int = 0
    top_with_token_ids: bool = True
    draws: int = 1

    def check(self, query: Query, vocab_size: int) -> None:
        """Raise EndpointRejected, naming the setting, for token_ids or draws this endpoint cannot take."""
        if query.draws > self.draws:
            most = f"{self.draws} choice" + "s" * (self.draws != 1)
            raise EndpointRejected(f"this endpoint draws at most {most} a request, got {query.draws}")
        if not query.token_ids:
            return
        if not self.token_ids:
            raise EndpointRejected("this endpoint cannot return the logprobs of chosen ids: ask without token_ids")
        if len(query.token_ids) > self.token_ids:
            raise EndpointRejected(
                f"token_ids may list at most {self.token_ids} ids a request on this endpoint, got {len(query.token_ids)}"
            )
        if query.token_ids[0] < 0 or query.token_ids[-1] >= vocab_size:
            raise EndpointRejected(f"token_ids has an id outside the vocabulary [0, {vocab_size})")
        if query.top_logprobs and not self.top_with_token_ids:
            raise EndpointRejected(
                "this endpoint returns chosen ids in place of the top logprobs: ask for token_ids with top_logprobs 0"
            )


def with_chosen(answer: Answer, query: Query, returned: Mapping[int, float]) -> Answer:
    """`answer` with its top-k cut to query.top_logprobs, then each id of query.token_ids that `returned` (the
    server's id -> logprob for this position) holds and the top-k does not already list, in id order."""
    k = query.top_logprobs
    ids, logprobs = list(answer.top_ids[:k]), list(answer.top_logprobs[:k])
    listed = set(ids)
    for i in query.token_ids:
        if i in returned and i not in listed:
            ids.append(i)
            logprobs.append(float(returned[i]))
    return dataclasses.replace(answer, top_ids=tuple(ids), top_logprobs=tuple(logprobs))


@dataclass
class Prompt:
    """One input prompt: plain text (`prompt`) or chat `messages`, plus the user's other keys.

    targets: the tokens whose logprobs are wanted, as the user gave them (token strings and/or ids, in
        order); empty: the whole vector.
    target_ids: those targets resolved to token ids, in the same order (filled by the run layer through
        the endpoint's vocabulary before any call; empty until then).
    completion: a text whose every position is wanted (with a plain `prompt` only), as the user gave it;
        None: none.
    completion_ids: the completion's token ids, as given or resolved from `completion` by the run layer.
    position, context_ids: for one unit of work of a completion (`position` k from 0 to n for n completion
        tokens), the distribution wanted is the one right after the prompt followed by `context_ids`, the
        completion's first k tokens, appended as token ids (never re-tokenized); position None: the prompt
        alone, as without a completion.
    """

    id: Any
    line: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str | int, ...] = ()
    target_ids: tuple[int, ...] = ()
    completion: str | None = None
    completion_ids: tuple[int, ...] = ()
    position: int | None = None
    context_ids: tuple[int, ...] = ()

    def content(self) -> Any:
        return self.prompt if self.messages is None else self.messages


def approx_tokens(content: Any) -> int:
    """A prompt's tokens where no tokenizer counts them: about four bytes a token of the JSON sent."""
    return max(1, len(json.dumps(content, ensure_ascii=False).encode()) // 4)


@dataclass(frozen=True)
class Pressure:
    """An HTTP endpoint's state: retried attempts and 429s so far, the current request-rate limit (None: none)."""

    retries: int
    throttles: int
    rpm: float | None


@dataclass(frozen=True)
class EndpointDescription:
    """What an endpoint is.

    summary: one line for people ("gpt-4o at https://... (chat API; vocabulary o200k_base, ...)").
    backend ("simulator", "openai"), model, settings (every other setting that changes what the
    calls return, in the order shown) and vocabulary (the vocabulary's name; None where the backend
    has none of its own) make `to_dict()`, the form the output metadata shows and a checkpoint is
    bound to: keep its keys and values as they are, or existing checkpoints stop resuming.
    """

    backend: str
    model: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    vocabulary: str | None = None

    def to_dict(self) -> dict[str, Any]:
        named = {} if self.vocabulary is None else {"vocabulary": self.vocabulary}
        return {"backend": self.backend, "model": self.model, **self.settings, **named}


AskFunction = Callable[[Prompt, Query], Awaitable[Answer]]


class Endpoint(abc.ABC):
    """A backend: `ask` returns one `Answer`, `describe` says what it is; every other member has a default.

    Subclasses set `model`, `vocab_size` and `limits` (the caps a request must stay within, and how many
    chosen token_ids a request may list: `Limits.check` refuses the rest) and override the defaults that
    do not hold for them.
    """

    model: str
    vocab_size: int
    limits: Limits
    api: Literal["chat", "completions"] = "chat"
    """The API prompts go to: "completions" takes plain prompts only, "chat" takes both shapes."""
    one_call_at_a_time: bool = False
    """The backend answers one call at a time whatever the concurrency (llama-server, the in-process simulator)."""
    in_process: bool = False
    """The backend computes its answers in this process: offline and free (the built-in simulator)."""
    mapping_check_calls: int = 0
    """The calls `verify_mapping` spends (0: it has nothing to check)."""
    identity: AbstractSet[str] = frozenset({"ids"})
    """How the answers' tokens were identified so far: "ids", "bytes" and/or "strings" (ambiguous)."""
    image_rank: int | None = None
    """The rank of the model's image (methods/_image.py) where it is known before any call (the built-in
    simulator's: its hidden size + 2), for estimating a run with image="auto"; None: learned by the run only."""
    prompt_tokens_counted: bool = False
    """`count_prompt_tokens` counts with the model's own tokenizer (else it approximates)."""
    token_context: bool = False
    """`ask` can append token ids to a plain prompt exactly: for a Prompt with `context_ids` it answers with the
    distribution after the prompt followed by exactly those tokens (no re-tokenizing, nothing added between).
    Where False, `ask` refuses such a prompt (EndpointRejected)."""
    positions_per_call: int = 1
    """How many positions of one completion (consecutive, from a multiple of this number) one request answers
    for a query of the whole vocabulary without bias or listed ids (`direct`'s): vLLM's prompt_logprobs score
    every position of a prompt at once. 1: a request a position."""

    @abc.abstractmethod
    async def ask(self, prompt: Prompt, query: Query) -> Answer:
        """One query's answer; raises EndpointError (or its subclasses) when the call fails."""

    @abc.abstractmethod
    def describe(self) -> EndpointDescription:
        """What this endpoint is, for people, output metadata and checkpoints (never a secret such as a key)."""

    async def withheld_tokens(self) -> frozenset[int]:
        """The ids whose generation makes the server withhold the whole answer (default: none).
        Fetched once without blocking the event loop, then cached."""
        return frozenset()

    def unnamed_tokens(self) -> frozenset[int]:
        """The ids the endpoint's answers can never name (default: none): it names tokens by text only
        (llama-cpp-python), and these tokens render as a text that another token renders as too, or as none.
        No answer carries a value for them, so a plan leaves them unrecovered, with no bound."""
        return frozenset()

    async def verify_mapping(self, prompt: Prompt, ask: AskFunction | None = None) -> str | None:
        """Check that the vocabulary's ids are the model's, spending `mapping_check_calls` calls through `ask`
        (default this endpoint's own, so a caller can count them); what was found ("verified", or why it could
        not be), or None where there is nothing to check (default). Raises EndpointFatal on a mismatch."""
        return None

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """The prompt tokens one call sends for `prompt` (default: about four bytes a token of its content, plus
        its context ids). Raises ValueError for a prompt this endpoint cannot send."""
        return approx_tokens(prompt.content()) + len(prompt.context_ids)

    def token_text(self, token_id: int) -> str:
        """The token's readable text (its bytes decoded as UTF-8, invalid bytes replaced); default f"#{id}"
        where the endpoint knows no bytes for it."""
        return f"#{token_id}"

    async def split_text(self, text: str) -> tuple[int, ...]:
        """The ids `text` tokenizes into in this model's vocabulary, matched by bytes, with no BOS or other
        special token added (one id when `text` is exactly one token's bytes). Never blocks the event loop.
        Raises EndpointUnsuitable where the endpoint has no tokenizer to ask (default)."""
        raise EndpointUnsuitable(
            "this endpoint cannot tell how a text splits into tokens (no tokenizer is known for it): "
            "give token ids instead of text"
        )

    def holds_answer(self, prompt: Prompt, query: Query) -> bool:
        """Whether `ask(prompt, query)` would be answered from what an earlier request returned or one in flight
        will, sending nothing (its Answer.requests 0: `positions_per_call`). Default False: every ask is a request."""
        return False

    def pressure(self) -> Pressure | None:
        """Retries, 429s and the current rate limit so far, for the progress display (None: not an HTTP endpoint)."""
        return None

    async def aclose(self) -> None:
        """Release the running loop's connections; call before that loop ends (default: nothing to release)."""


class _ReadThrough:
    """A member of the contract that a `WrappingEndpoint` takes from the endpoint it wraps (a value, or a method
    bound to the wrapped endpoint), read at each access so that what changes there (identity) shows here."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, wrapper: "WrappingEndpoint | None", owner: type | None = None) -> Any:
        return self if wrapper is None else getattr(wrapper.endpoint, self.name)


class WrappingEndpoint(Endpoint):
    """An endpoint that adds something around another (the run's meter): every member of the contract is the
    wrapped `endpoint`'s until a subclass overrides it, so a member added to `Endpoint` is forwarded without
    a line here (FORWARDED lists them; `ask`, which a wrapper exists to change, is left to the subclass)."""

    FORWARDED = (
        "model", "vocab_size", "limits", "api", "one_call_at_a_time", "in_process", "mapping_check_calls", "identity",
        "image_rank", "prompt_tokens_counted", "token_context", "positions_per_call", "withheld_tokens", "unnamed_tokens", "verify_mapping", "count_prompt_tokens",
        "token_text", "split_text", "holds_answer", "pressure", "aclose",
    )

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint

    def describe(self) -> EndpointDescription:
        return self.endpoint.describe()


for _name in WrappingEndpoint.FORWARDED:
    setattr(WrappingEndpoint, _name, _ReadThrough(_name))
