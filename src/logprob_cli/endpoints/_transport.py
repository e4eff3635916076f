"""The wire to an OpenAI-compatible API: JSON POSTs (and the odd GET), paced, retried, cheap on CPU.

Every request goes out through one seam, a `Wire` (`send(method, url, headers, body) -> RawResponse`):
`AiohttpWire` by default, `MockWire` in tests (it answers in-process from a handler or from recorded
exchanges, as httpx's MockTransport does), so everything above the wire runs the same in both.
`AiohttpWire` keeps one keep-alive aiohttp session per event loop (its C HTTP parser costs ~0.5 ms of CPU a
call where the openai client's stack costs ~4 ms: benchmarks/client_cpu.py), honouring HTTP(S)_PROXY /
NO_PROXY like the openai client (looked up once per URL, not per request). Every attempt first waits its
turn at the `RateLimiter`. What happens to a POST's answer (`get` returns most answers as they came):

- 2xx with a body `parse` accepts: returned; the limiter learns from its headers;
- 429: the limiter learns from it (`RateLimiter.throttled`: it may slow everyone down) and
  the call waits the server's Retry-After times uniform(1, 1 + 0.2 k) for its k-th 429 (k
  at most 5), so calls refused together do not all come back at once, then tries again. A 429 is the server asking to wait, not
  a failure: it does not use up `attempts`. A call is refused for at most `patience`
  seconds (10 minutes) from its first 429, or asked to wait past that: then the run stops
  with `EndpointFatal` (every call would be refused alike; the checkpoint keeps what was paid);
- 408, 409, 5xx, timeouts, dropped or cut connections, bodies that are cut-off JSON or that
  `parse` rejects (ValueError, KeyError, TypeError, IndexError): retried after
  exponential backoff with full jitter: the first retry after uniform(0, first) (an
  isolated fault costs ~50 ms, not a worker idle for 0.25 s on average), the n-th (n >= 2)
  after uniform(0, min(cap, base * 2**(n-2))), so a server that keeps failing is still
  given ~30 s (at most 31.6 s over the default 8 tries) to come back;
- 401/403/404: `EndpointFatal` at once (every request would fail the same way);
  other 4xx: `EndpointRejected` at once (this request is wrong; retrying will not help);
- an answer no OpenAI-compatible API gives (a 404, 405 or 501 that is not JSON, a 200 that is an
  HTML page, plain text, or JSON with neither `choices` nor `error`): `EndpointFatal` saying so;
- a connection that cannot be opened at all: `EndpointFatal` after `connect_attempts`.
A request still failing after `attempts` tries (429s not counted) raises `EndpointError`
with the last reason: its prompt fails, the run goes on. Every retry is counted in
`limiter.retries` (and 429s in `limiter.throttles`) for the progress display.
Server messages are quoted on one line (at most MESSAGE_CHARS characters); a body that is not a
JSON error is described ("an HTML page titled '...'") or cut to EXCERPT_CHARS, never printed whole.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import urllib.request
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from logprob_cli.endpoints._base import EndpointError, EndpointFatal, EndpointRejected
from logprob_cli.errors import Worded
from logprob_cli.endpoints._ratelimit import RateLimiter, retry_after
from logprob_cli.endpoints._urls import redact
from logprob_cli.wording import plural

T = TypeVar("T")
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529}
NO_ROUTE_STATUS = {404, 405, 501}  # answered without JSON: no OpenAI-compatible route at that URL
EXCERPT_CHARS = 160  # of a body that is not a JSON error
MESSAGE_CHARS = 500  # of a server's own JSON error message


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `attempts` per request (the first included; 429s are not counted),
    backoff `first`, then `base`..`cap` seconds, `timeout` seconds per attempt,
    `connect_attempts` before an unreachable server is fatal, and `patience`: seconds a call
    may stay rate limited (429s)."""

    attempts: int = 8
    first: float = 0.1
    base: float = 0.5
    cap: float = 30.0
    timeout: float = 60.0
    connect_attempts: int = 3
    patience: float = 600.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure of a call (module docstring)."""
        if failures <= 1:
            return random.uniform(0.0, self.first)
        return random.uniform(0.0, min(self.cap, self.base * 2 ** (failures - 2)))


class _Retry(Exception):
    """One attempt failed in a way worth retrying; `wait` is the server's own ask, if any."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _RateLimited(Exception):
    """A 429: retry after `wait` seconds (the limiter's reading of the answer)."""

    def __init__(self, reason: str, wait: float):
        super().__init__(reason)
        self.wait = wait


