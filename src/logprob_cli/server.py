"""The built-in simulator served as an OpenAI-compatible HTTP API (standard library only).

Routes, in OpenAI's JSON formats: GET /v1/models, POST /v1/chat/completions and POST
/v1/completions (legacy). Every request produces one token (`max_tokens` absent or 1) per
choice: one choice, the greedy token, unless (openai dialect only) `n` asks for up to 128, which are
drawn at the request's `temperature` (0 to 2, default 1) from the biased logits, each choice with its
token's logprob (the top list's value, or the sentinel as the simulator's sampled_logprob says) and the
same top_logprobs; the simulator's `max_draws` caps n (a larger n is a 400), and usage counts one
completion token a choice;
the answer is `SimulatedEndpoint.answer` for the request's prompt (the chat `messages`
list exactly as sent, or the legacy `prompt` string) and its logit_bias / top-k. A
generated token outside the returned top-k that the simulator withholds is reported as
-9999.0, OpenAI's sentinel. With `token_ids`, chat logprob entries also carry llama.cpp's
"id". Every error is OpenAI's {"error": {...}} JSON, never an HTML page or a traceback. A legacy
`prompt` may also be llama.cpp's mixed form, a string then token ids (`["text", 17, 301]`): the answer
is the simulator's after that text followed by exactly those tokens (every position of a completion);
GET /v1/models lists the model as owned_by "logprob-cli", which tells a client so.

With `dialect="vllm"` the server answers as vLLM's OpenAI-compatible server does (vLLM's
sources: entrypoints/openai protocol and serving code, vllm/logprobs.py, the v1 sampler):
- top_logprobs is capped by `max_logprobs` (vLLM's --max-logprobs, default 20); more is a
  400 "Requested sample logprobs of N, which is greater than max allowed: CAP"; with
  max_logprobs -1 the cap is the vocabulary size and top_logprobs -1 means all of it;
  other negative values are a 400;
- a response's top_logprobs list starts with the generated token, then the top-k by rank
  without it, cut to k entries (vLLM builds one {token: logprob} dict per position with
  the sampled token inserted first): when a biased token outside the top-k is generated,
  it comes first and the k-th token is left out;
- with `return_tokens_as_token_ids` (the request field, or the server switch for every
  request) each token is the string "token_id:N"; a top entry's `bytes` are then the
  UTF-8 of that string and the generated entry's `bytes` are its decoded text. Without it
  a token is its decoded text and `bytes` that text's UTF-8, so they are not the token's
  own bytes where it is not valid UTF-8 (vLLM decodes it as "" there);
- logprobs below -9999 are reported as -9999 (vLLM never withholds the generated token's
  own logprob, so -9999 is never a sentinel here);
- logit_bias values are clipped to +-bias_max (vLLM: 100) silently, any number of entries
  is accepted, and an id outside the vocabulary is a 400 naming the ids;
- legacy completions' `logprobs` is capped by max_logprobs too (not 5; -1: the vocabulary) and their
  top_logprobs dict holds the first k + 1 entries of that same list;
- `logprob_token_ids` (chat and completions): a list of at most 128 ids in the vocabulary (else a 400
  as vLLM words it); non-empty, it takes the top-k's place: top_logprobs lists the generated token and
  then every listed id in the order asked, each once, whatever top_logprobs says (which is then
  not held to max_logprobs); `logprobs` must still be true (chat) or set (completions, else a 400);
- a completions `prompt` is a string or a non-empty list of token ids (an id outside the vocabulary
  is a 400 "Token id N is out of vocabulary"). The simulator reads text, so ids read as the longest
  prefix of them that is the split of its own bytes (`simulator_split`), as that text, then the rest
  as exact token ids: the split of a text reads as the text itself, as it does on vLLM;
- completions' `prompt_logprobs` N (-1: the vocabulary; held to max_logprobs as vLLM holds it, "Requested
  prompt logprobs of N, which is greater than max allowed: CAP") scores every prompt token after
  the first: `choices[0].prompt_logprobs` is [null, then for each later token {"ID": {"logprob", "rank",
  "decoded_token"}} with that token first, then the top N], the distribution after the tokens before
  it, before any bias (vLLM scores the prompt on the raw logits). The rows of one request count as
  one call of the simulator;
- POST /tokenize (beside /v1, as vLLM serves it) splits a text `prompt` with the simulator's
  greedy split;
- responses carry vLLM 0.32's fields (the message's refusal/annotations/audio/function_call/reasoning, a
  choice's stop_reason and token_ids, prompt_logprobs and prompt_token_ids, system_fingerprint
  "vllm-0.32.0-simulator");
- errors are vLLM's {"error": {"message", "type": "BadRequestError", "param", "code": 400}},
  a wrong or missing key is 401 {"error": "Unauthorized"}, an unknown route FastAPI's
  {"detail": "Not Found"}; a request without `model` goes to the served model; GET
  /v1/models lists it as owned_by "vllm" with max_model_len. Rate limits and faults stand
  for a gateway in front of the server and keep OpenAI's format.
Whether logprobs are raw (vLLM's default --logprobs-mode raw_logprobs: before the bias) or
processed (processed_logprobs: after it) is the simulator's `logprobs_after_bias` switch.

With `dialect="llama-cpp-python"` the server answers as llama-cpp-python's server (0.3.36,
llama_cpp/llama.py and server/app.py, checked against a running one) does:
- tokens are named by text only: a token's bytes decoded as UTF-8 with invalid bytes dropped,
  "" for a piece over 32 bytes (its detokenize buffer); no ids, chat `bytes` null;
- a legacy `top_logprobs` dict is built from the top-k best first, so a text several tokens
  share holds the value of the last of them, and then the generated token's own value is
  written under its text; a chat entry lists that dict's items as `top_logprobs`; chat
  returns `logprobs: null` unless `top_logprobs` is given;
- no cap on the logprobs asked for, no cap on bias entries, biases not clipped (the
  simulator's bias_max is raised to 1e4), logprobs before the bias, the bias steers sampling
  (the simulator's switches are set so, whatever was given);
- any `model` in a request, or none, is the served one (the real server answered the tool's
  "smollm2" with its GGUF);
- GET /v1/models lists the model as owned_by "me"; POST /extras/tokenize ({"input": text})
  answers {"tokens": [...]} with the simulator's split.

A completion request, once read, authorized and parsed, goes through: the configured
latency; a fault draw (`fault_rate`: a flaky network in front of the API); the rate limits
(`rpm`, `tpm`: the API's gateway); the simulator. Faulted and rate-limited requests never
reach the simulator, so `endpoint.calls` counts answered requests only, and a retried
request gets exactly the answer it would have got without faults. GET /v1/models is
never delayed, faulted or rate-limited.

Rate limits work as OpenAI's: a GCRA token bucket per limit holding one second's worth
(rpm/60 requests, tpm/60 tokens) and refilling continuously; a request costs one request
and its usage.total_tokens, charged before it is validated (so a 400 counts too). Every
completion response carries x-ratelimit-limit-* (the per-minute limit),
x-ratelimit-remaining-* (what the bucket holds now) and x-ratelimit-reset-* (the time
until it is full again, as "1s", "120ms", "6m0s") for each limit set, unless
`rate_headers` is off (a gateway that keeps its limits to itself). A request over a
limit gets 429 `rate_limit_exceeded` (type "requests" or "tokens") with retry-after
(whole seconds, rounded up) and retry-after-ms (milliseconds, rounded up).

Faults (`faults`, drawn uniformly from a seeded generator):
- "429": a rate-limit 429 asking for 50 ms (retry-after: 1, retry-after-ms: 50);
- "500": a 500 `server_error`;
- "timeout": no response for `stall` seconds, then the connection is closed (FIN);
- "cut": no response, the connection is reset (RST) at once, as when a proxy or NAT
  drops the upstream connection;
- "malformed": 200 application/json with a correct Content-Length whose body is a
  response cut off mid-object, so not valid JSON.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import math
import random
import re
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

from logprob_cli.endpoints import Answer, EndpointError, Prompt, Query
from logprob_cli.endpoints import SimulatedEndpoint, SimulatorConfig, simulator_split, simulator_token_bytes

SENTINEL = -9999.0
LEGACY_LOGPROBS_CAP = 5  # OpenAI's legacy Completions cap
OPENAI_MAX_N = 128  # OpenAI's documented maximum of `n`
OPENAI_MAX_TEMPERATURE = 2.0
_TOKEN_ID = re.compile(r"-?[0-9]+")
FAULT_KINDS = ("429", "500", "timeout", "cut", "malformed")
DIALECTS = ("openai", "vllm", "llama-cpp-python")
LLAMA_CPP_PYTHON_PIECE_BYTES = 32  # llama-cpp-python's detokenize buffer: a longer piece renders as ""
UNCLIPPED_BIAS = 1e4  # the llama-cpp-python dialect's bias_max: no bias a client sends is clipped
VLLM_MAX_LOGPROBS = 20  # vLLM's --max-logprobs default
VLLM_MAX_MODEL_LEN = 4096  # what the vllm dialect's GET /v1/models reports
VLLM_MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's MAX_LOGPROB_TOKEN_IDS (vllm/sampling_params.py)
VLLM_FINGERPRINT = "vllm-0.32.0-simulator"  # vLLM 0.32 reports "vllm-VERSION-HASH"
BURST_SECONDS = 1.0  # a rate limit's bucket holds one second's worth
INJECTED_RETRY_AFTER = 0.05  # seconds an injected 429 asks the client to wait
# The prompt field of each completion route, for its usage tokens.
_PROMPT_FIELDS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}
# A "malformed" fault's body: a response cut off mid-object.
_MALFORMED_BODY = b'{"id": "chatcmpl-simulator", "object": "chat.completion", "choices": [{"index": 0, "message": {"ro'


@dataclass(frozen=True)
class ServerConfig:
    """What the server serves and how.

    simulator: the simulated model and its behaviour switches.
    model: the only model name accepted (others get 404 model_not_found).
    api_key: if set, requests must send "Authorization: Bearer <api_key>" (else 401).
    token_ids: llama.cpp dialect, every chat logprob entry also carries "id".
    latency: seconds slept per completion request (outside any lock), to emulate a remote API.
    log_requests: log each request to stderr (BaseHTTPRequestHandler's format); off by default.
    rpm, tpm: requests and tokens per minute accepted on the completion routes; 0 is unlimited.
    rate_headers: announce the limits in x-ratelimit-* headers (OpenAI does); False: a limit
        shows only as a 429 with retry-after, as behind a gateway that does not tell.
    fault_rate: probability that a completion request gets a fault instead of its answer.
    faults: the fault kinds drawn, uniformly (see the module docstring).
    fault_seed: seed of the fault draws (the same request sequence gets the same faults).
    stall: seconds a "timeout" fault holds the request before closing the connection.
    dialect: "openai" (default), "vllm", vLLM's OpenAI-compatible server, or "llama-cpp-python", its
        server (module docstring).
    max_logprobs: vllm only: vLLM's --max-logprobs, the most top_logprobs a request may ask
        for (-1: the whole vocabulary); it replaces the simulator's top_logprobs_cap, and the
        simulator's bias_entries cap does not apply (vLLM has none).
    return_tokens_as_token_ids: vllm only: vLLM's --return-tokens-as-token-ids, every token
        as "token_id:N" unless the request's own return_tokens_as_token_ids says otherwise.
    """

    simulator: SimulatorConfig = SimulatorConfig()
    model: str = "simulator"
    api_key: str | None = None
    token_ids: bool = False
    latency: float = 0.0
    log_requests: bool = False
    rpm: float = 0.0
    tpm: float = 0.0
    rate_headers: bool = True
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULT_KINDS
    fault_seed: int = 0
    stall: float = 5.0
    dialect: str = "openai"
    max_logprobs: int = VLLM_MAX_LOGPROBS
    return_tokens_as_token_ids: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "faults", tuple(self.faults))
        for name in ("latency", "rpm", "tpm", "stall"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {value!r}")
        if not 0 <= self.fault_rate <= 1:
            raise ValueError(f"fault_rate must be between 0 and 1, got {self.fault_rate!r}")
        unknown = [kind for kind in self.faults if kind not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind {unknown[0]!r} (known: {', '.join(FAULT_KINDS)})")
        if len(set(self.faults)) < len(self.faults):
            raise ValueError("faults must not repeat a kind")
        if self.fault_rate and not self.faults:
            raise ValueError("a fault_rate above 0 needs at least one fault kind")
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, got {self.dialect!r}")
        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be an integer >= 0, or -1 for the whole vocabulary, got {self.max_logprobs!r}")
        if self.dialect != "vllm" and (self.max_logprobs != VLLM_MAX_LOGPROBS or self.return_tokens_as_token_ids):
            raise ValueError("max_logprobs and return_tokens_as_token_ids are vLLM's: they need dialect vllm")
        if self.dialect == "vllm" and self.token_ids:
            raise ValueError("token_ids is llama.cpp's dialect; vLLM names tokens with return_tokens_as_token_ids")
        if self.dialect == "llama-cpp-python" and self.token_ids:
            raise ValueError("token_ids is llama.cpp's dialect; llama-cpp-python names tokens by text only")


class _ApiError(Exception):
    """A request failure, sent as OpenAI's error JSON with this status.

    origin: "api" (the API refused the request), "route" (no such route or method) or
    "gateway" (rate limits and injected faults, from in front of the API); the vllm dialect
    reshapes the first two into vLLM's formats (`SimulatorServer._error_body`).
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None, origin: str = "api"):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers or {}
        self.origin = origin


