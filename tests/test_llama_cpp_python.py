"""llama-cpp-python's OpenAI-compatible server: tokens named by text only.

Offline, through a MockWire answering in the shape the real server answers (llama_cpp/llama.py's
_create_completion, seen on 0.3.36): a text several tokens render as names none of them, a generated
token named so is WITHHELD, an answer left empty by an end-of-generation token is asked again with the
unnamed tokens pushed down. Then against a real server from the cache that
`scripts/build_llama_cpp_python.sh` fills (skipped with the reason when it is absent): the probe
describes it, `auto` extracts every token its text names alone, equal to the model's own distribution
(the engine's logits for the same tokens, computed in the venv without the server), and never gives a
value to a token whose text another token shares.
"""

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engines import model_path, require_llama_cpp_python, run_llama_cpp_python
from logprob_cli.endpoints._base import WITHHELD, EndpointFatal, EndpointUnsuitable, Prompt, Query
from logprob_cli.endpoints._openai_compatible import LLAMA_CPP_PYTHON, OpenAIEndpoint, _facts
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig, simulator_token_bytes
from logprob_cli.endpoints._transport import MockWire, RawResponse, RetryPolicy
from logprob_cli.endpoints._vocabulary import Vocabulary, load_vocabulary
from logprob_cli.server import ServerConfig, SimulatorServer

# ids: 0 "a", 1 "b", 2 " the", 3 and 4 lone UTF-8 lead bytes (both render as ""), 5 a control token (no bytes),
# 6 " " followed by a lone lead byte and 7 " " (both render as " "), 8 "c", 9 a 33-byte piece (rendered as ""
# by llama-cpp-python's 32-byte buffer), 10 its 32-byte prefix (fits, so it is named)
TOKENS = [b"a", b"b", b" the", b"\xe2", b"\xe2\x80", None, b" \xe2", b" ", b"c", b"-" * 33, b"-" * 32]
UNNAMED = {3, 4, 5, 6, 7, 9}


def small_vocabulary() -> Vocabulary:
    return Vocabulary("test:11", len(TOKENS), lambda i: TOKENS[i])


