"""The built-in simulator served as an OpenAI-compatible HTTP API (standard library only).

Routes, in OpenAI's JSON formats: GET /v1/models, POST /v1/chat/completions and POST
/v1/completions (legacy). Every request produces one token (`max_tokens` absent or 1);
the answer is `SimulatedEndpoint.answer` for the request's prompt (the chat `messages`
list exactly as sent, or the legacy `prompt` string) and its logit_bias / top-k. A
generated token outside the returned top-k that the simulator withholds is reported as
-9999.0, OpenAI's sentinel. With `token_ids`, chat logprob entries also carry llama.cpp's
"id". Every error is OpenAI's {"error": {...}} JSON, never an HTML page or a traceback.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

from .endpoint import Answer, EndpointError, Prompt, Query
from .simulator import SimulatedEndpoint, SimulatorConfig, simulator_token_bytes

SENTINEL = -9999.0
LEGACY_LOGPROBS_CAP = 5  # OpenAI's legacy Completions cap
_TOKEN_ID = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class ServerConfig:
    """What the server serves and how.

    simulator: the simulated model and its behaviour switches.
    model: the only model name accepted (others get 404 model_not_found).
    api_key: if set, requests must send "Authorization: Bearer <api_key>" (else 401).
    token_ids: llama.cpp dialect, every chat logprob entry also carries "id".
    latency: seconds slept per completion request (outside the simulator lock), to emulate a remote API.
    log_requests: log each request to stderr (BaseHTTPRequestHandler's format); off by default.
    """

    simulator: SimulatorConfig = SimulatorConfig()
    model: str = "simulator"
    api_key: str | None = None
    token_ids: bool = False
    latency: float = 0.0
    log_requests: bool = False

    def __post_init__(self) -> None:
        if not self.latency >= 0:
            raise ValueError("latency must be >= 0")


class _ApiError(Exception):
    """A request failure, sent as OpenAI's error JSON with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


class SimulatorServer:
    """A `SimulatedEndpoint` behind an OpenAI-compatible HTTP server bound at construction.

    `url` is the base URL for an OpenAI client ("http://HOST:PORT/v1"). `start()` serves in
    a daemon thread, `serve_forever()` in the calling thread (for the CLI); `stop()` ends
    either and closes open connections. As a context manager it starts and stops itself.
    `endpoint` is the simulator answering (its `calls` counts answered completion requests).
    """

    def __init__(self, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.config = config or ServerConfig()
        self.endpoint = SimulatedEndpoint(self.config.simulator)
        self._lock = threading.Lock()
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
        return {"object": "list", "data": [{"id": self.config.model, "object": "model", "owned_by": "logprob-cli"}]}

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
        cap = self.config.simulator.top_logprobs_cap
        k = _integer(body, "top_logprobs") or 0
        if k > cap:
            raise _ApiError(400, f"top_logprobs must be <= {cap}", "top_logprobs")
        if k < 0:
            raise _ApiError(400, "top_logprobs must be >= 0", "top_logprobs")
        if k and not logprobs:
            raise _ApiError(400, "logprobs must be set to true if top_logprobs is used", "top_logprobs")
        prompt = Prompt(id=0, line=0, messages=messages)
        answer = self._answer(prompt, Query.make(self._bias(body), k if logprobs else 0))
        sampled_lp = SENTINEL if answer.sampled_logprob is None else answer.sampled_logprob
        content = None
        if logprobs:
            top = [self._entry(i, lp) for i, lp in zip(answer.top_ids, answer.top_logprobs)]
            content = {"content": [{**self._entry(answer.sampled, sampled_lp), "top_logprobs": top}]}
        n = _approx_tokens(messages)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.config.model,
            "system_fingerprint": "fp_simulator",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": _text(answer.sampled)},
                "finish_reason": "length",
                "logprobs": content,
            }],
            "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1},
        }

    def completions(self, body: Any) -> dict[str, Any]:
        body = self._completion_request(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _ApiError(400, "'prompt' must be a string (token arrays and batches are not supported)", "prompt")
        _one_token(body, "max_tokens")
        if body.get("echo"):
            raise _ApiError(400, "echo is not supported", "echo")
        k = _integer(body, "logprobs")
        cap = min(LEGACY_LOGPROBS_CAP, self.config.simulator.top_logprobs_cap)
        if k is not None and k > cap:
            raise _ApiError(400, f"logprobs must be <= {cap}", "logprobs")
        if k is not None and k < 0:
            raise _ApiError(400, "logprobs must be >= 0", "logprobs")
        answer = self._answer(Prompt(id=0, line=0, prompt=prompt), Query.make(self._bias(body), k or 0))
        text = _text(answer.sampled)
        logprobs = None
        if k is not None:
            top: dict[str, float] = {}
            for i, lp in zip(answer.top_ids, answer.top_logprobs):
                top[_text(i)] = max(lp, top.get(_text(i), -math.inf))  # same string: one key, as OpenAI
            sampled_lp = SENTINEL if answer.sampled_logprob is None else answer.sampled_logprob
            logprobs = {"tokens": [text], "token_logprobs": [sampled_lp], "top_logprobs": [top], "text_offset": [0]}
        n = _approx_tokens(prompt)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.config.model,
            "system_fingerprint": "fp_simulator",
            "choices": [{"text": text, "index": 0, "finish_reason": "length", "logprobs": logprobs}],
            "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1},
        }

    # --- helpers ------------------------------------------------------------------------

    def _completion_request(self, body: Any) -> dict[str, Any]:
        """Checks shared by both completion routes; sleeps the configured latency."""
        if self.config.latency:
            time.sleep(self.config.latency)
        if not isinstance(body, dict):
            raise _ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _ApiError(400, "you must provide a model parameter", "model")
        if model != self.config.model:
            raise _ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                            "model", "model_not_found")
        if body.get("stream"):
            raise _ApiError(400, "streaming is not supported", "stream")
        if body.get("n") not in (None, 1):
            raise _ApiError(400, "only n=1 is supported", "n")
        return body

    def _bias(self, body: dict[str, Any]) -> dict[int, float]:
        raw = body.get("logit_bias")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise _ApiError(400, "'logit_bias' must be an object mapping token ids to numbers", "logit_bias")
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

    def _answer(self, prompt: Prompt, query: Query) -> Answer:
        try:
            with self._lock:  # the simulator is not thread-safe
                return self.endpoint.answer(prompt, query)
        except EndpointError as exc:
            raise _ApiError(400, str(exc)) from exc

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = simulator_token_bytes(token_id)
        entry: dict[str, Any] = {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}
        if self.config.token_ids:
            entry["id"] = token_id
        return entry