def _rate_limit_error(reason: str, type: str, wait: float, headers: dict[str, str]) -> _ApiError:
    """OpenAI's 429 for a request that may be retried after `wait` seconds."""
    ms = _milliseconds(wait)
    retry = {"retry-after": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}
    return _ApiError(429, f"Rate limit reached for {reason}. Please try again in {_duration(wait)}.",
                     code="rate_limit_exceeded", type=type, headers={**headers, **retry}, origin="gateway")


class _RateBucket:
    """One rate limit as a GCRA token bucket: `limit` per minute, holding one second's worth.

    The bucket is full again at `full_at`; until then (full_at - now) * rate of it is spent.
    A cost fits when the spent part plus the cost stays within the bucket. A cost larger
    than the whole bucket fits a full one and leaves it in debt: big requests are slowed
    down, never locked out.
    """

    def __init__(self, name: str, limit: float):
        self.name = name  # "requests" or "tokens", OpenAI's names in headers and errors
        self.limit = limit
        self.rate = limit / 60  # per second
        self.full_at = 0.0

    def wait(self, cost: float, now: float) -> float:
        """Seconds until `cost` fits (0 if it fits now)."""
        spent = max(0.0, self.full_at - now)
        late = spent - max(0.0, BURST_SECONDS - cost / self.rate)
        return late if late > 1e-9 else 0.0  # float noise is no reason to reject

    def take(self, cost: float, now: float) -> None:
        self.full_at = max(self.full_at, now) + cost / self.rate

    def headers(self, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* for this limit: the per-minute limit, what the bucket holds, when it is full."""
        spent = max(0.0, self.full_at - now)
        remaining = max(0, math.floor((BURST_SECONDS - spent) * self.rate + 1e-9))
        return {
            f"x-ratelimit-limit-{self.name}": _number(self.limit),
            f"x-ratelimit-remaining-{self.name}": str(remaining),
            f"x-ratelimit-reset-{self.name}": _duration(spent),
        }


class SimulatorServer:
    """A `SimulatedEndpoint` behind an OpenAI-compatible HTTP server bound at construction.

    `url` is the base URL for an OpenAI client ("http://HOST:PORT/v1"). `start()` serves in
    a daemon thread, `serve_forever()` in the calling thread (for the CLI); `stop()` ends
    either and closes open connections. As a context manager it starts and stops itself.
    `endpoint` is the simulator answering (its `calls` counts answered completion requests);
    `rejected` counts requests refused by the rate limits and `faults_injected` the faults
    injected, per kind. `clock` is what the rate limits read the time from (seconds, monotonic); a test passes
    one it moves itself, so a slow machine cannot refill a bucket between two requests.
    """

    def __init__(self, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config or ServerConfig()
        self._clock = clock
        self._vllm = self.config.dialect == "vllm"
        self._lcp = self.config.dialect == "llama-cpp-python"
        self.endpoint = SimulatedEndpoint(_engine_config(self.config))
        self._lock = threading.Lock()  # the simulator is not thread-safe
        self.rejected = 0
        self.faults_injected = {kind: 0 for kind in self.config.faults}
        limits = (("requests", self.config.rpm), ("tokens", self.config.tpm))
        self._buckets = [_RateBucket(name, limit) for name, limit in limits if limit]
        self._fault_draws = random.Random(self.config.fault_seed)
        self._gate = threading.Lock()  # the buckets, the fault draws and the two counters
        self._httpd = _HTTPServer((host, port), _handler_class(self), self.config.log_requests)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "SimulatorServer":
        if self._thread is not None or self._httpd.closed:
            raise RuntimeError("a SimulatorServer can be started once")
        self._thread = threading.Thread(target=self.serve_forever, name="simulator-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until `stop()` (from another thread) or an exception such as KeyboardInterrupt."""
        try:
            self._httpd.serve_forever(poll_interval=0.05)  # stop() returns within 50 ms
        finally:
            self._httpd.close()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()  # safe even if the thread has not entered its loop yet
            self._thread.join()
            self._thread = None
        self._httpd.close()

    def __enter__(self) -> "SimulatorServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- routes -------------------------------------------------------------------------

    def models(self, body: Any) -> dict[str, Any]:
        if self._vllm:  # vLLM's ModelCard
            card = {
                "id": self.config.model, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                "root": self.config.model, "parent": None, "max_model_len": VLLM_MAX_MODEL_LEN,
                "permission": [{
                    "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": int(time.time()),
                    "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                    "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                    "organization": "*", "group": None, "is_blocking": False,
                }],
            }
            return {"object": "list", "data": [card]}
        if self._lcp:
            return {"object": "list", "data": [{"id": self.config.model, "object": "model", "owned_by": "me", "permissions": []}]}
        card = {"id": self.config.model, "object": "model", "owned_by": "logprob-cli", "max_draws": self.config.simulator.max_draws}
        return {"object": "list", "data": [card]}

    def chat_completions(self, body: Any) -> dict[str, Any]:
        body = self._completion_request(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _ApiError(400, "'messages' must be a non-empty array of message objects", "messages")
        _one_token(body, "max_tokens")
        _one_token(body, "max_completion_tokens")
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise _ApiError(400, "'logprobs' must be a boolean", "logprobs")
        chosen = self._vllm_logprob_token_ids(body) if self._vllm else []
        if self._vllm:
            k = self._vllm_top_logprobs(body, bool(logprobs), capped=not chosen)
        elif self._lcp:
            k = _integer(body, "top_logprobs")
            logprobs = bool(logprobs) and k is not None  # its chat returns no logprobs without top_logprobs
            k = min(max(k or 0, 0), self.config.simulator.vocab_size)
        else:
            k = self._top_logprobs(body, bool(logprobs))
        prompt = Prompt(id=0, line=0, messages=messages)
        top_k = 0 if chosen else k  # vLLM: the chosen ids take the top-k's place
        draws, temperature = self._draws(body)
        query = Query.make(self._bias(body), top_k if logprobs else 0, chosen if logprobs else (), draws, temperature)
        answer = self._answer(prompt, query)
        if self._vllm or self._lcp:
            content = None
            if logprobs and self._vllm:
                content = {"content": [self._vllm_chat_entry(answer, k, self._as_token_ids(body), chosen)]}
            elif logprobs:
                top = [{"token": text, "logprob": lp, "bytes": None} for text, lp in _lcp_top(answer, k).items()]
                entry = {"token": _lcp_text(answer.sampled), "logprob": _lcp_sampled_logprob(answer), "bytes": None}
                content = {"content": [{**entry, "top_logprobs": top}], "refusal": None}
            message: dict[str, Any] = {"role": "assistant", "content": _lcp_text(answer.sampled)}
            if self._vllm:
                message = {"role": "assistant", "content": _vllm_text(answer.sampled), "refusal": None, "annotations": None,
                           "audio": None, "function_call": None, "reasoning": None}  # vLLM 0.32's ChatMessage
            choices = [{"index": 0, "message": message, "finish_reason": "length", "logprobs": content}]
        else:
            top = [self._entry(i, lp) for i, lp in zip(answer.top_ids, answer.top_logprobs)]
            choices = [
                {"index": index, "message": {"role": "assistant", "content": _text(token)}, "finish_reason": "length",
                 "logprobs": {"content": [{**self._entry(token, logprob), "top_logprobs": top}]} if logprobs else None}
                for index, (token, logprob) in enumerate(self._choices(prompt, query, answer))
            ]
        n = _approx_tokens(messages)
        response = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.config.model,
            "system_fingerprint": VLLM_FINGERPRINT if self._vllm else "fp_simulator",
            "choices": choices,
            "usage": {"prompt_tokens": n, "completion_tokens": len(choices), "total_tokens": n + len(choices)},
        }
        if self._vllm:
            response["choices"][0].update(stop_reason=None, token_ids=None)
            response.update(prompt_logprobs=None, prompt_token_ids=None)
        return response

    def completions(self, body: Any) -> dict[str, Any]:
        body = self._completion_request(body)
        prompt = self._vllm_prompt(body.get("prompt")) if self._vllm else self._completion_prompt(body.get("prompt"))
        _one_token(body, "max_tokens")
        if body.get("echo"):
            raise _ApiError(400, "echo is not supported", "echo")
        k = _integer(body, "logprobs")
        chosen: list[int] = []
        scored = None
        if self._vllm:
            if k is not None and k < -1:
                raise _ApiError(400, f"`logprobs` must be a positive value or -1. (parameter=logprobs, value={k})", "logprobs")
            chosen = self._vllm_logprob_token_ids(body)
            if chosen and k is None:
                raise _ApiError(400, "when using `logprob_token_ids`, `logprobs` must be set.", "logprob_token_ids")
            if k == -1:
                k = self.config.simulator.vocab_size
            if k is not None and not chosen:
                self._vllm_logprobs_cap(k)
            scored = self._vllm_prompt_logprobs(body, prompt)
        elif self._lcp:
            if k is not None and k < 0:
                raise _ApiError(400, "logprobs must be >= 0", "logprobs")
        else:
            cap = min(LEGACY_LOGPROBS_CAP, self.config.simulator.top_logprobs_cap)
            if k is not None and k > cap:
                raise _ApiError(400, f"logprobs must be <= {cap}", "logprobs")
            if k is not None and k < 0:
                raise _ApiError(400, "logprobs must be >= 0", "logprobs")
        draws, temperature = self._draws(body)
        query = Query.make(self._bias(body), 0 if chosen else min(k or 0, self.config.simulator.vocab_size), chosen, draws, temperature)
        answer = self._answer(prompt, query)
        if self._vllm or self._lcp:
            text = _vllm_text(answer.sampled) if self._vllm else _lcp_text(answer.sampled)
            logprobs = None
            if k is not None and self._vllm:
                logprobs = self._vllm_completion_logprobs(answer, k, self._as_token_ids(body), chosen)
            elif k is not None:
                logprobs = {
                    "text_offset": [len(body["prompt"]) if isinstance(body.get("prompt"), str) else 0],
                    "token_logprobs": [_lcp_sampled_logprob(answer)], "tokens": [text], "top_logprobs": [_lcp_top(answer, k)],
                }
            vllm_fields = {"stop_reason": None, "token_ids": None, "prompt_logprobs": scored, "prompt_token_ids": None}
            choices = [{"text": text, "index": 0, "finish_reason": "length", "logprobs": logprobs,
                        **(vllm_fields if self._vllm else {})}]
        else:
            top: dict[str, float] = {}
            for i, lp in zip(answer.top_ids, answer.top_logprobs):
                key = _legacy_token(i)
                top[key] = max(lp, top.get(key, -math.inf))  # same string: one key, as OpenAI
            choices = [
                {"text": _text(token), "index": index, "finish_reason": "length", "logprobs": None if k is None else {
                    "tokens": [_legacy_token(token)], "token_logprobs": [logprob], "top_logprobs": [top], "text_offset": [0],
                }}
                for index, (token, logprob) in enumerate(self._choices(prompt, query, answer))
            ]
        n = _approx_tokens(prompt.prompt) + len(prompt.context_ids)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.config.model,
            "system_fingerprint": VLLM_FINGERPRINT if self._vllm else "fp_simulator",
            "choices": choices,
            "usage": {"prompt_tokens": n, "completion_tokens": len(choices), "total_tokens": n + len(choices)},
        }

    def _completion_prompt(self, prompt: Any) -> Prompt:
        """A legacy completion's prompt: a string, or (OpenAI's dialect) llama.cpp's mixed form, a string then token
        ids, whose answer is the simulator's after that text and exactly those tokens (`SimulatedEndpoint.content`)."""
        if isinstance(prompt, str):
            return Prompt(id=0, line=0, prompt=prompt)
        mixed = (
            not self._lcp and isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt[1:])
        )
        if not mixed:
            raise _ApiError(400, "'prompt' must be a string, or a string then token ids (batches are not supported)", "prompt")
        vocab = self.config.simulator.vocab_size
        if not all(0 <= i < vocab for i in prompt[1:]):
            raise _ApiError(400, f"'prompt' has a token id outside the vocabulary [0, {vocab})", "prompt")
        return Prompt(id=0, line=0, prompt=prompt[0], context_ids=tuple(prompt[1:]))

    def _vllm_prompt(self, prompt: Any) -> Prompt:
        """vLLM's completions prompt: a string, or a non-empty list of token ids read as the module docstring says."""
        if isinstance(prompt, str):
            return Prompt(id=0, line=0, prompt=prompt)
        if not isinstance(prompt, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            raise _ApiError(400, "'prompt' must be a string or a list of token ids (batches are not supported)", "prompt")
        if not prompt:
            raise _ApiError(400, "You must pass at least one prompt")
        vocab = self.config.simulator.vocab_size
        outside = next((i for i in prompt if not 0 <= i < vocab), None)
        if outside is not None:
            raise _ApiError(400, f"Token id {outside} is out of vocabulary")
        return _token_prompt(tuple(prompt), vocab)

    def _vllm_prompt_logprobs(self, body: dict[str, Any], prompt: Prompt) -> list[dict[str, Any] | None] | None:
        """A completions request's prompt_logprobs as vLLM returns them (module docstring), None where not asked."""
        n = _integer(body, "prompt_logprobs")
        if n is None:
            return None
        if n < -1:
            raise _ApiError(400, f"`prompt_logprobs` must be a positive value or -1. (parameter=prompt_logprobs, value={n})",
                            "prompt_logprobs")
        vocab = self.config.simulator.vocab_size
        n = vocab if n == -1 else n
        cap = vocab if self.config.max_logprobs == -1 else self.config.max_logprobs
        if n > cap:
            raise _ApiError(400, f"Requested prompt logprobs of {n}, which is greater than max allowed: {cap} "
                                 f"(parameter=prompt_logprobs, value={n})", "prompt_logprobs")
        ids = (*simulator_split(prompt.prompt or "", vocab), *prompt.context_ids)
        rows: list[dict[str, Any] | None] = [None]
        with self._lock:
            calls = self.endpoint.calls
            for i in range(1, len(ids)):
                before = _token_prompt(ids[:i], vocab)
                answer = self.endpoint.answer(before, Query.make(top_logprobs=n, token_ids=[ids[i]]))
                values = answer.top()
                truth = self.endpoint.true_logprobs(before)
                rank = 1 + int((truth > truth[ids[i]]).sum())
                row = {str(ids[i]): {"logprob": _vllm_logprob(values[ids[i]]), "rank": rank, "decoded_token": _vllm_text(ids[i])}}
                for place, (token, lp) in enumerate(zip(answer.top_ids[:n], answer.top_logprobs[:n]), 1):
                    row.setdefault(str(token), {"logprob": _vllm_logprob(lp), "rank": place, "decoded_token": _vllm_text(token)})
                rows.append(row)
            self.endpoint.calls = calls  # the rows are part of this request's one call
        return rows

    def extras_tokenize(self, body: Any) -> dict[str, Any]:
        """llama-cpp-python's POST /extras/tokenize of a text `input`: the simulator's split (it adds no BOS)."""
        text = body.get("input") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise _ApiError(400, "'input' must be a string", "input")
        return {"tokens": list(simulator_split(text, self.config.simulator.vocab_size))}

    def tokenize(self, body: Any) -> dict[str, Any]:
        """vLLM's POST /tokenize of a text prompt: the simulator's split (`simulator_split`; it has no special
        tokens, so add_special_tokens changes nothing)."""
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            raise _ApiError(400, "'prompt' must be a string", "prompt")
        tokens = list(simulator_split(prompt, self.config.simulator.vocab_size))
        return {"count": len(tokens), "max_model_len": VLLM_MAX_MODEL_LEN, "tokens": tokens, "token_strs": None}

    # --- helpers ------------------------------------------------------------------------

    def _top_logprobs(self, body: dict[str, Any], logprobs: bool) -> int:
        """A chat request's top_logprobs, validated as OpenAI does."""
        cap = self.config.simulator.top_logprobs_cap
        k = _integer(body, "top_logprobs") or 0
        if k > cap:
            raise _ApiError(400, f"top_logprobs must be <= {cap}", "top_logprobs")
        if k < 0:
            raise _ApiError(400, "top_logprobs must be >= 0", "top_logprobs")
        if k and not logprobs:
            raise _ApiError(400, "logprobs must be set to true if top_logprobs is used", "top_logprobs")
        return k

    def _draw_fault(self) -> str | None:
        """The fault kind this completion request gets, or None for a normal answer."""
        if not self.config.fault_rate:
            return None
        with self._gate:
            if self._fault_draws.random() >= self.config.fault_rate:
                return None
            kind = self._fault_draws.choice(self.config.faults)
            self.faults_injected[kind] += 1
        return kind

    def _fault_error(self, kind: str) -> _ApiError:
        """The error response of a "429" or "500" fault."""
        if kind == "500":
            return _ApiError(500, "The server had an error while processing your request.", type="server_error",
                             origin="gateway")
        with self._gate:
            headers = self._limit_headers(self._clock())
        return _rate_limit_error(f"requests on {self.config.model} (an injected fault)", "requests",
                                 INJECTED_RETRY_AFTER, headers)

    def _admit(self, body: Any, prompt_field: str) -> dict[str, str]:
        """Charge a completion request to the rate limits: its x-ratelimit headers, or raise a 429."""
        if not self._buckets:
            return {}
        costs = {"requests": 1, "tokens": _usage_tokens(body, prompt_field)}
        now = self._clock()
        with self._gate:
            wait, bucket = max(((b.wait(costs[b.name], now), b) for b in self._buckets), key=lambda pair: pair[0])
            if wait:
                self.rejected += 1
            else:
                for b in self._buckets:
                    b.take(costs[b.name], now)
            headers = self._limit_headers(now)
        if wait:
            per_minute = "RPM" if bucket.name == "requests" else "TPM"
            reason = (f"{bucket.name} per min ({per_minute}) on {self.config.model}: "
                      f"Limit {_number(bucket.limit)}, Requested {costs[bucket.name]}")
            raise _rate_limit_error(reason, bucket.name, wait, headers)
        return headers

    def _limit_headers(self, now: float) -> dict[str, str]:
        """Every limit's x-ratelimit-* headers, none when they are not announced (call with the gate held)."""
        if not self.config.rate_headers:
            return {}
        return {name: value for bucket in self._buckets for name, value in bucket.headers(now).items()}

    def _completion_request(self, body: Any) -> dict[str, Any]:
        """Checks shared by both completion routes."""
        if not isinstance(body, dict):
            raise _ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if self._lcp:  # llama-cpp-python serves its one model whatever the request names, or none
            model = self.config.model
        if self._vllm and model is None:
            model = self.config.model  # vLLM answers a request without a model with the served one
        if not isinstance(model, str) or not model:
            raise _ApiError(400, "you must provide a model parameter", "model")
        if self._vllm and model != self.config.model:
            raise _ApiError(404, f"The model `{model}` does not exist.", "model")
        if model != self.config.model:
            raise _ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                            "model", "model_not_found")
        if body.get("stream"):
            raise _ApiError(400, "streaming is not supported", "stream")
        return body

    def _bias(self, body: dict[str, Any]) -> dict[int, float]:
        raw = body.get("logit_bias")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise _ApiError(400, "'logit_bias' must be an object mapping token ids to numbers", "logit_bias")
        if self._vllm:
            return self._vllm_bias(raw)
        entries = self.config.simulator.bias_entries
        if len(raw) > entries:
            raise _ApiError(400, f"logit_bias may have at most {entries} entries, got {len(raw)}", "logit_bias")
        vocab = self.config.simulator.vocab_size
        bias: dict[int, float] = {}
        for key, value in raw.items():
            if not _TOKEN_ID.fullmatch(key):
                raise _ApiError(400, f"logit_bias key {key!r} is not an integer token id", "logit_bias")
            if not 0 <= int(key) < vocab:
                raise _ApiError(400, f"logit_bias token id {key} is outside the vocabulary [0, {vocab})", "logit_bias")
            number = _finite(value)
            if number is None:
                raise _ApiError(400, f"logit_bias value for token {key} must be a finite number", "logit_bias")
            bias[int(key)] = number
        return bias

    def _draws(self, body: dict[str, Any]) -> tuple[int, float]:
        """The request's `n` and, where n > 1, its `temperature`, checked as OpenAI does (module docstring)."""
        n = _integer(body, "n")
        n = 1 if n is None else n
        if not 1 <= n <= OPENAI_MAX_N:
            side = "above maximum" if n > OPENAI_MAX_N else "below minimum"
            bound = f"<= {OPENAI_MAX_N}" if n > OPENAI_MAX_N else ">= 1"
            raise _ApiError(400, f"Invalid 'n': integer {side} value. Expected a value {bound}, but got {n} instead.", "n")
        if n == 1:
            return 1, 0.0
        if self.config.dialect != "openai":
            raise _ApiError(400, f"n above 1 is served in the openai dialect only, not {self.config.dialect}", "n")
        temperature = _finite(body.get("temperature", 1.0))
        if temperature is None or not 0 <= temperature <= OPENAI_MAX_TEMPERATURE:
            raise _ApiError(400, f"Invalid 'temperature': expected a number from 0 to {OPENAI_MAX_TEMPERATURE:g}", "temperature")
        return n, temperature

    def _choices(self, prompt: Prompt, query: Query, answer: Answer) -> list[tuple[int, float]]:
        """The openai dialect's choices as (token, its logprob): the greedy token alone, or each drawn one (n > 1).
        The first carries the answer's own logprob; the others the top list's value or, outside it, the sentinel
        or the simulator's reported value, as its sampled_logprob says."""
        tokens = answer.drawn or (answer.sampled,)
        values = answer.top()
        outside = sorted({i for i in tokens[1:] if i not in values})
        if outside and self.config.simulator.sampled_logprob == "report":
            with self._lock:
                values.update(zip(outside, self.endpoint.reported_logprobs(prompt, query, outside).tolist()))
        first = SENTINEL if answer.sampled_logprob is None else answer.sampled_logprob
        return [(tokens[0], first)] + [(i, values.get(i, SENTINEL)) for i in tokens[1:]]

    def _answer(self, prompt: Prompt, query: Query) -> Answer:
        try:
            with self._lock:
                return self.endpoint.answer(prompt, query)
        except EndpointError as exc:
            raise _ApiError(400, str(exc)) from exc

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = _token(token_id)
        entry: dict[str, Any] = {"token": text, "logprob": logprob, "bytes": raw}
        if self.config.token_ids:
            entry["id"] = token_id
        return entry

    def _error_body(self, exc: _ApiError) -> dict[str, Any]:
        """The error's JSON: OpenAI's, or in the vllm dialect vLLM's (gateway errors stay OpenAI's)."""
        if not self._vllm or exc.origin == "gateway":
            return exc.body
        if exc.status == 401:
            return {"error": "Unauthorized"}  # vLLM's --api-key middleware
        if exc.origin == "route":
            return {"detail": HTTPStatus(exc.status).phrase}  # FastAPI's own 404 / 405
        error = exc.body["error"]
        kind = _VLLM_ERROR_TYPES.get(exc.status) or HTTPStatus(exc.status).phrase.replace(" ", "") + "Error"
        return {"error": {"message": error["message"], "type": kind, "param": error["param"], "code": exc.status}}

    # --- the vllm dialect ----------------------------------------------------------------

    def _vllm_logprobs_cap(self, k: int) -> None:
        """vLLM's check of the logprobs a request asks for against --max-logprobs (-1: the vocabulary)."""
        vocab = self.config.simulator.vocab_size
        cap = vocab if self.config.max_logprobs == -1 else self.config.max_logprobs
        if k > cap:
            raise _ApiError(400, f"Requested sample logprobs of {k}, which is greater than max allowed: {cap} "
                                 f"(parameter=logprobs, value={k})", "logprobs")

    def _vllm_logprob_token_ids(self, body: dict[str, Any]) -> list[int]:
        """A chat request's logprob_token_ids, validated as vLLM does (at most VLLM_MAX_LOGPROB_TOKEN_IDS ids,
        each in the vocabulary); [] where absent or empty (the natural top-k then stands)."""
        ids = body.get("logprob_token_ids")
        if ids is None:
            return []
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise _ApiError(400, "'logprob_token_ids' must be a list of integers", "logprob_token_ids")
        if len(ids) > VLLM_MAX_LOGPROB_TOKEN_IDS:
            raise _ApiError(400, f"Requested logprob_token_ids of length {len(ids)}, which is greater than max "
                                 f"allowed: {VLLM_MAX_LOGPROB_TOKEN_IDS}", "logprob_token_ids")
        vocab = self.config.simulator.vocab_size
        outside = [i for i in ids if not 0 <= i < vocab]
        if outside:
            raise _ApiError(400, f"token_id(s) {outside} in logprob_token_ids contain out-of-vocab token ids. "
                                 f"Vocabulary size: {vocab}", "logprob_token_ids")
        return ids

    def _vllm_top_logprobs(self, body: dict[str, Any], logprobs: bool, capped: bool = True) -> int:
        """A chat request's top_logprobs, validated as vLLM does; -1 becomes the vocabulary size. Not held to
        max_logprobs (`capped` False) where logprob_token_ids replace the top-k."""
        k = _integer(body, "top_logprobs")
        if k is None:
            return 0
        if k < -1:
            raise _ApiError(400, f"`top_logprobs` must be a positive value or -1. (parameter=top_logprobs, value={k})",
                            "top_logprobs")
        if k and not logprobs:
            raise _ApiError(400, "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)",
                            "top_logprobs")
        if k == -1:
            k = self.config.simulator.vocab_size
        if logprobs and capped:
            self._vllm_logprobs_cap(k)
        return k

    def _as_token_ids(self, body: dict[str, Any]) -> bool:
        """vLLM's return_tokens_as_token_ids: the request's own field, else the server's switch."""
        value = body.get("return_tokens_as_token_ids")
        if value is not None and not isinstance(value, bool):
            raise _ApiError(400, "'return_tokens_as_token_ids' must be a boolean", "return_tokens_as_token_ids")
        return self.config.return_tokens_as_token_ids if value is None else value

    def _vllm_bias(self, raw: dict[str, Any]) -> dict[int, float]:
        """vLLM's logit_bias: integer keys, any number of entries, out-of-vocabulary ids refused.

        The values are clipped to +-bias_max by the simulator, silently, as vLLM clamps to +-100.
        """
        vocab = self.config.simulator.vocab_size
        bias: dict[int, float] = {}
        for key, value in raw.items():
            if not _TOKEN_ID.fullmatch(key.strip()):
                raise _ApiError(400, f"Found token_id `{key}` in logit_bias but token_id must be an integer or string "
                                     "representing an integer", "logit_bias")
            number = _finite(value)
            if number is None:
                raise _ApiError(400, f"logit_bias value for token {key} must be a finite number", "logit_bias")
            bias[int(key)] = number
        outside = [i for i in bias if not 0 <= i < vocab]
        if outside:
            raise _ApiError(400, f"token_id(s) {outside} in logit_bias contain out-of-vocab token ids. Vocabulary size: "
                                 f"{vocab} (parameter=logit_bias, value={outside})", "logit_bias")
        return bias

    def _vllm_chat_entry(self, answer: Answer, k: int, as_ids: bool, chosen: list[int]) -> dict[str, Any]:
        """The generated token's chat logprobs entry as vLLM writes it (module docstring): with `chosen` ids,
        the generated token and then each chosen id, all of them, in place of the top-k."""
        token, text = _vllm_token(answer.sampled, as_ids)
        entries = _vllm_chosen(answer, chosen) if chosen else _vllm_ranked(answer)[:k]
        top = [
            {"token": name, "logprob": _vllm_logprob(lp), "bytes": list(name.encode())}
            for name, lp in ((_vllm_token(i, as_ids)[0], lp) for i, lp in entries)
        ]
        sampled_lp = SENTINEL if answer.sampled_logprob is None else answer.sampled_logprob
        return {"token": token, "logprob": _vllm_logprob(sampled_lp), "bytes": list(text.encode()), "top_logprobs": top}

    def _vllm_completion_logprobs(self, answer: Answer, k: int, as_ids: bool, chosen: list[int]) -> dict[str, Any]:
        """Legacy completions' logprobs as vLLM writes them: the first k + 1 entries (with `chosen` ids, the generated
        token and then those ids), keyed by token string."""
        top: dict[str, float] = {}
        for i, lp in _vllm_chosen(answer, chosen) if chosen else _vllm_ranked(answer)[: k + 1]:
            top[_vllm_token(i, as_ids)[0]] = _vllm_logprob(lp)  # same string: one key, the later value
        sampled_lp = SENTINEL if answer.sampled_logprob is None else answer.sampled_logprob
        return {
            "tokens": [_vllm_token(answer.sampled, as_ids)[0]], "token_logprobs": [_vllm_logprob(sampled_lp)],
            "top_logprobs": [top], "text_offset": [0],
        }


