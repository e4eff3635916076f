"""Every position of a text (issue 11, part 1): a prompt with a completion of n tokens gives n + 1 rows, each the
distribution after the prompt and exactly the completion's tokens before it, checked against ground truth."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engines import llama_server_fixture
from logprob_cli.endpoints import EndpointUnsuitable, Prompt, SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints._simulator import simulator_split, simulator_token_bytes
from logprob_cli.endpoints._transport import MockWire, RawResponse, RetryPolicy
from logprob_cli.endpoints._vocabulary import load_vocabulary, server_vocabulary
from logprob_cli.io import InputError, read_prompts
from logprob_cli.run import estimate_run, extract_batch
from logprob_cli.run._journal import prompt_key
from logprob_cli.run._outputs_guard import _row_keys
from logprob_cli.server import ServerConfig, SimulatorServer

VOCAB = 1000
WHOLE = SimulatorConfig(vocab_size=VOCAB, top_logprobs_cap=VOCAB)  # `direct` reads the whole vector in one call
COUNTER = Path(__file__).parent / "tools" / "counting_logprobs.py"


def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def run(prompts: list[Prompt], out: Path, endpoint, method: str = "direct", **settings):
    return extract_batch(prompts, out, endpoint, method, **settings)


def test_each_position_is_the_simulators_distribution_after_that_exact_token_context(tmp_path):
    sim = SimulatedEndpoint(WHOLE)
    ids = (300, 5, 999, 300)
    prompts = [Prompt("a", 1, "The capital of France is", completion_ids=ids), Prompt("b", 2, "Hello")]
    summary = run(prompts, tmp_path / "o.parquet", sim)
    assert summary.finished == 6 and not summary.failures
    rows = rows_of(tmp_path / "o.parquet")
    assert [(r["id"], r["position"]) for r in rows] == [("a", k) for k in range(5)] + [("b", 0)]
    for row in rows[:5]:
        k = row["position"]
        assert row["context_tokens"] == list(ids[:k])
        truth = sim.true_logprobs(["The capital of France is", *ids[:k]] if k else "The capital of France is")
        assert np.abs(np.array(row["logprobs"]) - truth).max() < 1e-5
        if k < len(ids):
            assert row["next_token_id"] == ids[k]
            assert row["next_token_logprob"] == pytest.approx(truth[ids[k]], abs=1e-5)
        else:
            assert row["next_token_id"] is None and row["next_token_logprob"] is None
    distinct = {tuple(np.round(r["logprobs"][:50], 4)) for r in rows[:5]}
    assert len(distinct) == 5, "each token context has its own distribution"
    assert rows[5]["position"] == 0 and rows[5]["next_token_id"] is None
    assert np.abs(np.array(rows[5]["logprobs"]) - sim.true_logprobs("Hello")).max() < 1e-5


def test_a_completion_given_as_text_is_split_by_its_bytes(tmp_path):
    sim = SimulatedEndpoint(WHOLE)
    text = " baba cabo!"
    run([Prompt(1, 1, "Say", completion=text)], tmp_path / "o.parquet", sim)
    rows = rows_of(tmp_path / "o.parquet")
    split = simulator_split(text, VOCAB)
    assert b"".join(simulator_token_bytes(i) for i in split) == text.encode()
    assert len(rows) == len(split) + 1
    assert rows[-1]["context_tokens"] == list(split)
    assert [r["next_token_id"] for r in rows] == [*split, None]


def test_chosen_tokens_compose_each_position_reads_its_targets_and_its_next_token(tmp_path):
    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB))
    ids = (400, 7)
    prompts = [Prompt("a", 1, "Pick one", targets=(" ba", 5), completion_ids=ids)]
    summary = run(prompts, tmp_path / "o.parquet", sim, method="auto")
    assert not summary.failures
    rows = rows_of(tmp_path / "o.parquet")
    assert len(rows) == 3 and "logprobs" not in rows[0]
    for row in rows:
        k = row["position"]
        truth = sim.true_logprobs(["Pick one", *ids[:k]] if k else "Pick one")
        targets = {t["token_id"]: t["logprob"] for t in row["targets"]}
        expected = [256 + 1, 5] + ([ids[k]] if k < len(ids) else [])  # " ba" is id 257, then the next token
        assert list(targets) == expected
        for token, value in targets.items():
            assert value == pytest.approx(truth[token], abs=1e-4)
        if k < len(ids):
            assert row["next_token_logprob"] == targets[ids[k]]


def counted_cli(*args, calls: Path):
    env = {**os.environ, "CALL_LOG": str(calls)}
    return subprocess.run([sys.executable, str(COUNTER), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_resumed_run_asks_nothing_again_for_finished_positions(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "prompt": "One", "completion": " baba ca"}) + "\n"
        + json.dumps({"id": "b", "prompt": "Two", "completion_ids": [3, 900]}) + "\n"
    )
    args = ["--sim", f"vocab_size={VOCAB}", "--method", "topk", "-q"]
    reference = tmp_path / "ref.parquet"
    done = counted_cli("extract", prompts, "-o", reference, *args, calls=tmp_path / "ref-calls")
    assert done.returncode == 0, done.stderr
    total = (tmp_path / "ref-calls").stat().st_size
    units = len(simulator_split(" baba ca", VOCAB)) + 1 + 3
    assert len(rows_of(reference)) == units and sum(r["calls"] for r in rows_of(reference)) == total

    out = tmp_path / "run.parquet"
    stopped = counted_cli("extract", prompts, "-o", out, *args, "--max-calls", total // 2, calls=tmp_path / "calls")
    assert stopped.returncode == 3, stopped.stderr  # the budget stopped it mid-run
    first = (tmp_path / "calls").stat().st_size
    finished = len(rows_of(out))
    assert first == total // 2 and 0 < finished < units
    resumed = counted_cli("extract", prompts, "-o", out, *args, calls=tmp_path / "calls")
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "calls").stat().st_size == total, "every answer journaled is replayed, none asked again"
    assert pq.read_table(out).equals(pq.read_table(reference))


def test_an_endpoint_without_token_context_is_refused_before_any_call(tmp_path):
    wire = MockWire(lambda request: pytest.fail("no request may be sent"))
    prompts = [Prompt("a", 1, "Hi", completion_ids=(1, 2))]
    for dialect, api in (("openai", "chat"), ("openai", "completions"), ("llama.cpp", "chat"), ("vllm", "chat")):
        endpoint = OpenAIEndpoint("m", load_vocabulary(f"simulator:{VOCAB}"), base_url="http://h/v1", dialect=dialect,
                                  api=api, wire=wire)
        with pytest.raises(EndpointUnsuitable, match='llama-server or vLLM with api="completions", or the built-in simulator'):
            run(prompts, tmp_path / "o.parquet", endpoint)
    assert not wire.requests and not (tmp_path / "o.parquet").exists()
    assert not (tmp_path / "o.checkpoint.sqlite").exists()


def test_llama_server_is_sent_the_text_then_the_context_ids():
    bodies = []

    def answer(request) -> RawResponse:
        bodies.append(request.json())
        choice = {"text": "x", "logprobs": {"content": [{"id": 3, "token": "x", "logprob": -0.5, "bytes": [120],
                                                         "top_logprobs": [{"id": 3, "token": "x", "logprob": -0.5,
                                                                           "bytes": [120]}]}]}}
        return RawResponse(200, {}, json.dumps({"choices": [choice]}).encode())

    endpoint = OpenAIEndpoint("tiny", server_vocabulary(459), base_url="http://h/v1", dialect="llama.cpp",
                              api="completions", wire=MockWire(answer), retry=RetryPolicy(attempts=1))
    from logprob_cli.endpoints import Query

    async def ask(prompt):
        try:
            return await endpoint.ask(prompt, Query.make(top_logprobs=1))
        finally:
            await endpoint.aclose()

    asyncio.run(ask(Prompt("a", 1, "The", position=2, context_ids=(17, 301))))
    asyncio.run(ask(Prompt("a", 1, "The", position=0)))
    assert bodies[0]["prompt"] == ["The", 17, 301]
    assert bodies[1]["prompt"] == "The"


def test_the_input_check_finds_every_completion_problem_with_its_line(tmp_path):
    lines = [
        {"prompt": "a", "completion": "x", "completion_ids": [1]},
        {"messages": [{"role": "user", "content": "hi"}], "completion": "x"},
        {"prompt": "a", "completion": ""},
        {"prompt": "a", "completion_ids": [1, -2]},
        {"prompt": "a", "completion_ids": "12"},
        {"prompt": "a", "completion": "fine", "position": 3},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(InputError) as error:
        read_prompts(path)
    problems = error.value.problems
    assert problems[0] == 'line 1: give either "completion" or "completion_ids", not both'
    assert problems[1].startswith("line 2: a completion needs a plain \"prompt\": exact positions cannot be guaranteed")
    assert problems[2].startswith('line 3: "completion" is empty')
    assert problems[3].startswith('line 4: "completion_ids"[1] must be a token id') and "got -2" in problems[3]
    assert problems[4] == 'line 5: "completion_ids" must be an array of token ids, got a string'
    assert 'the key "position" collides with the output column "position"' in problems[5]
    assert len(problems) == 6


def test_a_completion_id_outside_the_vocabulary_is_refused_before_any_call(tmp_path):
    sim = SimulatedEndpoint(WHOLE)
    with pytest.raises(InputError, match=r"line 4: completion id 1000 is outside the vocabulary \(ids 0 to 999\)"):
        run([Prompt("a", 4, "Hi", completion_ids=(1, VOCAB))], tmp_path / "o.parquet", sim)
    assert sim.calls == 0


def test_keys_without_positions_are_unchanged_and_a_positions_row_rebuilds_its_key(tmp_path):
    assert prompt_key(Prompt(1, 1, "The capital of France is")) == "e0d96bbbbbb9b4966794ec4c"  # pinned before
    assert prompt_key(Prompt(1, 1, "The capital of France is", completion_ids=(5,))) == "e0d96bbbbbb9b4966794ec4c"
    units = [Prompt(1, 1, "P", completion_ids=(5, 6), position=k, context_ids=(5, 6)[:k]) for k in range(3)]
    assert len({prompt_key(u) for u in units}) == 3
    run([Prompt(1, 1, "P", completion_ids=(5, 6))], tmp_path / "o.parquet", SimulatedEndpoint(WHOLE))
    assert [key for _, key in _row_keys(tmp_path / "o.parquet")] == [prompt_key(u) for u in units]


def test_the_served_simulator_takes_the_context_as_the_in_process_one_does(tmp_path):
    prompts = [Prompt("a", 1, "Served", completion_ids=(44, 700, 2))]
    with SimulatorServer(ServerConfig(WHOLE)) as server:
        endpoint = OpenAIEndpoint("simulator", load_vocabulary(f"simulator:{VOCAB}"), base_url=server.url,
                                  api="completions", mixed_prompts=True, limits=None)
        assert endpoint.token_context
        summary = run(prompts, tmp_path / "served.parquet", endpoint, method="topk", top_k=5)
        assert not summary.failures, summary.failures
    sim = SimulatedEndpoint(WHOLE)
    for row in rows_of(tmp_path / "served.parquet"):
        k = row["position"]
        truth = sim.true_logprobs(["Served", *(44, 700, 2)[:k]] if k else "Served")
        assert np.abs(np.array(row["logprobs"]) - truth).max() < 1e-4


def test_estimate_prices_n_plus_one_positions_a_completion():
    sim = SimulatedEndpoint(WHOLE)
    prompts = [Prompt("a", 1, "Hi", completion_ids=(1, 2, 3)), Prompt("b", 2, "Yo")]
    (row,) = estimate_run(prompts, sim, "direct")
    assert row.prompts == 5 and row.calls == 5


tiny_server = llama_server_fixture("tiny")


def test_llama_server_positions_match_its_own_whole_vocabulary_answer_for_the_mixed_prompt(tiny_server, tmp_path):
    def endpoint() -> OpenAIEndpoint:
        return OpenAIEndpoint("tiny", server_vocabulary(459), base_url=f"{tiny_server}/v1", dialect="llama.cpp",
                              api="completions")

    prompt = Prompt("a", 1, "The capital of France is", completion=" Paris, of")
    summary = run([prompt], tmp_path / "o.parquet", endpoint(), method="direct")
    assert not summary.failures, summary.failures
    rows = rows_of(tmp_path / "o.parquet")
    ids = tuple(rows[-1]["context_tokens"])
    assert len(ids) > 1 and len(rows) == len(ids) + 1
    assert all(row["calls"] == 1 for row in rows)
    held = asyncio.run(endpoint().withheld_tokens())  # a generated incomplete UTF-8 token withholds the answer
    for row in rows:
        k = row["position"]
        body = {"prompt": ["The capital of France is", *ids[:k]] if k else "The capital of France is",
                "max_tokens": 1, "temperature": 0, "logprobs": 459, "cache_prompt": False}
        content = llama_completion(tiny_server, body)
        if content is None:  # the server's logprobs are before the bias: pushing the held tokens down changes none
            content = llama_completion(tiny_server, {**body, "logit_bias": {str(i): -100 for i in held}})
        own = {entry["id"]: entry["logprob"] for entry in content["top_logprobs"]}
        mine = np.array(row["logprobs"])
        assert len(own) == 459
        assert max(abs(mine[i] - value) for i, value in own.items()) < 1e-3
        if k < len(ids):
            assert row["next_token_logprob"] == pytest.approx(own[ids[k]], abs=1e-3)


def llama_completion(base_url: str, body: dict) -> dict | None:
    """llama-server's own answer to a /v1/completions request: its logprob entry, None where it withheld it."""
    import urllib.request

    request = urllib.request.Request(f"{base_url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        logprobs = json.load(response)["choices"][0]["logprobs"]
    return None if logprobs is None else logprobs["content"][0]


def test_a_shard_without_completions_still_writes_positions_when_the_batch_has_them(tmp_path):
    batch = [Prompt("a", 1, "One", completion_ids=(1, 2)), Prompt("b", 2, "Two")]
    run([batch[1]], tmp_path / "o.parquet", SimulatedEndpoint(WHOLE), schema_prompts=batch)
    (row,) = rows_of(tmp_path / "o.parquet")
    assert (row["id"], row["position"], row["context_tokens"], row["next_token_id"]) == ("b", 0, [], None)


def test_inspect_names_each_row_by_its_id_and_position(tmp_path):
    from rich.console import Console

    from logprob_cli.io import render_inspect

    run([Prompt("a", 1, "One", completion_ids=(1, 2))], tmp_path / "o.parquet", SimulatedEndpoint(WHOLE))
    console = Console(record=True, width=80)
    render_inspect(tmp_path / "o.parquet", console)
    shown = console.export_text()
    assert "3 rows" in " ".join(shown.split())  # the header wraps where the temporary path is long
    assert [line.split()[:2] for line in shown.splitlines() if line.lstrip().startswith("a @")] == [
        ["a", "@0"], ["a", "@1"], ["a", "@2"]
    ]
