"""Several choices drawn a request (OpenAI's `n`) over HTTP: the served simulator draws them, OpenAIEndpoint maps
each choice's token by its bytes, the probe confirms the endpoint's declared cap, and a run with chosen tokens on
OpenAI's contract spends what `estimate` says, calls and generated tokens, with values within eps of the truth."""

from __future__ import annotations

import asyncio
import json
import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import BilledEndpoint
from logprob_cli.cli import app
from logprob_cli.endpoints import Prompt, Query
from logprob_cli.endpoints._factory import EndpointSettings, SettingsError, build_endpoint
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._vocabulary import load_vocabulary
from logprob_cli.methods import _draws as draws
from logprob_cli.run._estimate import estimate_run
from logprob_cli.run._prices import Price
from logprob_cli.run._probe import expected_calls, probe
from logprob_cli.run._runner import extract_batch
from logprob_cli.server import ServerConfig, SimulatorServer

VOCAB = 5_000
OPENAI_N = SimulatorConfig(vocab_size=VOCAB, logprobs_after_bias=False, sampled_logprob="sentinel", max_draws=128)
TEXT = "Is the sky green? Answer:"
PROMPT = Prompt(id=0, line=1, prompt=TEXT)


def ask(endpoint: OpenAIEndpoint, *queries: Query):
    """The endpoint's answers to `queries` on PROMPT, in one event loop, its connections closed after."""

    async def asking():
        try:
            return [await endpoint.ask(PROMPT, query) for query in queries]
        finally:
            await endpoint.aclose()

    return asyncio.run(asking())


def endpoint_at(server: SimulatorServer, api: str = "chat", **settings) -> OpenAIEndpoint:
    return OpenAIEndpoint("simulator", load_vocabulary(f"simulator:{VOCAB}"), base_url=server.url, api_key="x", api=api, **settings)


@pytest.mark.parametrize("api, content", [("chat", [{"role": "user", "content": TEXT}]), ("completions", TEXT)])
def test_each_choice_comes_back_as_the_token_the_server_drew(api, content):
    """The served choices are the in-process simulator's draws for the same content and query, mapped by bytes."""
    query = Query.make({7: 5.0, 11: -3.0}, draws=32, temperature=1.5)
    with SimulatorServer(ServerConfig(OPENAI_N)) as server:
        (answer,) = ask(endpoint_at(server, api), query)
    drawn = SimulatedEndpoint(OPENAI_N).answer(content, query).drawn
    assert answer.drawn == drawn and len(set(drawn)) > 3
    assert answer.sampled == drawn[0] and answer.completion_tokens == 32


def test_a_server_refusing_n_is_asked_greedily_and_one_ignoring_it_draws_nothing():
    biased = Query.make({7: 100.0})
    query = Query.make(biased.bias_dict(), draws=16, temperature=1.0)
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=VOCAB))) as server:  # max_draws 1: n is a 400
        refused, greedy = ask(endpoint_at(server), query, biased)
        assert refused.drawn == () and refused == greedy and refused.sampled == 7
        ignoring = endpoint_at(server, extra_body={"n": 1})  # the request's n overridden: one choice comes back
        assert ask(ignoring, query)[0].drawn == ()


@pytest.mark.parametrize("max_draws", [128, 1])
def test_the_probe_confirms_draws_and_counts_the_call_either_way(max_draws):
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=VOCAB, max_draws=max_draws))) as server:
        declared = endpoint_at(server)  # OpenAI's dialect declares n up to 128
        report = asyncio.run(probe(declared, PROMPT))
        assert report.calls == expected_calls(report) == server.endpoint.calls
        assert report.limits().draws == max_draws
        row = dict(report.rows())["choices drawn a call (n)"]
        assert row == ("up to 128 at a temperature" if max_draws > 1 else report.unknown["draws"])
        assert max_draws > 1 or "ignores or refuses `n`" in row
        settings = EndpointSettings(model="simulator", base_url=server.url, api_key="x", tokenizer=f"simulator:{VOCAB}")
        told = build_endpoint(settings)
        assert told.limits.draws == max_draws  # the served simulator says its cap in GET /models


def test_chosen_tokens_on_openais_contract_with_n_cost_what_estimate_says(tmp_path):
    """3 targets a prompt ranked 50 or lower, as benchmarks/target_calls.py picks them: within eps of the truth, about 4
    calls a target beyond the probe, and the calls and generated tokens (billed by the server: one a choice) within
    10% of `estimate`'s (a fit to that benchmark; targets of very different depths cost up to 8% more, README)."""
    truth_of = SimulatedEndpoint(OPENAI_N)
    prompts = []
    for i in range(6):
        text = f"Question {i}: is the sky green? Answer:"
        order = np.argsort(-truth_of.true_logprobs([{"role": "user", "content": text}]))
        chosen = np.random.default_rng(i).choice(order[50:], 3, replace=False)
        prompts.append(Prompt(id=i, line=i + 1, prompt=text, targets=tuple(int(t) for t in chosen)))
    with SimulatorServer(ServerConfig(OPENAI_N)) as server:
        endpoint = BilledEndpoint("simulator", load_vocabulary(f"simulator:{VOCAB}"), base_url=server.url, api_key="x")
        report = asyncio.run(probe(endpoint, prompts[0]))
        (bill,) = estimate_run(prompts, endpoint, "auto", report=report)
        endpoint.billed_completion_tokens, before = 0, server.endpoint.calls
        summary = extract_batch(prompts, tmp_path / "out.parquet", endpoint, "auto", eps=1e-3)
        spent = server.endpoint.calls - before
    assert summary.finished == 6 and not summary.failures and bill.method == "bisection"
    assert abs(bill.calls - spent) <= 0.1 * spent, (bill.calls, spent)
    assert abs(bill.completion_tokens - endpoint.billed_completion_tokens) <= 0.1 * endpoint.billed_completion_tokens
    per_target = (spent - bill.overhead_calls - 2 * 6) / 18  # beside the token check, the probe and each prompt's 2
    assert per_target <= 5.0, per_target  # (its top-k and the bisection's check), as test_targets_methods counts
    for row, prompt in zip(pq.read_table(tmp_path / "out.parquet").to_pylist(), prompts):
        truth = truth_of.true_logprobs([{"role": "user", "content": prompt.prompt}])
        assert [t["token_id"] for t in row["targets"]] == list(prompt.targets)
        assert all(abs(t["logprob"] - truth[t["token_id"]]) <= 1e-3 for t in row["targets"])