# vLLM's error types by status (create_error_response); others are the status phrase + "Error".
_VLLM_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


def _engine_config(config: ServerConfig) -> SimulatorConfig:
    """The simulator behind the server: in the vllm dialect, its top-k cap is max_logprobs and no entry cap; in the
    llama-cpp-python one, no cap, no clipping, pre-bias logprobs and a bias that steers sampling."""
    sim = config.simulator
    if config.dialect == "llama-cpp-python":
        return dataclasses.replace(
            sim, top_logprobs_cap=sim.vocab_size, bias_entries=sim.vocab_size, bias_max=UNCLIPPED_BIAS,
            logprobs_after_bias=False, bias_steers_sampling=True, sampled_logprob="report",
        )
    if config.dialect != "vllm":
        return sim
    cap = sim.vocab_size if config.max_logprobs == -1 else config.max_logprobs
    return dataclasses.replace(sim, top_logprobs_cap=cap, bias_entries=sim.vocab_size, chosen_ids=VLLM_MAX_LOGPROB_TOKEN_IDS)


def _token_prompt(ids: tuple[int, ...], vocab: int) -> Prompt:
    """The simulator's prompt for vLLM's token-id prompt `ids`: the longest prefix whose bytes are valid UTF-8 and
    split back into exactly it, as that text, then the rest as exact token ids (module docstring)."""
    for cut in range(len(ids), 0, -1):
        try:
            text = b"".join(simulator_token_bytes(i) for i in ids[:cut]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if simulator_split(text, vocab) == ids[:cut]:
            return Prompt(id=0, line=0, prompt=text, context_ids=ids[cut:])
    return Prompt(id=0, line=0, prompt="", context_ids=ids)


def _vllm_ranked(answer: Answer) -> list[tuple[int, float]]:
    """vLLM's entries for one position: the generated token first, then the top-k by rank without it."""
    sampled_lp = SENTINEL if answer.sampled_logprob is None else answer.sampled_logprob
    rest = [(i, lp) for i, lp in zip(answer.top_ids, answer.top_logprobs) if i != answer.sampled]
    if len(rest) == len(answer.top_ids):
        return [(answer.sampled, sampled_lp), *rest]
    return [(answer.sampled, answer.top()[answer.sampled]), *rest]


def _vllm_chosen(answer: Answer, chosen: list[int]) -> list[tuple[int, float]]:
    """vLLM's entries for one position with logprob_token_ids: the generated token first, then each chosen id
    in the order asked, each id once."""
    values = {**answer.top(), answer.sampled: SENTINEL if answer.sampled_logprob is None else answer.sampled_logprob}
    order = dict.fromkeys([answer.sampled, *chosen])
    return [(i, values[i]) for i in order]


def _vllm_logprob(logprob: float) -> float:
    return max(logprob, SENTINEL)  # vLLM: max(logprob, -9999.0), so -inf is JSON


@lru_cache(maxsize=1 << 16)
def _vllm_text(token_id: int) -> str:
    """A token's text as vLLM decodes it: "" where its bytes end in an incomplete UTF-8 sequence."""
    text = simulator_token_bytes(token_id).decode("utf-8", errors="replace")
    return "" if text.endswith("\ufffd") else text


def _vllm_token(token_id: int, as_ids: bool) -> tuple[str, str]:
    """(vLLM's token string, its decoded text)."""
    text = _vllm_text(token_id)
    return (f"token_id:{token_id}" if as_ids else text), text


@lru_cache(maxsize=1 << 16)
def _token(token_id: int) -> tuple[str, tuple[int, ...]]:
    """A token's text (invalid UTF-8 replaced) and its bytes, as OpenAI reports them."""
    raw = simulator_token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), tuple(raw)