def completion(token: str | None, top: dict[str, float], logprob: float = -0.5) -> dict:
    """A legacy completion as llama-cpp-python 0.3.36 answers it (max_tokens 1); token None: the generated token
    ended the generation, so no token and no logprobs come back."""
    logprobs = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    if token is not None:
        logprobs = {"tokens": [token], "text_offset": [5], "token_logprobs": [logprob], "top_logprobs": [top]}
    return {
        "id": "cmpl-x", "object": "text_completion", "created": 1, "model": "m.gguf",
        "choices": [{"text": token or "", "index": 0, "logprobs": logprobs, "finish_reason": "length" if token else "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1 if token else 0, "total_tokens": 6},
    }


def endpoint(answers: list[dict]) -> tuple[OpenAIEndpoint, MockWire]:
    pending = list(answers)
    wire = MockWire(lambda request: RawResponse(200, {"content-type": "application/json"}, json.dumps(pending.pop(0)).encode()))
    made = OpenAIEndpoint(
        "m.gguf", small_vocabulary(), base_url="http://fixture.test/v1", api="completions", dialect=LLAMA_CPP_PYTHON,
        wire=wire, retry=RetryPolicy(first=0.01),
    )
    return made, wire


def ask(made: OpenAIEndpoint, query: Query):
    return asyncio.run(made.ask(Prompt("p", 1, "Hello"), query))


def test_models_owned_by_me_are_llama_cpp_python():
    facts = _facts([{"id": "/models/m.gguf", "object": "model", "owned_by": "me", "permissions": []}])
    assert facts == {"dialect": LLAMA_CPP_PYTHON, "served_model": "/models/m.gguf"}


def test_a_text_several_tokens_share_names_none_of_them():
    top = {"a": -0.5, " the": -1.2, "": -3.0, " ": -4.0, "b": -5.0, "c": -6.0, "-" * 32: -7.0}
    made, wire = endpoint([completion("a", top)])
    answer = ask(made, Query.make(top_logprobs=11))
    assert made.unnamed_tokens() == UNNAMED
    assert answer.sampled == 0 and answer.sampled_logprob == -0.5
    assert dict(zip(answer.top_ids, answer.top_logprobs)) == {0: -0.5, 2: -1.2, 1: -5.0, 8: -6.0, 10: -7.0}
    assert answer.top_logprobs == tuple(sorted(answer.top_logprobs, reverse=True))
    assert made.identity == {"strings"}
    assert json.loads(wire.requests[0].body)["logprobs"] == 11


def test_a_generated_token_named_by_a_shared_text_is_withheld():
    made, _ = endpoint([completion(" ", {" ": -0.1, "a": -2.0}, logprob=-0.1)])
    answer = ask(made, Query.make(top_logprobs=2))
    assert answer.sampled == WITHHELD and answer.sampled_logprob is None
    assert answer.top_ids == (0,) and answer.top_logprobs == (-2.0,)


def test_an_answer_ended_by_an_end_token_is_asked_again_with_the_unnamed_tokens_down():
    made, wire = endpoint([completion(None, {}), completion("a", {"a": -1.5, "b": -2.5}, logprob=-1.5)])
    answer = ask(made, Query.make(top_logprobs=2))
    again = json.loads(wire.requests[1].body)
    assert again["logit_bias"] == {str(i): -100 for i in sorted(UNNAMED)}
    assert answer.sampled == WITHHELD and answer.top_ids == (0, 1) and answer.top_logprobs == (-1.5, -2.5)
    assert answer.prompt_tokens == 10


def test_the_vocabulary_check_forces_a_token_the_server_can_name():
    """The check biases a token a third into the vocabulary: 3 there, unnamed, so the first named one after it (8)."""
    made, wire = endpoint([completion(" ", {" ": -0.1, "a": -2.0}, logprob=-0.1), completion("c", {" ": -0.1}, logprob=-6.0)])
    assert asyncio.run(made.verify_mapping(Prompt("p", 1, "Hello"))) == "verified"
    assert json.loads(wire.requests[1].body)["logit_bias"] == {"8": 100, "10": -100}


def test_a_text_splits_through_the_servers_tokenizer_without_its_bos():
    made, wire = endpoint([{"tokens": [5, 2, 0]}, {"tokens": [5, 1]}])
    assert asyncio.run(made.split_text(" thea")) == (2, 0)
    assert wire.requests[0].url == "http://fixture.test/extras/tokenize"
    assert json.loads(wire.requests[0].body) == {"model": "m.gguf", "input": " thea"}
    with pytest.raises(EndpointUnsuitable, match="does not give back the bytes"):
        asyncio.run(made.split_text("a"))  # the server split it into "b": not the text


def test_a_text_no_token_renders_as_means_the_wrong_vocabulary():
    made, _ = endpoint([completion("a", {"a": -0.5, "zebra": -3.0})])
    with pytest.raises(EndpointFatal, match="'zebra'.*GGUF file the server loaded"):
        ask(made, Query.make(top_logprobs=2))


def test_a_gguf_vocabulary_has_each_tokens_bytes():
    path = model_path("tiny")
    if path is None:
        pytest.skip("the tiny model is not cached: run scripts/build_llama_server.sh")
    vocabulary = load_vocabulary(str(path))
    assert vocabulary.size == 459
    assert [vocabulary.token_bytes(i) for i in (0, 65, 255)] == [b"\x00", b"A", b"\xff"]  # byte tokens: id = byte value
    assert [vocabulary.token_bytes(i) for i in (456, 457, 458)] == [None, None, None]  # the three control tokens


# ---------------------------------------------------------------- the simulator speaking its dialect

SIM_VOCAB = 1000


def served_text(i: int) -> str:
    """A simulator token's text as the emulation (and llama-cpp-python) renders it: lone bytes 0x80-0xFF as ""."""
    return simulator_token_bytes(i).decode("utf-8", errors="ignore")


def test_the_emulation_merges_as_the_real_server_does():
    """A shared text holds the last (lowest) of its tokens' values, then the generated token's own."""
    sim = SimulatorConfig(vocab_size=SIM_VOCAB)
    with SimulatorServer(ServerConfig(sim, dialect=LLAMA_CPP_PYTHON)) as server:
        models = json.load(urllib.request.urlopen(f"{server.url}/models"))
        bias = {"200": 100}  # lone byte 0xC8: generated, its text "" shared with every lone byte above 0x7F
        body = {"prompt": "The capital", "max_tokens": 1, "temperature": 0, "logprobs": SIM_VOCAB, "logit_bias": bias}
        request = urllib.request.Request(f"{server.url}/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        logprobs = json.load(urllib.request.urlopen(request))["choices"][0]["logprobs"]
    assert models["data"][0]["owned_by"] == "me"
    truth = SimulatedEndpoint(sim).true_logprobs(Prompt("p", 1, "The capital"))
    top = logprobs["top_logprobs"][0]
    assert logprobs["tokens"] == [""] and top[""] == logprobs["token_logprobs"][0] == pytest.approx(truth[200], abs=1e-6)
    assert top["a"] == pytest.approx(truth[ord("a")], abs=1e-6)
    assert len(top) == len({served_text(i) for i in range(SIM_VOCAB)})


def test_probe_and_auto_through_the_emulation(tmp_path):
    sim = SimulatorConfig(vocab_size=SIM_VOCAB)
    unnamed = [i for i in range(SIM_VOCAB) if [served_text(j) for j in range(SIM_VOCAB)].count(served_text(i)) > 1]
    assert len(unnamed) == 128  # the lone bytes 0x80-0xFF
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "The capital of France is"}) + "\n")
    with SimulatorServer(ServerConfig(sim, dialect=LLAMA_CPP_PYTHON)) as server:
        where = ("--model", "simulator", "--base-url", server.url, "--api", "completions")
        refused = logprobs("probe", *where)
        assert refused.returncode == 2 and "--tokenizer" in refused.stderr and "GGUF" in refused.stderr
        run = logprobs("probe", *where, "--tokenizer", f"simulator:{SIM_VOCAB}", "--json")
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["whole_vocabulary"] and report["unnamed_tokens"] == 128 and report["recommended"] == "direct"
        assert report["identity"] == ["strings"] and not report["logprobs_after_bias"] and report["bias_steers_sampling"]
        run = logprobs("extract", prompts, *where, "--tokenizer", f"simulator:{SIM_VOCAB}", "-q")
        assert run.returncode == 0, run.stderr
    (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
    got = np.array([np.nan if v is None else v for v in row["logprobs"]], dtype=float)
    truth = SimulatedEndpoint(sim).true_logprobs(Prompt("p", 1, "The capital of France is"))
    named = np.setdiff1d(np.arange(SIM_VOCAB), unnamed)
    assert row["method"] == "direct" and np.isnan(got[unnamed]).all()
    assert np.abs(got[named] - truth[named]).max() < 1e-5


# ---------------------------------------------------------------- against a real llama-cpp-python server

TEXTS = ["The capital of France is", "1, 2, 3, 4,"]

# The model's own distribution after `text`: the engine's logits for the tokens its server would send (the text
# tokenized with BOS, special tokens parsed), computed in the venv by llama_cpp itself, as a vector by id.
REFERENCE = """
import json, sys
import numpy as np
from llama_cpp import Llama
model, texts = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=model, n_ctx=2048, n_threads=int(sys.argv[3]), logits_all=True, verbose=False)
out = []
for text in texts:
    llm.reset()
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    llm.eval(tokens)
    out.append(Llama.logits_to_logprobs(np.array(llm.scores[len(tokens) - 1], dtype=np.float32)).tolist())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def smollm2():
    """(base URL of llama-cpp-python's server with SmolLM2, the model's own distributions after TEXTS)."""
    python, model = require_llama_cpp_python("smollm2")
    threads = os.environ.get("LOGPROB_CLI_LLAMA_THREADS", "2")
    reference = subprocess.run([str(python), "-c", REFERENCE, str(model), json.dumps(TEXTS), threads],
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    truths = [np.array(v, dtype=float) for v in json.loads(reference.stdout)]
    with run_llama_cpp_python(model) as base_url:
        yield base_url, truths


def logprobs(*args):
    return subprocess.run([sys.executable, "-m", "logprob_cli.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OPENAI_API_KEY": "unused"})


def smollm2_unnamed() -> set[int]:
    """SmolLM2's tokens whose text, as llama-cpp-python renders it (no text for control tokens and for pieces over
    32 bytes, invalid UTF-8 dropped), is empty or another token's too."""
    vocabulary = load_vocabulary(str(model_path("smollm2")))
    texts: dict[str, list[int]] = {}
    for i in range(vocabulary.size):
        data = vocabulary.token_bytes(i)
        shown = data is not None and len(data) <= 32
        texts.setdefault(data.decode("utf-8", errors="ignore") if shown else "", []).append(i)
    return {i for text, ids in texts.items() for i in ids if len(ids) > 1 or text == ""}


