"""The OpenAI-compatible backend, end to end over HTTP against the simulator server."""

import asyncio
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from logprob_cli.endpoints._base import EndpointFatal, Prompt, Query
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatorConfig
from logprob_cli.endpoints._transport import RetryPolicy
from logprob_cli.endpoints._vocabulary import load_vocabulary

VOCAB = 3000
KEY = "sk-test-secret-123"


@pytest.fixture
def server():
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=VOCAB), api_key=KEY)) as running:
        yield running


def client(server, **kw):
    return OpenAIEndpoint("simulator", load_vocabulary(f"simulator:{VOCAB}"), base_url=server.url, api_key=KEY, retry=RetryPolicy(attempts=1), **kw)


def ask(endpoint, prompt, query):
    async def once():
        try:
            return await endpoint.ask(prompt, query)
        finally:
            await endpoint.aclose()

    return asyncio.run(once())


@pytest.mark.parametrize("token_ids", [False, True])
def test_answers_equal_the_simulator_over_http(token_ids):
    config = ServerConfig(SimulatorConfig(vocab_size=VOCAB, logprobs_after_bias=False), api_key=KEY, token_ids=token_ids)
    with SimulatorServer(config) as server:
        endpoint = client(server)
        prompt = Prompt(id=1, line=1, messages=[{"role": "user", "content": "hello"}])
        truth = server.endpoint.true_logprobs(prompt.messages)
        low = int(np.argsort(truth)[VOCAB // 2])
        for query in (Query.make(top_logprobs=20), Query.make({low: 100.0}, 5)):
            assert ask(endpoint, prompt, query) == server.endpoint.answer(prompt, query)
        assert endpoint.identity == ({"ids"} if token_ids else {"bytes"})


def test_plain_prompts_are_sent_as_a_user_message_after_the_system_prompt(server):
    endpoint = client(server, system="Be brief.")
    answer = ask(endpoint, Prompt(id=1, line=1, prompt="hi"), Query.make(top_logprobs=5))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert answer == server.endpoint.answer(messages, Query.make(top_logprobs=5))


def test_legacy_completions_map_strings_to_ids(server):
    endpoint = client(server, api="completions")
    answer = ask(endpoint, Prompt(id=1, line=1, prompt="hi"), Query.make(top_logprobs=5))
    reference = server.endpoint.answer("hi", Query.make(top_logprobs=5))
    assert answer.sampled == reference.sampled
    assert answer.top_ids == reference.top_ids
    assert endpoint.identity == {"strings"}


def test_wrong_key_unknown_model_and_down_server_are_fatal(server):
    prompt = Prompt(id=1, line=1, prompt="hi")
    vocabulary = load_vocabulary(f"simulator:{VOCAB}")
    bad_key = OpenAIEndpoint("simulator", vocabulary, base_url=server.url, api_key="wrong", retry=RetryPolicy(attempts=1))
    with pytest.raises(EndpointFatal, match="API key"):
        ask(bad_key, prompt, Query.make(top_logprobs=5))
    unknown = OpenAIEndpoint("gpt-nope", vocabulary, base_url=server.url, api_key=KEY, retry=RetryPolicy(attempts=1))
    with pytest.raises(EndpointFatal, match="gpt-nope"):
        ask(unknown, prompt, Query.make(top_logprobs=5))
    down = OpenAIEndpoint("simulator", vocabulary, base_url="http://127.0.0.1:9/v1", api_key=KEY, retry=RetryPolicy(attempts=1))
    with pytest.raises(EndpointFatal, match="cannot reach"):
        ask(down, prompt, Query.make(top_logprobs=5))
    assert "wrong" not in str(bad_key.describe()) and KEY not in str(client(server).describe())


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "logprob_cli.cli", *map(str, args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def test_extract_over_http_matches_ground_truth_and_keeps_the_key_secret(server, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "hello"}\n{"id": 2, "messages": [{"role": "user", "content": "hi"}]}\n')
    run = run_cli(
        "extract", prompts, "--model", "simulator", "--base-url", server.url, "--tokenizer", f"simulator:{VOCAB}",
        "--method", "exact", "-q", env={"OPENAI_API_KEY": KEY},
    )
    assert run.returncode == 0, run.stderr
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    contents = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "hi"}]]
    for row, content in zip(rows, contents):
        truth = server.endpoint.true_logprobs(content)
        assert np.abs(np.array(row["logprobs"]) - truth).max() < 1e-4
    for path in tmp_path.iterdir():
        assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path.name}"