def _text(token_id: int) -> str:
    return _token(token_id)[0]


@lru_cache(maxsize=1 << 16)
def _lcp_text(token_id: int) -> str:
    """A token's text as llama-cpp-python renders it: its bytes as UTF-8, invalid bytes dropped; "" for a piece
    longer than its 32-byte buffer."""
    raw = simulator_token_bytes(token_id)
    return raw.decode("utf-8", errors="ignore") if len(raw) <= LLAMA_CPP_PYTHON_PIECE_BYTES else ""


def _lcp_sampled_logprob(answer: Answer) -> float:
    """The generated token's own (pre-bias) logprob."""
    return answer.top()[answer.sampled] if answer.sampled_logprob is None else answer.sampled_logprob


def _lcp_top(answer: Answer, k: int) -> dict[str, float]:
    """llama-cpp-python's top_logprobs dict: the top-k best first under their texts (a later, lower entry overwrites
    an earlier one of the same text), then the generated token's own value under its text."""
    top: dict[str, float] = {}
    for i, lp in zip(answer.top_ids[:k], answer.top_logprobs[:k]):
        top[_lcp_text(i)] = lp
    top[_lcp_text(answer.sampled)] = _lcp_sampled_logprob(answer)
    return top


def _legacy_token(token_id: int) -> str:
    """A token as legacy completions name it: its text, or "bytes:\\xNN..." when it is not valid UTF-8."""
    raw = simulator_token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _approx_tokens(content: Any) -> int:
    """A prompt-token estimate for `usage`: about four bytes a token."""
    return max(1, len(json.dumps(content, ensure_ascii=False).encode()) // 4)


def _usage_tokens(body: Any, prompt_field: str) -> int:
    """The usage.total_tokens a completion request's answer reports: its prompt estimate plus one."""
    prompt = body.get(prompt_field) if isinstance(body, dict) else body
    return _approx_tokens(prompt) + 1


def _milliseconds(seconds: float) -> int:
    return math.ceil(round(seconds * 1000, 6))  # round first: 0.12 s is 120 ms, not 121


def _duration(seconds: float) -> str:
    """OpenAI's duration format, rounded up to the millisecond: "0s", "120ms", "1.5s", "6m0s", "1h2m3.5s"."""
    ms = _milliseconds(seconds)
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    text = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    return f"{hours}h{text}" if hours else text


def _number(value: float) -> str:
    """A header number: "600" for 600.0, "0.5" for 0.5."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise _ApiError(400, f"'{key}' must be an integer", key)
    return value


def _one_token(body: dict[str, Any], key: str) -> None:
    value = _integer(body, key)
    if value is not None and value != 1:
        raise _ApiError(400, f"only {key}=1 is supported (the simulator generates one token), got {value}", key)


def _finite(value: Any) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that tracks open connections so `close()` can end idle keep-alives."""

    request_queue_size = 128  # the listen backlog: many clients may connect at once

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], log: bool):
        self.log = log
        self.closed = False
        self._connections: set[socket.socket] = set()
        self._resets: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def reset(self, request: socket.socket) -> None:
        """End this connection with a TCP reset instead of a graceful close once its handler returns."""
        request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._connections_lock:
            self._resets.add(request)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
            reset = request in self._resets
            self._resets.discard(request)
        if reset:
            self.close_request(request)  # no shutdown (FIN) first: with SO_LINGER 0, close() sends RST
        else:
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.log:  # only transport failures get here (a client hung up); routes never raise
            super().handle_error(request, client_address)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self._connections_lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.server_close()


