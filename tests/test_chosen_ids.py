"""Chosen token ids at the endpoint (issue 10): Query.token_ids, the endpoints that take them (the simulator
in process, vLLM's logprob_token_ids through its served emulation), the ones that refuse them, and how a
text resolves to token ids (split_text / token_text) on the simulator, tiktoken, llama-server and vLLM."""

import asyncio
import json

import numpy as np
import pytest

from engines import llama_server_fixture
from logprob_cli.endpoints import (
    EndpointRejected, EndpointUnsuitable, Prompt, Query, SimulatedEndpoint, SimulatorConfig, simulator_token_bytes,
)
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints._transport import MockWire, RawResponse, RetryPolicy
from logprob_cli.endpoints._vocabulary import load_vocabulary, server_vocabulary
from logprob_cli.server import ServerConfig, SimulatorServer

VOCAB = 1000
TEXT = "The capital of France is"
CHAT = [{"role": "user", "content": TEXT}]

tiny_server = llama_server_fixture("tiny")


def far_ids(sim: SimulatedEndpoint, content, ranks=(25, 400, 990)) -> list[int]:
    """Ids at these ranks of the simulator's unbiased distribution (far outside any top 20)."""
    order = np.argsort(-sim.true_logprobs(content), kind="stable")
    return [int(order[r]) for r in ranks]


def whole_top(config: SimulatorConfig, content, bias=None) -> dict[int, float]:
    """What the simulator reports for every id as its top-k (a cap of the whole vocabulary)."""
    sim = SimulatedEndpoint(SimulatorConfig(**{**config.__dict__, "top_logprobs_cap": config.vocab_size}))
    return sim.answer(content, Query.make(bias, config.vocab_size)).top()


# --- Query ----------------------------------------------------------------------------------------


def test_a_query_without_token_ids_keeps_the_key_journals_were_written_with():
    """Digests computed before token_ids existed: a checkpoint from then must still replay."""
    assert Query.make({5: 2.5, 1: -100.0}, top_logprobs=20).key().hex() == "790ff9224b3b08c668e47eea6f56134e"
    assert Query.make().key().hex() == "11d2df4e979aa105cf552e9544ebd2b5"


def test_token_ids_are_sorted_distinct_and_change_the_key():
    query = Query.make({7: 1.0}, 5, token_ids=[30, 4, 30, 12])
    assert query.token_ids == (4, 12, 30)
    assert query == Query.make({7: 1.0}, 5, token_ids=(12, 30, 4))
    assert query.key() == Query.make({7: 1.0}, 5, token_ids=(12, 30, 4)).key()
    plain = Query.make({7: 1.0}, 5)
    assert len({plain.key(), query.key(), Query.make({7: 1.0}, 5, token_ids=[4, 12]).key()}) == 3


# --- the simulator in process -----------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_simulator_lists_chosen_ids_after_its_top_k_with_its_own_values(precision):
    config = SimulatorConfig(vocab_size=VOCAB, chosen_ids=8, precision=precision)
    sim = SimulatedEndpoint(config)
    ids = far_ids(sim, TEXT)
    top5 = sim.answer(TEXT, Query.make(top_logprobs=5))
    answer = sim.answer(TEXT, Query.make(top_logprobs=5, token_ids=[*ids, top5.top_ids[1]]))
    # the top-k as before, then the chosen ids not already in it, in id order, each once
    assert answer.top_ids == top5.top_ids + tuple(sorted(ids))
    whole = whole_top(config, TEXT)
    assert answer.top() == {i: whole[i] for i in answer.top_ids}  # the very float32 (bfloat16) numbers
    truth = sim.true_logprobs(TEXT)
    assert max(abs(answer.top()[i] - truth[i]) for i in ids) < (1e-4 if precision == "float32" else 0.2)


def test_chosen_ids_after_a_bias_are_the_biased_values_where_logprobs_follow_the_bias():
    config = SimulatorConfig(vocab_size=VOCAB, chosen_ids=4, logprobs_after_bias=True)
    sim = SimulatedEndpoint(config)
    ids = far_ids(sim, TEXT)
    bias = {ids[0]: 30.0}
    answer = sim.answer(TEXT, Query.make(bias, 0, token_ids=ids))
    assert answer.top_ids == tuple(sorted(ids))
    whole = whole_top(config, TEXT, bias)
    assert answer.top() == {i: whole[i] for i in ids}


def test_the_default_simulator_takes_no_token_ids_and_describes_itself_as_before():
    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB))
    assert sim.limits.token_ids == 0
    with pytest.raises(EndpointRejected, match="chosen ids"):
        sim.answer(TEXT, Query.make(token_ids=[3]))
    assert "chosen_ids" not in sim.describe().to_dict()
    assert SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB, chosen_ids=2)).describe().to_dict()["chosen_ids"] == 2
    assert sim.calls == 0