def test_probe_says_what_llama_cpp_python_gives_and_cannot(smollm2):
    base_url, _ = smollm2
    run = logprobs("probe", "--model", "smollm2", "--base-url", f"{base_url}/v1", "--api", "completions", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["vocab_size"] == 49152 and report["whole_vocabulary"]
    assert report["unnamed_tokens"] == len(smollm2_unnamed()) == 380
    assert report["identity"] == ["strings"]
    assert report["bias_steers_sampling"] and not report["logprobs_after_bias"]
    assert report["forced_logprob"] == "reported"
    assert report["recommended"] == "direct" and report["estimated_calls"] == 1
    table = logprobs("probe", "--model", "smollm2", "--base-url", f"{base_url}/v1", "--api", "completions")
    assert table.returncode == 0, table.stderr
    assert "tokens it cannot name" in table.stdout and "380 of 49,152" in table.stdout


def test_auto_extracts_every_named_token_exactly_and_no_other(smollm2, tmp_path):
    base_url, truths = smollm2
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    run = logprobs("extract", prompts, "--model", "smollm2", "--base-url", f"{base_url}/v1", "--api", "completions", "-q")
    assert run.returncode == 0, run.stderr
    unnamed = sorted(smollm2_unnamed())
    named = np.setdiff1d(np.arange(49152), unnamed)
    for row, truth in zip(pq.read_table(tmp_path / "p.parquet").to_pylist(), truths):
        assert row["method"] == "direct" and row["calls"] == 1
        got = np.array([np.nan if v is None else v for v in row["logprobs"]], dtype=float)
        assert np.isnan(got[unnamed]).all()  # never a value for a token whose text another token shares
        assert not np.isnan(got[named]).any()
        mask = truth[named] > np.log(1e-6)
        assert mask.sum() > 10
        assert np.abs(got[named][mask] - truth[named][mask]).max() < 1e-3
    # After "1, 2, 3, 4," the model's own greedy token is " " (id 216, p = 0.91), whose text " \xc3" and other
    # tokens share: the server's " " entry holds the generated token's value, yet no token may be given it.
    greedy = int(np.argmax(truths[1]))
    assert greedy in unnamed and np.exp(truths[1][greedy]) > 0.5


def test_tiny_model_greedy_token_it_cannot_name_on_either_api(tmp_path):
    """On the tiny model the greedy token after the probe's prompt is a lone byte whose text ("") others share:
    the probe still reads the whole vocabulary from that answer, and the chat API extracts as the completions one."""
    _, model = require_llama_cpp_python("tiny")
    tiny = load_vocabulary(str(model))
    with run_llama_cpp_python(model) as base_url:
        body = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0, "logprobs": 1}
        request = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            generated = json.load(response)["choices"][0]["logprobs"]["tokens"][0]
        rendered = [(tiny.token_bytes(i) or b"").decode("utf-8", errors="ignore") for i in range(tiny.size)]
        assert rendered.count(generated) > 1
        run = logprobs("probe", "--model", "tiny", "--base-url", f"{base_url}/v1", "--api", "completions", "--json")
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["whole_vocabulary"] and report["recommended"] == "direct" and report["unnamed_tokens"] == 146
        prompts = tmp_path / "p.jsonl"
        prompts.write_text(json.dumps({"prompt": "The capital of France is"}) + "\n"
                           + json.dumps({"messages": [{"role": "user", "content": "Hello"}]}) + "\n")
        run = logprobs("extract", prompts, "--model", "tiny", "--base-url", f"{base_url}/v1", "-q")
        assert run.returncode == 0, run.stderr
        chosen = tmp_path / "chosen.parquet"
        run = logprobs("extract", prompts, "-o", chosen, "--model", "tiny", "--base-url", f"{base_url}/v1",
                       "--target", " of", "--target-id", "456", "-q")  # a text the server splits, an unnamed id
        assert run.returncode == 0, run.stderr
    for row in pq.read_table(tmp_path / "p.parquet").to_pylist():
        assert row["method"] == "direct" and row["calls"] == 1 and row["unrecovered_count"] == 146
    for row in pq.read_table(chosen).to_pylist():
        named, unnamed = row["targets"]
        assert tiny.token_bytes(named["token_id"]) == b" of" and unnamed["token_id"] == 456
        assert named["logprob"] is not None and unnamed["logprob"] is None and unnamed["upper_bound"] is None
