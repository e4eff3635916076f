"""The simulator over HTTP: the openai client sees what SimulatedEndpoint.answer says, in OpenAI's formats."""

import http.client
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
from typer.testing import CliRunner

from logprob_cli.cli import app
from logprob_cli.endpoints._base import Query
from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig, simulator_token_bytes

SIM = SimulatorConfig(vocab_size=2000)
VOCAB = {simulator_token_bytes(i): i for i in range(SIM.vocab_size)}
MESSAGES = [{"role": "user", "content": "The capital of France is"}]
PROMPT = "The capital of France is"


def token_id(entry) -> int:
    return VOCAB[bytes(entry.bytes)]


def client_for(server: SimulatorServer, api_key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=api_key, max_retries=0, timeout=10)


def chat(client, **kwargs):
    return client.chat.completions.create(**{"model": "simulator", "messages": MESSAGES, "max_tokens": 1, **kwargs})


def raw(server: SimulatorServer, method: str, path: str, body: bytes | None = None, headers=None):
    """One request with http.client: (status, headers, parsed JSON body)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, response, json.loads(data)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server():
    with SimulatorServer(ServerConfig(SIM)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with client_for(server) as c:
        yield c


def test_models_lists_the_served_model(client):
    (model,) = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("simulator", "model", "logprob-cli")


def test_chat_returns_the_simulator_answer(client):
    response = chat(client, logprobs=True, top_logprobs=20)
    expected = SimulatedEndpoint(SIM).answer(MESSAGES, Query.make(top_logprobs=20))
    (choice,) = response.choices
    (entry,) = choice.logprobs.content
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == "simulator" and response.system_fingerprint == "fp_simulator"
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.content == simulator_token_bytes(expected.sampled).decode()
    assert token_id(entry) == expected.sampled and entry.logprob == expected.sampled_logprob
    assert [token_id(t) for t in entry.top_logprobs] == list(expected.top_ids)
    assert [t.logprob for t in entry.top_logprobs] == list(expected.top_logprobs)
    assert all(t.token == bytes(t.bytes).decode("utf-8", errors="replace") for t in entry.top_logprobs)
    assert response.usage.completion_tokens == 1
    assert response.usage.total_tokens == response.usage.prompt_tokens + 1


def test_chat_without_logprobs_returns_null_logprobs(client):
    (choice,) = chat(client).choices
    assert choice.logprobs is None and choice.message.content


def test_logit_bias_steers_the_generated_token(client):
    target = int(np.argsort(-SimulatedEndpoint(SIM).true_logprobs(MESSAGES))[500])
    response = chat(client, logprobs=True, top_logprobs=5, logit_bias={str(target): 100})
    expected = SimulatedEndpoint(SIM).answer(MESSAGES, Query.make({target: 100.0}, top_logprobs=5))
    (entry,) = response.choices[0].logprobs.content
    assert expected.sampled == target == token_id(entry)
    assert [token_id(t) for t in entry.top_logprobs] == list(expected.top_ids)
    assert [t.logprob for t in entry.top_logprobs] == list(expected.top_logprobs)


def test_forced_token_outside_top_k_reports_the_sentinel():
    config = SimulatorConfig(vocab_size=2000, logprobs_after_bias=False, sampled_logprob="sentinel")
    target = int(np.argsort(-SimulatedEndpoint(config).true_logprobs(MESSAGES))[500])
    with SimulatorServer(ServerConfig(config)) as server, client_for(server) as client:
        forced = chat(client, logprobs=True, top_logprobs=5, logit_bias={str(target): 100}).choices[0]
        plain = chat(client, logprobs=True, top_logprobs=5).choices[0]
    expected = SimulatedEndpoint(config).answer(MESSAGES, Query.make(top_logprobs=5))
    (entry,) = forced.logprobs.content
    assert token_id(entry) == target and entry.logprob == -9999.0
    assert [token_id(t) for t in entry.top_logprobs] == list(expected.top_ids), "pre-bias top-k"
    (entry,) = plain.logprobs.content
    assert entry.logprob == entry.top_logprobs[0].logprob != -9999.0


def test_token_ids_dialect_adds_id_to_every_entry():
    with SimulatorServer(ServerConfig(SIM, token_ids=True)) as server, client_for(server) as client:
        (entry,) = chat(client, logprobs=True, top_logprobs=5).choices[0].logprobs.content
    assert entry.model_extra["id"] == token_id(entry)
    assert [t.model_extra["id"] for t in entry.top_logprobs] == [token_id(t) for t in entry.top_logprobs]


def test_no_id_without_the_dialect(client):
    (entry,) = chat(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert "id" not in entry.model_extra and all("id" not in t.model_extra for t in entry.top_logprobs)


def test_legacy_completions_return_the_simulator_answer(client):
    response = client.completions.create(model="simulator", prompt=PROMPT, max_tokens=1, logprobs=5)
    expected = SimulatedEndpoint(SIM).answer(PROMPT, Query.make(top_logprobs=5))
    (choice,) = response.choices
    text = simulator_token_bytes(expected.sampled).decode()
    assert response.object == "text_completion" and choice.finish_reason == "length"
    assert choice.text == text
    assert choice.logprobs.tokens == [text] and choice.logprobs.text_offset == [0]
    assert choice.logprobs.token_logprobs == [expected.sampled_logprob]
    top = {simulator_token_bytes(i).decode(): lp for i, lp in zip(expected.top_ids, expected.top_logprobs)}
    assert choice.logprobs.top_logprobs == [top]


def test_legacy_names_tokens_that_are_not_utf8_by_their_bytes(client):
    # Ids 200 and 201 are lone bytes that are not valid UTF-8: as text both would read "\ufffd".
    bias = {"200": 100, "201": 90}
    response = client.completions.create(model="simulator", prompt=PROMPT, max_tokens=1, logprobs=5, logit_bias=bias)
    expected = SimulatedEndpoint(SIM).answer(PROMPT, Query.make({200: 100, 201: 90}, top_logprobs=5))
    assert expected.top_ids[:2] == (200, 201)
    logprobs = response.choices[0].logprobs
    (top,) = logprobs.top_logprobs
    assert logprobs.tokens == ["bytes:\\xc8"]
    assert len(top) == 5 and top["bytes:\\xc8"] == expected.top_logprobs[0] and top["bytes:\\xc9"] == expected.top_logprobs[1]


def test_legacy_without_logprobs_returns_null_logprobs(client):
    (choice,) = client.completions.create(model="simulator", prompt=PROMPT, max_tokens=1).choices
    assert choice.logprobs is None and choice.text


def _chat_error(**kwargs):
    return lambda c: chat(c, **kwargs)


def _legacy_error(**kwargs):
    return lambda c: c.completions.create(**{"model": "simulator", "prompt": PROMPT, "max_tokens": 1, **kwargs})


@pytest.mark.parametrize(
    "call, error, status, message",
    [
        (_chat_error(model="gpt-4o"), openai.NotFoundError, 404, "does not exist"),
        (_chat_error(max_tokens=2), openai.BadRequestError, 400, "only max_tokens=1 is supported"),
        (_chat_error(max_tokens=None, max_completion_tokens=5), openai.BadRequestError, 400,
         "only max_completion_tokens=1"),
        (_chat_error(logprobs=True, top_logprobs=21), openai.BadRequestError, 400, "top_logprobs must be <= 20"),
        (_chat_error(top_logprobs=3), openai.BadRequestError, 400, "logprobs must be set to true"),
        (_chat_error(logit_bias={"abc": 5}), openai.BadRequestError, 400, "not an integer token id"),
        (_chat_error(logit_bias={"2000": 5}), openai.BadRequestError, 400, "outside the vocabulary"),
        (_chat_error(logit_bias={"-1": 5}), openai.BadRequestError, 400, "outside the vocabulary"),
        (_chat_error(logit_bias={str(i): 1 for i in range(301)}), openai.BadRequestError, 400, "at most 300"),
        (_chat_error(messages=[]), openai.BadRequestError, 400, "messages"),
        (_chat_error(n=2), openai.BadRequestError, 400, "draws at most 1 choice a request"),
        (_legacy_error(logprobs=6), openai.BadRequestError, 400, "logprobs must be <= 5"),
        (_legacy_error(max_tokens=16), openai.BadRequestError, 400, "only max_tokens=1"),
        (_legacy_error(model="davinci-002"), openai.NotFoundError, 404, "does not exist"),
    ],
)
def test_bad_requests_raise_openai_errors_and_cost_no_call(server, client, call, error, status, message):
    before = server.endpoint.calls
    with pytest.raises(error) as caught:
        call(client)
    assert caught.value.status_code == status and message in caught.value.message
    if status == 404:
        assert (caught.value.code, caught.value.param) == ("model_not_found", "model")
    assert server.endpoint.calls == before


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400),
        ("POST", "/v1/nowhere", b"{}", 404),
        ("GET", "/", None, 404),
        ("GET", "/v1/chat/completions", None, 405),
        ("POST", "/v1/models", b"{}", 405),
        ("BREW", "/v1/models", None, 501),
    ],
)
def test_transport_errors_are_openai_json(server, method, path, body, status):
    got, response, payload = raw(server, method, path, body, {"Content-Type": "application/json"})
    assert got == status
    assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
    if status == 405:
        assert response.getheader("Allow") in ("GET", "POST")


def test_api_key_is_required_when_configured():
    with SimulatorServer(ServerConfig(SIM, api_key="secret")) as server:
        with client_for(server, "wrong") as client, pytest.raises(openai.AuthenticationError) as caught:
            client.models.list()
        assert caught.value.code == "invalid_api_key"
        status, _, payload = raw(server, "GET", "/v1/models")
        assert status == 401 and "API key" in payload["error"]["message"]
        with client_for(server, "secret") as client:
            assert chat(client).choices[0].message.content
        assert server.endpoint.calls == 1


def test_calls_count_only_answered_completions():
    with SimulatorServer(ServerConfig(SIM)) as server, client_for(server) as client:
        client.models.list()
        with pytest.raises(openai.BadRequestError):
            chat(client, max_tokens=3)
        chat(client)
        client.completions.create(model="simulator", prompt=PROMPT, max_tokens=1)
        assert server.endpoint.calls == 2


def test_concurrent_requests_get_their_own_answers(server, client):
    prompts = [[{"role": "user", "content": f"prompt {i}"}] for i in range(16)]
    before = server.endpoint.calls
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda m: chat(client, messages=m, logprobs=True, top_logprobs=3), prompts))
    reference = SimulatedEndpoint(SIM)
    for messages, response in zip(prompts, responses):
        expected = reference.answer(messages, Query.make(top_logprobs=3))
        (entry,) = response.choices[0].logprobs.content
        assert [t.logprob for t in entry.top_logprobs] == list(expected.top_logprobs)
    assert server.endpoint.calls == before + 16


def test_latency_is_slept_per_completion():
    with SimulatorServer(ServerConfig(SIM, latency=0.1)) as server, client_for(server) as client:
        start = time.perf_counter()
        chat(client)
        assert time.perf_counter() - start >= 0.1


def test_stop_closes_idle_keep_alive_connections():
    server = SimulatorServer(ServerConfig(SIM)).start()
    with client_for(server) as client:
        chat(client)
        start = time.perf_counter()
        server.stop()
        assert time.perf_counter() - start < 2
        with pytest.raises(openai.APIConnectionError):
            chat(client)
    server.stop()  # idempotent


# --- rate limits and injected faults ---------------------------------------------------------

BODY = json.dumps({"model": "simulator", "messages": MESSAGES, "max_tokens": 1, "logprobs": True, "top_logprobs": 5})


def post(server: SimulatorServer, body: str = BODY, path: str = "/v1/chat/completions", timeout: float = 10):
    """One completion request on a fresh connection: (status, lower-cased headers, raw body)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def seconds(duration: str) -> float:
    """OpenAI's short durations as the server writes them below a minute: "120ms", "1.5s", "0s"."""
    return float(duration[:-2]) / 1000 if duration.endswith("ms") else float(duration[:-1])