def _text(token_id: int) -> str:
    return simulator_token_bytes(token_id).decode("utf-8", errors="replace")


def _approx_tokens(content: Any) -> int:
    """A prompt-token estimate for `usage`: about four bytes a token."""
    return max(1, len(json.dumps(content, ensure_ascii=False).encode()) // 4)


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

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], log: bool):
        self.log = log
        self.closed = False
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
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
    routes: dict[str, dict[str, Callable[[Any], dict[str, Any]]]] = {
        "/v1/models": {"GET": server.models},
        "/v1/chat/completions": {"POST": server.chat_completions},
        "/v1/completions": {"POST": server.completions},
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
        server_version = "logprob-cli-simulator"

        def dispatch(self) -> None:
            headers: dict[str, str] = {}
            try:
                body = self._read_body()
                path = urlsplit(self.path).path
                if path not in routes:
                    raise _ApiError(404, f"Invalid URL ({self.command} {path})")
                if self.command not in routes[path]:
                    headers["Allow"] = ", ".join(routes[path])
                    raise _ApiError(405, f"Method {self.command} not allowed for {path}")
                self._authorize()
                status, payload = 200, routes[path][self.command](self._parse(body))
            except _ApiError as exc:
                status, payload = exc.status, exc.body
            except Exception as exc:  # a bug: still answer in OpenAI's format, no traceback
                status, payload = 500, _ApiError(500, f"internal error: {exc!r}", type="server_error").body
            self._send(status, payload, headers)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = dispatch

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
            key = server.config.api_key
            if key is None:
                return
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                raise _ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
            if not hmac.compare_digest(auth[len("Bearer "):].strip().encode(), key.encode()):
                raise _ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode()
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
            if server.config.log_requests:
                super().log_message(format, *args)

    return Handler