def test_cli_errors_for_endpoints_are_one_line(server, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    common = ["--base-url", server.url, "--tokenizer", f"simulator:{VOCAB}", "-q"]
    wrong_key = run_cli("extract", prompts, "--model", "simulator", *common, "--api-key", "nope")
    assert wrong_key.returncode == 1 and "API key" in wrong_key.stderr and "Traceback" not in wrong_key.stderr
    unknown_tokenizer = run_cli("extract", prompts, "--model", "mystery-model", "--base-url", server.url, "--api-key", KEY)
    assert unknown_tokenizer.returncode == 2 and "--tokenizer" in unknown_tokenizer.stderr
    assert server.endpoint.calls == 0


def test_auto_on_an_endpoint_with_openais_contract_picks_bisection_and_matches(tmp_path):
    """Bytes, top-20 cap, pre-bias logprobs, -9999 for a forced token, bias that steers sampling."""
    contract = SimulatorConfig(vocab_size=1000, logprobs_after_bias=False, sampled_logprob="sentinel")
    with SimulatorServer(ServerConfig(contract, api_key=KEY)) as server:
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"prompt": "hello"}\n')
        run = run_cli(
            "extract", prompts, "--model", "simulator", "--base-url", server.url, "--tokenizer", "simulator:1000",
            "--eps", "1e-2", "-q", env={"OPENAI_API_KEY": KEY},
        )
        assert run.returncode == 0, run.stderr
        (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
        assert row["method"] == "bisection"
        truth = server.endpoint.true_logprobs([{"role": "user", "content": "hello"}])
        mask = truth > -20
        assert np.abs(np.array(row["logprobs"])[mask] - truth[mask]).max() < 1e-2


def test_a_vocabulary_that_is_not_the_models_is_caught_before_extracting(server, tmp_path):
    """The server's simulator has 3000 made-up words; cl100k_base maps their bytes to other ids."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    right = client(server)
    async def verify():
        try:
            return await right.verify_mapping(Prompt(id=1, line=1, prompt="hello"))
        finally:
            await right.aclose()

    assert asyncio.run(verify()) == "verified"
    run = run_cli("extract", prompts, "--model", "simulator", "--base-url", server.url, "--tokenizer", "cl100k_base",
                  "--api-key", KEY, "-q")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "--tokenizer" in run.stderr
    assert server.endpoint.calls <= 6


def test_legacy_completions_extract_the_full_vector_including_byte_tokens(server, tmp_path):
    """Legacy string keys: tokens that are not valid UTF-8 come back as "bytes:\\xNN" and still map to their ids."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    run = run_cli(
        "extract", prompts, "--model", "simulator", "--base-url", server.url, "--tokenizer", f"simulator:{VOCAB}",
        "--api", "completions", "--method", "topk", "-q", env={"OPENAI_API_KEY": KEY},
    )
    assert run.returncode == 0, run.stderr
    (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
    truth = server.endpoint.true_logprobs("hello")
    assert np.abs(np.array(row["logprobs"]) - truth).max() < 1e-4


def test_merged_legacy_entries_fail_the_answer_instead_of_shifting_values():
    """vLLM-style legacy logprobs key entries by text: two byte tokens that both read "\ufffd" collapse into one."""
    from logprob_cli.endpoints._base import EndpointError

    endpoint = OpenAIEndpoint("m", load_vocabulary("simulator:1000"), base_url="http://127.0.0.1:9/v1", api="completions")
    merged = {
        "choices": [{"logprobs": {"tokens": ["ba"], "token_logprobs": [-0.1],
                                   "top_logprobs": [{"ba": -0.1, "bytes:\\xc8": -2.0, "be": -3.0, "bi": -4.0}]}}],
    }
    with pytest.raises(EndpointError, match="merged distinct tokens"):
        endpoint._completion_answer(merged, requested=5)
    whole = endpoint._completion_answer(merged, requested=4)
    assert len(whole.top_ids) == 4 and whole.top_ids[1] == 200