def test_the_simulator_refuses_too_many_ids_and_ids_outside_its_vocabulary():
    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB, chosen_ids=2))
    with pytest.raises(EndpointRejected, match="at most 2 ids"):
        sim.answer(TEXT, Query.make(token_ids=[1, 2, 3]))
    with pytest.raises(EndpointRejected, match="outside the vocabulary"):
        sim.answer(TEXT, Query.make(token_ids=[VOCAB]))
    with pytest.raises(ValueError, match="chosen_ids"):
        SimulatorConfig(chosen_ids=-1)


# --- vLLM's logprob_token_ids through the served emulation ---------------------------------------------


def vllm_endpoint(server: SimulatorServer, api: str = "chat") -> OpenAIEndpoint:
    return OpenAIEndpoint(
        "simulator", load_vocabulary(f"simulator:{VOCAB}"), base_url=server.url, dialect="vllm", api=api,
        extra_body={"return_tokens_as_token_ids": True}, retry=RetryPolicy(attempts=1),
    )


def ask(endpoint: OpenAIEndpoint, prompt: Prompt, query: Query):
    async def run():
        try:
            return await endpoint.ask(prompt, query)
        finally:
            await endpoint.aclose()
    return asyncio.run(run())


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("api", ["chat", "completions"])
def test_vllm_returns_chosen_ids_far_outside_the_top_20_with_the_simulators_values(raw, api):
    """Either API (vLLM 0.32's completions take logprob_token_ids too)."""
    sim_config = SimulatorConfig(vocab_size=VOCAB, logprobs_after_bias=not raw)
    truth = SimulatedEndpoint(sim_config)
    content = CHAT if api == "chat" else TEXT
    ids = far_ids(truth, content)
    bias = {ids[1]: 5.0}
    with SimulatorServer(ServerConfig(sim_config, dialect="vllm")) as server:
        endpoint = vllm_endpoint(server, api)
        assert endpoint.limits.token_ids == 128 and not endpoint.limits.top_with_token_ids
        prompt = Prompt(1, 1, messages=CHAT) if api == "chat" else Prompt(1, 1, prompt=TEXT)
        answer = ask(endpoint, prompt, Query.make(bias, 0, token_ids=ids))
    assert answer.top_ids == tuple(sorted(ids))
    whole = whole_top(sim_config, content, bias)
    assert answer.top() == pytest.approx({i: whole[i] for i in ids}, abs=0, rel=1e-12)
    assert "ids" in endpoint.identity


def post(server: SimulatorServer, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(f"{server.url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def test_the_vllm_emulation_lists_the_generated_token_then_the_ids_as_asked_in_place_of_the_top_k():
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=VOCAB), dialect="vllm")) as server:
        body = {"model": "simulator", "messages": CHAT, "max_tokens": 1, "logprobs": True, "top_logprobs": 5,
                "logprob_token_ids": [900, 3, 900], "return_tokens_as_token_ids": True}
        entry = post(server, body)["choices"][0]["logprobs"]["content"][0]
        sampled = entry["token"]
        assert [t["token"] for t in entry["top_logprobs"]] == [sampled, "token_id:900", "token_id:3"]
        without = {key: value for key, value in body.items() if key not in ("logprobs", "top_logprobs")}
        assert post(server, without)["choices"][0]["logprobs"] is None  # logprobs: true is still needed


def test_vllm_refuses_a_top_k_beside_token_ids_and_too_many_ids_before_any_request():
    wire = MockWire(lambda request: pytest.fail("no request may be sent"))
    endpoint = OpenAIEndpoint("m", load_vocabulary(f"simulator:{VOCAB}"), dialect="vllm", base_url="http://h/v1",
                              wire=wire)
    prompt = Prompt(1, 1, prompt=TEXT)
    with pytest.raises(EndpointRejected, match="top_logprobs 0"):
        ask(endpoint, prompt, Query.make(top_logprobs=5, token_ids=[3]))
    with pytest.raises(EndpointRejected, match="at most 128"):
        ask(endpoint, prompt, Query.make(token_ids=range(129)))
    assert wire.requests == []


@pytest.mark.parametrize("dialect, api, vocabulary", [
    ("openai", "chat", "o200k_base"), ("openai", "completions", "o200k_base"),
    ("llama.cpp", "chat", None),
])
def test_other_dialects_refuse_token_ids_before_any_request(dialect, api, vocabulary):
    wire = MockWire(lambda request: pytest.fail("no request may be sent"))
    vocab = load_vocabulary(vocabulary) if vocabulary else server_vocabulary(459)
    endpoint = OpenAIEndpoint("m", vocab, dialect=dialect, api=api, base_url="http://h/v1", wire=wire)
    assert endpoint.limits.token_ids == 0
    with pytest.raises(EndpointRejected, match="cannot return the logprobs of chosen ids"):
        ask(endpoint, Prompt(1, 1, prompt=TEXT), Query.make(token_ids=[3]))
    assert wire.requests == []