@dataclass(frozen=True)
class RawResponse:
    """One answer as it came off the wire: status, headers (case-insensitive names), body bytes."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Wire(Protocol):
    """The one place a request leaves the process. `send` raises aiohttp's errors for a connection that
    cannot be opened (`aiohttp.ClientConnectorError`), is cut (`aiohttp.ClientError`, `ConnectionError`)
    or times out (`asyncio.TimeoutError`); `Transport` classifies them and every status."""

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> RawResponse: ...

    async def aclose(self) -> None: ...


class AiohttpWire:
    """The network: one keep-alive aiohttp session per event loop, `timeout` seconds per request, the
    environment's proxy (HTTP(S)_PROXY, NO_PROXY) for each URL, looked up once per URL."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self._proxies: dict[str, str | None] = {}
        self._session_of_loop: tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession] | None = None

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> RawResponse:
        proxy = self._proxies[url] if url in self._proxies else self._proxies.setdefault(url, _env_proxy(url))
        async with self._session().request(method, url, data=body, headers=headers, proxy=proxy) as response:
            return RawResponse(response.status, response.headers, await response.read())

    def _session(self) -> aiohttp.ClientSession:
        """The session of the running loop (a connection pool cannot outlive its loop)."""
        loop = asyncio.get_running_loop()
        if self._session_of_loop is None or self._session_of_loop[0] is not loop:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent",),
                headers={"User-Agent": "logprob-cli"},
            )
            self._session_of_loop = (loop, session)
        return self._session_of_loop[1]

    async def aclose(self) -> None:
        """Close the running loop's session (call before that loop ends)."""
        if self._session_of_loop is not None and self._session_of_loop[0] is asyncio.get_running_loop():
            await self._session_of_loop[1].close()
            self._session_of_loop = None


