"""Each server's dialect, read from recorded exchanges: no sockets.

tests/fixtures/http/*.json hold one exchange each (request path and body, response status, headers
and body) with where it came from: recorded from llama-server (scripts/record_fixtures.py) or written
in the shape the vendor documents (OpenAI, vLLM; the URL is in the fixture's "source"). Each is fed
through OpenAIEndpoint by a MockWire: the endpoint must send the recorded request and read the answer
as the fixture's "expect" says (ids, logprobs, the -9999 sentinel as None, a withheld answer, usage).
"""

import asyncio
import json
from pathlib import Path

import pytest

from logprob_cli.endpoints._base import WITHHELD, EndpointFatal, Prompt, Query
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint, ask_server_facts
from logprob_cli.endpoints._transport import MockWire, RawResponse, Request, RetryPolicy
from logprob_cli.endpoints._vocabulary import load_vocabulary

FIXTURES = Path(__file__).parent / "fixtures" / "http"
BASE_URL = "http://fixture.test/v1"
ANSWERS = sorted(p.stem for p in FIXTURES.glob("*.json") if "query" in json.loads(p.read_text()))
MODEL_LISTS = sorted(p.stem for p in FIXTURES.glob("*.json") if "facts" in json.loads(p.read_text()))


def load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def recorded(fixture: dict) -> RawResponse:
    response = fixture["response"]
    return RawResponse(response["status"], response["headers"], json.dumps(response["body"]).encode())


def endpoint_for(fixture: dict, wire: MockWire) -> OpenAIEndpoint:
    return OpenAIEndpoint(
        fixture["request"]["body"]["model"], load_vocabulary(fixture["vocabulary"]), base_url=BASE_URL,
        api_key="test-key", api=fixture["query"]["api"], dialect=fixture["dialect"], wire=wire,
        retry=RetryPolicy(first=0.01),
    )


def ask(fixture: dict, wire: MockWire):
    query = fixture["query"]
    endpoint = endpoint_for(fixture, wire)
    bias = {int(i): b for i, b in query["bias"].items()}
    return asyncio.run(endpoint.ask(Prompt("p", 1, query["prompt"]), Query.make(bias, query["top_logprobs"])))


def test_there_are_fixtures_of_every_dialect():
    dialects = {load(name)["dialect"] for name in ANSWERS}
    assert dialects == {"openai", "vllm", "llama.cpp"}
    assert all(load(name)["source"] for name in ANSWERS + MODEL_LISTS)


@pytest.mark.parametrize("name", ANSWERS)
def test_the_endpoint_sends_the_recorded_request(name):
    fixture = load(name)
    wire = MockWire(lambda request: recorded(fixture))
    ask(fixture, wire)
    [request] = wire.requests
    assert request.method == fixture["request"]["method"]
    assert request.url == BASE_URL + fixture["request"]["path"]
    assert request.json() == fixture["request"]["body"]
    assert request.headers["Authorization"] == "Bearer test-key"


@pytest.mark.parametrize("name", ANSWERS)
def test_a_recorded_answer_reads_as_its_body_says(name):
    fixture = load(name)
    expect = fixture["expect"]
    answer = ask(fixture, MockWire(lambda request: recorded(fixture)))
    assert (answer.prompt_tokens, answer.completion_tokens) == (expect["prompt_tokens"], expect["completion_tokens"])
    if expect.get("withheld"):
        assert answer.sampled == WITHHELD and answer.sampled_logprob is None and answer.top_ids == ()
        return
    assert answer.sampled == expect["sampled"]
    assert answer.sampled_logprob == (None if expect["sampled_logprob"] is None else pytest.approx(expect["sampled_logprob"]))
    assert list(answer.top_ids) == expect["top_ids"]
    assert list(answer.top_logprobs) == pytest.approx(expect["top_logprobs"])


def test_the_sentinel_is_never_a_number():
    """OpenAI's documented -9999.0 for a forced token outside the top 20 is "not reported", not a logprob."""
    fixture = load("openai-chat-sentinel")
    assert fixture["response"]["body"]["choices"][0]["logprobs"]["content"][0]["logprob"] == -9999.0
    assert ask(fixture, MockWire(lambda request: recorded(fixture))).sampled_logprob is None


def test_a_server_error_is_retried_through_the_wire():
    """A 503 then the recorded answer: the transport's retry runs the same over the mock wire."""
    fixture = load("openai-chat")
    answers = iter([RawResponse(503, {"Content-Type": "application/json"}, b'{"error": {"message": "busy"}}'), recorded(fixture)])
    wire = MockWire(lambda request: next(answers))
    assert ask(fixture, wire).sampled == fixture["expect"]["sampled"]
    assert len(wire.requests) == 2


@pytest.mark.parametrize("name", MODEL_LISTS)
def test_server_facts_read_each_model_list(name):
    fixture = load(name)
    wire = MockWire(lambda request: recorded(fixture))
    assert asyncio.run(ask_server_facts(BASE_URL, "k", "m", wire=wire)) == fixture["facts"]
    [request] = wire.requests
    assert (request.method, request.url) == ("GET", BASE_URL + "/models")


def answered(status: int, body: bytes, content_type: str = "application/json"):
    def handler(request: Request) -> RawResponse:
        return RawResponse(status, {"Content-Type": content_type}, body)

    return MockWire(handler)


def test_server_facts_stop_at_a_refused_key():
    wire = answered(401, b'{"error": {"message": "Incorrect API key provided"}}')
    with pytest.raises(EndpointFatal, match="rejected the API key: Incorrect API key provided"):
        asyncio.run(ask_server_facts(BASE_URL, "k", "m", wire=wire))


def test_server_facts_stop_at_a_web_page():
    wire = answered(200, b"<!doctype html><html><title>Welcome</title></html>", "text/html")
    with pytest.raises(EndpointFatal, match="does not look like an OpenAI-compatible API .GET /models answered 200"):
        asyncio.run(ask_server_facts(BASE_URL, "k", "m", wire=wire))


@pytest.mark.parametrize("status", [404, 500])
def test_server_facts_say_nothing_for_a_missing_or_failing_model_list(status):
    """The completion requests will tell what is wrong; GET /models is asked once (no retry of a 500)."""
    wire = answered(status, b"<html><title>Not here</title></html>", "text/html")
    assert asyncio.run(ask_server_facts(BASE_URL, "k", "m", wire=wire)) == {}
    assert len(wire.requests) == 1