def _handler_class(server: SimulatorServer) -> type[BaseHTTPRequestHandler]:
    """The request handler class `_HTTPServer` builds per connection, bound to `server`."""
    return type("Handler", (_Handler,), {"api": server, "routes": _routes(server)})


Route = Callable[[Any], dict[str, Any]]


def _routes(server: SimulatorServer) -> dict[str, dict[str, Route]]:
    """Path -> method -> the SimulatorServer route that answers it."""
    routes = {
        "/v1/models": {"GET": server.models},
        "/v1/chat/completions": {"POST": server.chat_completions},
        "/v1/completions": {"POST": server.completions},
    }
    if server.config.dialect == "llama-cpp-python":
        return {**routes, "/extras/tokenize": {"POST": server.extras_tokenize}}
    return {**routes, "/tokenize": {"POST": server.tokenize}} if server.config.dialect == "vllm" else routes


class _Handler(BaseHTTPRequestHandler):
    """One HTTP exchange: read, route, authorize, parse, pass the completion gate, answer in the API's JSON.

    `api` (the SimulatorServer) and `routes` are set on the subclass `_handler_class` makes.
    """

    api: SimulatorServer
    routes: dict[str, dict[str, Route]]
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    server_version = "logprob-cli-simulator"
    wbufsize = -1  # buffer each response, sent at once on flush...
    disable_nagle_algorithm = True  # ...without waiting for the client's delayed ACK

    def dispatch(self) -> None:
        headers: dict[str, str] = {}
        try:
            body = self._read_body()
            path = urlsplit(self.path).path
            route = self._route(path, headers)
            self._authorize()
            request = self._parse(body)
            if path in _PROMPT_FIELDS and not self._pass_gate(request, path, headers):
                return
            status, payload = 200, route(request)
        except _ApiError as exc:
            status, payload = exc.status, self.api._error_body(exc)
            headers.update(exc.headers)
        except Exception as exc:  # a bug: still answer in the API's format, no traceback
            status, payload = 500, self.api._error_body(_ApiError(500, f"internal error: {exc!r}", type="server_error"))
        self._send(status, payload, headers)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = dispatch

    def _route(self, path: str, headers: dict[str, str]) -> Route:
        """The route for this path and method; 404 for an unknown path, 405 (with Allow) for a wrong method."""
        if path not in self.routes:
            raise _ApiError(404, f"Invalid URL ({self.command} {path})", origin="route")
        if self.command not in self.routes[path]:
            headers["Allow"] = ", ".join(self.routes[path])
            raise _ApiError(405, f"Method {self.command} not allowed for {path}", origin="route")
        return self.routes[path][self.command]

    def _pass_gate(self, request: Any, path: str, headers: dict[str, str]) -> bool:
        """What stands before a completion route (module docstring): the latency, a fault draw, the rate
        limits. False when a fault broke the exchange (nothing more to send); raises a 429 or 500 fault's
        error; else adds the rate-limit headers and returns True."""
        api = self.api
        if api.config.latency:
            time.sleep(api.config.latency)
        fault = api._draw_fault()
        if fault in ("timeout", "cut", "malformed"):
            self._break(fault)
            return False
        if fault:
            raise api._fault_error(fault)
        headers.update(api._admit(request, _PROMPT_FIELDS[path]))
        return True

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise _ApiError(400, "invalid Content-Length header")
        return self.rfile.read(length)

    def _parse(self, body: bytes) -> Any:
        if self.command == "GET":
            return None
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _ApiError(400, f"We could not parse the JSON body of your request: {exc}") from exc

    def _authorize(self) -> None:
        key = self.api.config.api_key
        if key is None:
            return
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise _ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
        if not hmac.compare_digest(auth[len("Bearer "):].strip().encode(), key.encode()):
            raise _ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _break(self, fault: str) -> None:
        """A fault that breaks the HTTP exchange: "timeout", "cut" or "malformed"."""
        if fault == "malformed":
            self._write(200, _MALFORMED_BODY)
            return
        self.close_connection = True
        if fault == "timeout":
            time.sleep(self.api.config.stall)
        else:
            self.server.reset(self.connection)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._write(status, json.dumps(payload, ensure_ascii=False).encode(), headers)

    def _write(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level failures (bad request line, unknown method) in OpenAI's JSON too."""
        self.close_connection = True
        self._send(code, _ApiError(code, message or HTTPStatus(code).phrase).body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.api.config.log_requests:
            super().log_message(format, *args)