@dataclass(frozen=True)
class Request:
    """A request as `MockWire` hands it to its handler: method, full URL, headers, body bytes."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None

    def json(self) -> Any:
        return json.loads(self.body or b"null")


class MockWire:
    """An in-process wire for tests: `handler(request)` returns the RawResponse (or raises what a real wire
    would); every request is kept in `requests`, in order."""

    def __init__(self, handler: Callable[[Request], RawResponse | Awaitable[RawResponse]]):
        self.handler = handler
        self.requests: list[Request] = []

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> RawResponse:
        request = Request(method, url, dict(headers), body)
        self.requests.append(request)
        answer = self.handler(request)
        if not isinstance(answer, RawResponse):
            answer = await answer
        return RawResponse(answer.status, CIMultiDictProxy(CIMultiDict(answer.headers)), answer.body)

    async def aclose(self) -> None:
        pass


class Transport:
    """Sends JSON requests to `base_url` through `wire` (default: the network; see module docstring).
    `aclose()` before the loop ends."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        headers: dict[str, str] | None = None,
        limiter: RateLimiter | None = None,
        retry: RetryPolicy | None = None,
        wire: Wire | None = None,
    ):
        base, _, query = base_url.partition("?")  # a query string (?api-version=...) goes after the path
        self.base_url = base.rstrip("/")
        self._query = f"?{query}" if query else ""
        self.limiter = limiter or RateLimiter()
        self.retry = retry or RetryPolicy()
        self.wire: Wire = wire or AiohttpWire(self.retry.timeout)
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json", **(headers or {})}

    async def post(self, path: str, body: dict[str, Any], tokens: int, parse: Callable[[Any], T]) -> T:
        """POST `body` to base_url + path and return `parse(json)`, retrying as the module docstring says.

        tokens: what the request counts against a tokens-per-minute limit (prompt + max_tokens).
        """
        return await self._call("POST", path, json.dumps(body).encode(), tokens, lambda raw: self._read(path, tokens, raw, parse))

    async def get(self, path: str) -> RawResponse:
        """GET base_url + path: paced, and retried like `post` after connection failures, timeouts and
        408/409/429/5xx (a 429 counted as a try here); any other answer is returned as it came, for the
        caller to read (a one-off question such as GET /models has its own idea of what an error means)."""
        return await self._call("GET", path, None, 1, self._returned)

    async def _call(self, method: str, path: str, data: bytes | None, tokens: int, read: Callable[[RawResponse], T]) -> T:
        """Send until `read` accepts an answer, retrying as the module docstring says."""
        url = self.base_url + path + self._query
        failures = connect_failures = 0
        limited_since: float | None = None  # when this call's first 429 came
        refusals = 0  # this call's 429s
        while True:
            await self.limiter.acquire(tokens)
            try:
                return read(await self.wire.send(method, url, self._headers, data))
            except _RateLimited as limited:
                now = asyncio.get_running_loop().time()
                limited_since = now if limited_since is None else limited_since
                self._check_patience(str(limited), limited.wait, now - limited_since)
                self.limiter.retrying()
                refusals += 1
                await asyncio.sleep(max(limited.wait, 0.01) * random.uniform(1.0, 1.0 + 0.2 * min(refusals, 5)))
                continue
            except _Retry as retry:
                reason, wait = str(retry), retry.wait
            except aiohttp.ClientConnectorError as err:
                connect_failures += 1
                if connect_failures >= min(self.retry.connect_attempts, self.retry.attempts):
                    where = f"{self.base_url}{self._query}"
                    raise EndpointFatal(
                        redact(f"cannot reach {where} ({err.os_error or err}): is the server running, and the URL right?")
                    ) from None
                reason, wait = f"cannot connect ({err.os_error or err})", None
            except asyncio.TimeoutError:
                reason, wait = f"no answer within {self.retry.timeout:g} s", None
            except (aiohttp.ClientError, ConnectionError) as err:  # dropped, reset or cut connections
                reason, wait = f"connection failed ({type(err).__name__}: {err})", None
            failures += 1
            if failures >= self.retry.attempts:
                raise EndpointError(redact(f"{self.base_url} kept failing ({plural(failures, 'try', 'tries')}); last: {reason}"))
            self.limiter.retrying()
            await asyncio.sleep(self.retry.backoff(failures) if wait is None else wait)

    @property
    def retries(self) -> int:
        """Calls sent again so far (after a 429 or another failure), by every transport sharing the limiter."""
        return self.limiter.retries

    def _check_patience(self, reason: str, wait: float, limited_for: float) -> None:
        """Stop the run (EndpointFatal) once a call has been rate limited for `patience` seconds."""
        if limited_for + wait <= self.retry.patience:
            return
        asked = f", and asks to wait {wait:,.0f} s more" if wait > 1 else ""
        raise EndpointFatal(Worded(
            "{url} has refused a call with 429 (rate limited) for {seconds:,.0f} s{asked}; last: {reason}. The "
            "checkpoint keeps every answer so far: run the same command later to resume (if you know the "
            "endpoint's limits, give them with {rpm} / {tpm}).",
            url=self.base_url, seconds=limited_for, asked=asked, reason=reason,
        ))

    def _read(self, path: str, tokens: int, response: RawResponse, parse: Callable[[Any], T]) -> T:
        """A POST's answer: `parse(json)` of a 2xx, else the retry or error the module docstring names."""
        status, headers, raw = response.status, response.headers, response.body
        if status == 429:
            kind = _error_type(raw)
            wait = self.limiter.throttled(headers, "tokens" if kind == "tokens" else None, tokens)
            raise _RateLimited(f"429 rate limited: {_message(raw, status)}", wait)
        if status in RETRYABLE_STATUS:
            raise _Retry(f"{status}: {_message(raw, status)}", retry_after(headers) if status == 503 else None)
        if status >= 400:
            raise _status_error(status, raw, redact(self.base_url), path)
        try:
            result = parse(json.loads(raw))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise _unreadable(status, raw, err, redact(self.base_url), path) from None
        self.limiter.succeeded(tokens, headers)
        return result

    @staticmethod
    def _returned(response: RawResponse) -> RawResponse:
        """A GET's answer, unless it is one worth asking again (see `get`)."""
        if response.status in RETRYABLE_STATUS:
            wait = retry_after(response.headers) if response.status in (429, 503) else None
            raise _Retry(f"{response.status}: {_message(response.body, response.status)}", wait)
        return response

    async def aclose(self) -> None:
        """Close the wire's connections of the running loop (call before that loop ends)."""
        await self.wire.aclose()