# --- split_text / token_text -------------------------------------------------------------------------


def split(endpoint, text: str) -> tuple[int, ...]:
    async def run():
        try:
            return await endpoint.split_text(text)
        finally:
            await endpoint.aclose()
    return asyncio.run(run())


def test_the_simulator_splits_text_by_bytes_and_names_its_tokens():
    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB))
    assert simulator_token_bytes(256) == b"ba" and simulator_token_bytes(257) == b" ba"
    assert split(sim, "ba") == (256,) and split(sim, " ba") == (257,)  # the leading space is its own token
    assert sim.token_text(257) == " ba" and sim.token_text(65) == "A" and sim.token_text(0xC3) == "\ufffd"
    two = split(sim, " baba ca")
    assert len(two) == 2 and b"".join(map(simulator_token_bytes, two)) == b" baba ca"
    assert split(sim, "Ab") == (65, 98)  # no word token: one id a byte
    assert split(sim, "é") == (0xC3, 0xA9)
    assert sim.token_text(VOCAB) == f"#{VOCAB}"


def test_tiktoken_vocabularies_split_as_openai_tokenizes():
    endpoint = OpenAIEndpoint("gpt-4o", load_vocabulary("o200k_base"), wire=MockWire(lambda r: pytest.fail()))
    assert split(endpoint, " Yes") == (11377,) and split(endpoint, "Yes") == (13022,)
    assert endpoint.token_text(11377) == " Yes"
    assert len(split(endpoint, "<|endoftext|>")) > 1  # special-token text is plain text, no special token


def test_an_endpoint_without_a_tokenizer_asks_for_ids():
    endpoint = OpenAIEndpoint("m", server_vocabulary(459), base_url="http://h/v1", wire=MockWire(lambda r: pytest.fail()))
    with pytest.raises(EndpointUnsuitable, match="give token ids"):
        split(endpoint, " Yes")
    assert endpoint.token_text(5) == "#5"


# recorded from llama-server 0.3.36 with tests/engines.py's tiny model (see test_llama_server_tokenize_live)
LLAMA_TOKENIZE = {"The": [[84, "T"], [257, "he"]], "é": [[292, "é"]]}


def llama_tokenize(request) -> RawResponse:
    body = request.json()
    pieces = LLAMA_TOKENIZE.get(body["content"], [[32, " "], [84, "T"]])  # else a split that adds a space
    return RawResponse(200, {}, json.dumps({"tokens": [{"id": i, "piece": p} for i, p in pieces]}).encode())


def test_llama_server_splits_through_its_tokenize_beside_v1():
    wire = MockWire(llama_tokenize)
    endpoint = OpenAIEndpoint("tiny", server_vocabulary(459), base_url="http://h:1/v1", dialect="llama.cpp", wire=wire)
    assert split(endpoint, "The") == (84, 257)
    assert split(endpoint, "é") == (292,)
    request = wire.requests[0]
    assert request.url == "http://h:1/tokenize"
    assert request.json() == {"content": "The", "add_special": False, "parse_special": False, "with_pieces": True}
    with pytest.raises(EndpointUnsuitable, match="does not give back the bytes"):
        split(endpoint, "T")  # pieces " " + "T" are not the text's bytes


def test_llama_server_tokenize_live(tiny_server):
    endpoint = OpenAIEndpoint("tiny", server_vocabulary(459), base_url=f"{tiny_server}/v1", dialect="llama.cpp")
    for text, pieces in LLAMA_TOKENIZE.items():
        assert split(endpoint, text) == tuple(i for i, _ in pieces)
    assert len(split(endpoint, " capital")) > 1


def test_vllm_splits_through_its_tokenize_checked_against_the_texts_bytes():
    simulator = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB))
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=VOCAB), dialect="vllm")) as server:
        assert split(vllm_endpoint(server), " ba") == (257,)
        assert split(vllm_endpoint(server), " baba ca") == split(simulator, " baba ca")
    wire = MockWire(lambda request: RawResponse(200, {}, json.dumps({"count": 2, "tokens": [32, 256]}).encode()))
    endpoint = OpenAIEndpoint("m", load_vocabulary(f"simulator:{VOCAB}"), base_url="http://h/v1", dialect="vllm",
                              wire=wire)
    with pytest.raises(EndpointUnsuitable, match="does not give back the bytes"):
        split(endpoint, "ba")  # " " + "ba": a tokenizer that added a space
    assert wire.requests[0].url == "http://h/tokenize"
    assert wire.requests[0].json() == {"model": "m", "prompt": "ba", "add_special_tokens": False}
