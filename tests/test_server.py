"""The simulator over HTTP: the openai client sees what SimulatedEndpoint.answer says, in OpenAI's formats."""

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest

from logprob_cli.endpoint import Query
from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.simulator import SimulatedEndpoint, SimulatorConfig, simulator_token_bytes

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


def test_legacy_top_logprobs_merge_tokens_with_the_same_string(client):
    # Ids 200 and 201 are lone bytes that are not valid UTF-8: both read "\ufffd".
    bias = {"200": 100, "201": 90}
    response = client.completions.create(model="simulator", prompt=PROMPT, max_tokens=1, logprobs=5, logit_bias=bias)
    expected = SimulatedEndpoint(SIM).answer(PROMPT, Query.make({200: 100, 201: 90}, top_logprobs=5))
    assert expected.top_ids[:2] == (200, 201)
    (top,) = response.choices[0].logprobs.top_logprobs
    assert len(top) == 4 and top["\ufffd"] == expected.top_logprobs[0]


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
        (_chat_error(n=2), openai.BadRequestError, 400, "only n=1"),
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