def _env_proxy(url: str) -> str | None:
    """The proxy the environment (HTTP_PROXY, HTTPS_PROXY, NO_PROXY) names for `url`, if any."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass_environment(parts.hostname or ""):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme)


NOT_JSON = object()


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or NOT_JSON."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return NOT_JSON


def _error_body(raw: bytes) -> dict[str, Any]:
    """The error object of a JSON answer (its "error", or the body itself); {} for a body that is not JSON."""
    body = parse_json(raw)
    inner = body.get("error", body) if isinstance(body, dict) else {}
    return inner if isinstance(inner, dict) else {"message": str(inner)}


def _error_type(raw: bytes) -> str | None:
    kind = _error_body(raw).get("type")
    return kind if isinstance(kind, str) else None


def _message(raw: bytes, status: int) -> str:
    """What the server said, in one short line: its JSON error message, else a description of the body."""
    message = _error_body(raw).get("message")
    if message:
        return one_line(str(message), MESSAGE_CHARS)
    return describe_body(raw) or f"HTTP {status} with no body"


def describe_body(raw: bytes) -> str:
    """A body that is not a JSON error, in a few words: "an HTML page titled '404 Not Found'", or its
    first EXCERPT_CHARS characters on one line; "" for an empty body."""
    text = raw.decode("utf-8", errors="replace").strip()
    if is_html(text):
        title = re.search(r"<title[^>]*>(.*?)</title>", text[:4096], re.IGNORECASE | re.DOTALL)
        named = one_line(title.group(1)) if title else ""
        return "an HTML page" + (f" titled {named!r}" if named else "")
    return one_line(text)


def is_html(text: str) -> bool:
    head = text[:1024].lstrip().lower()
    return head.startswith(("<!doctype html", "<html", "<head", "<body")) or "<html" in head


def one_line(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` on one line, cut to `limit` characters (the cut marked with an ellipsis)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def not_an_api(where: str, request: str, status: int, what: str) -> EndpointFatal:
    """The error for an answer no OpenAI-compatible API gives: `request` ("POST /chat/completions") answered
    `status` with `what` ("an HTML page")."""
    return EndpointFatal(Worded(
        "{where} does not look like an OpenAI-compatible API ({request} answered {status} with {what}): "
        "check {base_url} (such APIs usually sit under /v1)", where=where, request=request, status=status, what=what,
    ))


def _status_error(status: int, raw: bytes, where: str, path: str) -> EndpointError:
    """The error for a 4xx or 5xx answer that is not retried (see the module docstring)."""
    message = _message(raw, status)
    if status in NO_ROUTE_STATUS and parse_json(raw) is NOT_JSON:
        return not_an_api(where, f"POST {path}", status, describe_body(raw) or "no body")
    if status == 401:
        return EndpointFatal(Worded(
            "{where} rejected the API key (401: {message}); set OPENAI_API_KEY or pass {api_key}", where=where, message=message
        ))
    if status == 403:
        return EndpointFatal(f"{where} refused access (403: {message})")
    if status == 404:
        return EndpointFatal(Worded("{where} answered 404 ({message}); check {model} and {base_url}", where=where, message=message))
    return EndpointRejected(f"{where} answered {status}: {message}", message)


def _unreadable(status: int, raw: bytes, err: Exception, where: str, path: str) -> Exception:
    """A 2xx answer that `parse` could not read: fatal where no OpenAI-compatible API would send it (HTML,
    plain text, JSON with neither `choices` nor `error`), else a retry (a cut-off or malformed body)."""
    text, body = raw.decode("utf-8", errors="replace").strip(), parse_json(raw)
    if is_html(text):
        return not_an_api(where, f"POST {path}", status, describe_body(raw))
    if body is NOT_JSON and text and text[0] not in "{[":
        return not_an_api(where, f"POST {path}", status, f"plain text: {describe_body(raw)!r}")
    if body is not NOT_JSON and not (isinstance(body, dict) and ("choices" in body or "error" in body)):
        return not_an_api(where, f"POST {path}", status, f"JSON that is not a completion: {describe_body(raw)}")
    return _Retry(f"an unreadable answer ({type(err).__name__}: {one_line(str(err))}; body starts {raw[:80]!r})")