class FrozenClock:
    """The rate limits' clock, moved only by the test: a loaded machine cannot refill a bucket between requests."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited_server(**limits) -> SimulatorServer:
    return SimulatorServer(ServerConfig(SIM, **limits), clock=FrozenClock())


def test_rpm_over_the_limit_gets_openai_429_and_costs_no_call():
    clock = FrozenClock()
    with SimulatorServer(ServerConfig(SIM, rpm=60), clock=clock) as server:  # a burst of one request, one more per second
        status, headers, _ = post(server)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "60" and headers["x-ratelimit-remaining-requests"] == "0"
        assert 0.9 < seconds(headers["x-ratelimit-reset-requests"]) <= 1
        assert not any(name.endswith("-tokens") for name in headers), "no tpm, no token headers"

        status, headers, data = post(server)
        error = json.loads(data)["error"]
        assert status == 429
        assert (error["type"], error["code"], error["param"]) == ("requests", "rate_limit_exceeded", None)
        assert error["message"].startswith("Rate limit reached for requests per min (RPM)")
        assert "Limit 60" in error["message"] and "Please try again in " in error["message"]
        assert headers["retry-after"] == "1" and 900 < int(headers["retry-after-ms"]) <= 1000
        assert headers["x-ratelimit-remaining-requests"] == "0"
        with client_for(server) as client, pytest.raises(openai.RateLimitError) as caught:
            chat(client)
        assert caught.value.code == "rate_limit_exceeded"
        assert (server.endpoint.calls, server.rejected) == (1, 2)

        clock.now += int(headers["retry-after-ms"]) / 1000
        assert post(server)[0] == 200
        assert (server.endpoint.calls, server.rejected) == (2, 2)


def test_remaining_counts_down_and_bad_requests_count_too():
    with limited_server(rpm=600) as server:  # a burst of 10, one more every 100 ms
        remaining = [int(post(server)[1]["x-ratelimit-remaining-requests"]) for _ in range(3)]
        assert remaining == [9, 8, 7]
        status, headers, _ = post(server, BODY.replace('"max_tokens": 1', '"max_tokens": 2'))
        assert status == 400 and headers["x-ratelimit-remaining-requests"] == "6"
        assert 0.3 < seconds(headers["x-ratelimit-reset-requests"]) <= 0.4
        legacy = json.dumps({"model": "simulator", "prompt": PROMPT})
        status, headers, _ = post(server, legacy, path="/v1/completions")
        assert status == 200 and "x-ratelimit-limit-requests" in headers


def test_tpm_charges_usage_total_tokens(server):
    cost = json.loads(post(server)[2])["usage"]["total_tokens"]
    tpm = 60 * 2.5 * cost  # the bucket holds two and a half requests' tokens
    with limited_server(tpm=tpm) as limited:
        first, second, third = (post(limited) for _ in range(3))
    assert first[0] == second[0] == 200 and third[0] == 429
    assert first[1]["x-ratelimit-limit-tokens"] == str(int(tpm))
    assert int(first[1]["x-ratelimit-remaining-tokens"]) == int(1.5 * cost)
    assert 0.35 < seconds(first[1]["x-ratelimit-reset-tokens"]) <= 0.4
    assert "x-ratelimit-limit-requests" not in first[1]
    error = json.loads(third[2])["error"]
    assert error["type"] == "tokens" and f"Requested {cost}" in error["message"]
    assert 0.1 < int(third[1]["retry-after-ms"]) / 1000 <= 0.2 and third[1]["retry-after"] == "1"


def test_a_request_bigger_than_the_burst_passes_a_full_bucket_and_leaves_a_debt(server):
    cost = json.loads(post(server)[2])["usage"]["total_tokens"]
    with limited_server(tpm=60) as limited:  # one token a second
        assert post(limited)[0] == 200
        status, headers, _ = post(limited)
    assert status == 429 and headers["x-ratelimit-remaining-tokens"] == "0"
    assert cost - 1.1 < int(headers["retry-after-ms"]) / 1000 <= cost
    assert headers["retry-after"] == str(cost)


def test_concurrent_requests_are_admitted_or_rejected_exactly_once():
    with limited_server(rpm=600) as server, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: post(server)[0], range(40)))
    assert set(statuses) == {200, 429}
    assert server.endpoint.calls == statuses.count(200) and server.rejected == statuses.count(429)
    assert statuses.count(200) == 10, "the burst, the clock standing still"


def _fault_server(kind: str, **kwargs) -> SimulatorServer:
    return SimulatorServer(ServerConfig(SIM, fault_rate=1.0, faults=(kind,), stall=0.2, **kwargs), clock=FrozenClock())


def test_fault_429_asks_for_a_short_retry():
    with _fault_server("429", rpm=600) as server:
        status, headers, data = post(server)
    error = json.loads(data)["error"]
    assert status == 429 and (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "50")
    assert headers["x-ratelimit-remaining-requests"] == "10", "an injected 429 does not use the limit"
    assert (server.faults_injected, server.endpoint.calls, server.rejected) == ({"429": 1}, 0, 0)


def test_fault_500_is_a_server_error():
    with _fault_server("500") as server:
        status, _, data = post(server)
    error = json.loads(data)["error"]
    assert status == 500 and error["type"] == "server_error"
    assert error["message"] == "The server had an error while processing your request."
    assert (server.faults_injected, server.endpoint.calls) == ({"500": 1}, 0)


def test_fault_timeout_stalls_then_closes_without_a_response():
    with _fault_server("timeout") as server:
        start = time.perf_counter()
        with pytest.raises(http.client.RemoteDisconnected):
            post(server)
        assert 0.2 <= time.perf_counter() - start < 2
        assert (server.faults_injected, server.endpoint.calls) == ({"timeout": 1}, 0)


def test_fault_cut_resets_the_connection_without_a_response():
    with _fault_server("cut") as server:
        url = urlsplit(server.url)
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(BODY)}\r\n\r\n{BODY}").encode()
        with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
            sock.sendall(request)
            with pytest.raises(ConnectionResetError):
                sock.recv(1024)
        with client_for(server) as client, pytest.raises(openai.APIConnectionError):
            chat(client)
        assert (server.faults_injected, server.endpoint.calls) == ({"cut": 2}, 0)


def test_fault_malformed_is_a_200_with_a_truncated_json_body():
    with _fault_server("malformed") as server:
        status, headers, data = post(server)
        assert status == 200 and headers["content-type"] == "application/json"
        assert int(headers["content-length"]) == len(data) > 0
        with pytest.raises(ValueError):
            json.loads(data)
        assert (server.faults_injected, server.endpoint.calls) == ({"malformed": 1}, 0)


def test_models_route_is_never_faulted():
    with _fault_server("500", rpm=60) as server:
        status, response, payload = raw(server, "GET", "/v1/models")
        assert status == 200 and payload["data"] and response.getheader("x-ratelimit-limit-requests") is None
        assert server.faults_injected == {"500": 0}


def _answer_with_retries(server: SimulatorServer, body: str) -> tuple[int, dict]:
    """(failed attempts, choices of the first parseable 200) for one request, retried as a client would."""
    for failures in range(100):
        try:
            status, _, data = post(server, body, timeout=5)
            if status == 200:
                return failures, json.loads(data)["choices"]
        except (ConnectionError, ValueError):
            pass
    raise AssertionError("no answer in 100 attempts")


def test_faults_hit_their_share_and_retries_get_the_fault_free_answers(server):
    config = ServerConfig(SIM, fault_rate=0.3, stall=0.01, fault_seed=7)
    bodies = [BODY.replace("The capital of France is", f"prompt {i}") for i in range(150)]
    with SimulatorServer(config) as flaky:
        results = [_answer_with_retries(flaky, body) for body in bodies]
    failures = sum(f for f, _ in results)
    attempts = failures + len(bodies)
    assert 0.2 < failures / attempts < 0.4
    assert sum(flaky.faults_injected.values()) == failures and set(flaky.faults_injected) == set(config.faults)
    assert all(flaky.faults_injected.values()), "every kind is drawn"
    assert flaky.endpoint.calls == len(bodies)
    assert [choices for _, choices in results] == [json.loads(post(server, body)[2])["choices"] for body in bodies]


def test_fault_draws_follow_the_seed():
    def kinds(seed):
        with SimulatorServer(ServerConfig(SIM, fault_rate=0.5, faults=("500", "429"), fault_seed=seed)) as s:
            return [post(s)[0] for _ in range(20)]
    assert kinds(3) == kinds(3) != kinds(4)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rpm": -1}, "rpm must be >= 0"),
        ({"tpm": float("inf")}, "tpm must be >= 0 and finite"),
        ({"stall": -0.5}, "stall must be >= 0"),
        ({"latency": -1}, "latency must be >= 0"),
        ({"fault_rate": 1.5}, "fault_rate must be between 0 and 1"),
        ({"fault_rate": float("nan")}, "fault_rate must be between 0 and 1"),
        ({"faults": ("500", "teapot")}, "unknown fault kind 'teapot'"),
        ({"faults": ("cut", "cut")}, "must not repeat"),
        ({"fault_rate": 0.1, "faults": ()}, "at least one fault kind"),
    ],
)
def test_config_validation(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerConfig(SIM, **settings)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fault-rate", "2"], "fault_rate must be between 0 and 1"),
        (["--faults", "500,bogus"], "unknown fault kind 'bogus'"),
        (["--rpm", "-5"], "rpm must be >= 0"),
    ],
)
def test_serve_rejects_bad_options_without_a_traceback(args, message):
    result = CliRunner().invoke(app, ["serve", "--port", "0", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