def test_max_draws_caps_what_the_endpoint_declares():
    with SimulatorServer(ServerConfig(OPENAI_N)) as server:
        served = EndpointSettings(model="simulator", base_url=server.url, api_key="x", tokenizer=f"simulator:{VOCAB}")
        assert build_endpoint(served).limits.draws == 128
        assert build_endpoint(dataclasses.replace(served, max_draws=1)).limits.draws == 1
    assert build_endpoint(EndpointSettings(simulator=OPENAI_N, max_draws=64)).limits.draws == 64
    for wrong in (0, 2.5, True):
        with pytest.raises(SettingsError, match="max_draws must be a whole number"):
            build_endpoint(EndpointSettings(simulator=OPENAI_N, max_draws=wrong))


def test_extract_with_max_draws_1_calls_greedily_for_the_same_values(tmp_path):
    """--max-draws 1 (the cheaper choice on short prompts) spends greedy bisection's calls; both runs agree."""
    source = tmp_path / "p.jsonl"
    source.write_text('{"prompt": "Is the sky green? Answer:", "targets": [1000, 2000, 3000]}\n')
    sim = ["--sim", f"vocab_size={VOCAB}", "--sim", "logprobs_after_bias=false", "--sim", "sampled_logprob=sentinel",
           "--sim", "max_draws=128"]
    rows = {}
    for name, extra in (("drawn", []), ("greedy", ["--max-draws", "1"])):
        out = tmp_path / f"{name}.parquet"
        result = CliRunner().invoke(app, ["extract", str(source), *sim, *extra, "-o", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        (rows[name],) = pq.read_table(out).to_pylist()
    assert rows["drawn"]["calls"] < rows["greedy"]["calls"] - 10
    assert any("drew up to 128 choices" in note for note in rows["drawn"]["notes"])
    assert not any("drew" in note for note in rows["greedy"]["notes"])
    for drawn, greedy in zip(rows["drawn"]["targets"], rows["greedy"]["targets"]):
        assert abs(drawn["logprob"] - greedy["logprob"]) <= 1e-3


def test_estimate_shows_the_drawn_tokens_and_how_to_call_greedily(tmp_path):
    source = tmp_path / "p.jsonl"
    source.write_text('{"prompt": "Is the sky green? Answer:", "targets": [1000, 2000, 3000]}\n')
    sim = ["--sim", f"vocab_size={VOCAB}", "--sim", "logprobs_after_bias=false", "--sim", "sampled_logprob=sentinel",
           "--sim", "max_draws=128", "--json"]
    bills = {}
    for name, extra in (("drawn", []), ("greedy", ["--max-draws", "1"])):
        result = CliRunner().invoke(app, ["estimate", str(source), *sim, *extra])
        assert result.exit_code == 0, result.output
        (bills[name],) = json.loads(result.output)["rows"]
    drawn, greedy = bills["drawn"], bills["greedy"]
    assert drawn["calls"] < greedy["calls"] and greedy["completion_tokens"] == greedy["calls"]
    assert drawn["completion_tokens"] == drawn["calls"] + 127 * draws.calls(3, 1e-3)  # 128 a drawing call, 1 the rest
    shown = CliRunner().invoke(app, ["estimate", str(source), *sim[:-1]]).output
    assert "bisection draws up to 128 choices a call" in " ".join(shown.split()) and "--max-draws 1 calls greedily" in " ".join(shown.split())


def test_max_cost_reserves_a_completion_token_a_drawn_choice(tmp_path):
    """$1 a completion token, nothing for prompts: a run that draws 128 choices a call stops at --max-cost without
    passing it (a drawing call may bill 128 tokens, so it reserves 128 before it is sent)."""
    prompts = [Prompt(id=i, line=i + 1, prompt=f"Question {i}:", targets=(1000, 2000, 3000)) for i in range(3)]
    with SimulatorServer(ServerConfig(OPENAI_N)) as server:
        endpoint = BilledEndpoint("simulator", load_vocabulary(f"simulator:{VOCAB}"), base_url=server.url, api_key="x")
        summary = extract_batch(
            prompts, tmp_path / "out.parquet", endpoint, "bisection", price=Price(0.0, 1e6), max_cost=1500.0,
        )
    assert summary.budget_reached and "max_cost" in summary.budget_reached
    assert 1500 - 2 * 128 * 16 < endpoint.billed_completion_tokens <= 1500  # near the cap, never past it
