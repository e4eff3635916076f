"""`logprobs estimate` against what real runs spend, the price table, and the cost arithmetic."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import BilledEndpoint

from logprob_cli.cli import app
from logprob_cli.endpoints._base import EndpointUnsuitable, Prompt
from logprob_cli.run._estimate import duration, estimate_run
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.run._prices import Price, parse_price, price_for
from logprob_cli.run._probe import probe
from logprob_cli.run._runner import extract_batch
from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._vocabulary import load_vocabulary, tiktoken_encoding

COUNTER = Path(__file__).parent / "tools" / "counting_logprobs.py"
VOCAB = 2000
PROMPTS = [Prompt(id=i, line=i + 1, prompt=f"prompt number {i} " * (i + 1)) for i in range(2)]


def within(estimated: int, real: int, tolerance: float = 0.10) -> bool:
    return abs(estimated - real) <= tolerance * real


def real_run(tmp_path, endpoint, method, **settings) -> str:
    """Run extract_batch on PROMPTS; returns the method the run used (auto announces its pick)."""
    chosen = []
    summary = extract_batch(
        PROMPTS, tmp_path / "out.parquet", endpoint, method, announce=lambda name, report: chosen.append(name),
        **settings,
    )
    assert summary.finished == len(PROMPTS) and not summary.failures
    return chosen[0]


@pytest.mark.parametrize(
    "method, switches, settings",
    [
        ("topk", {}, {}),
        ("topk", {}, {"top_k": 5}),
        ("exact", {}, {}),
        ("exact", {}, {"top_k": 5}),
        ("forced", {"logprobs_after_bias": False}, {}),
        ("forced", {"logprobs_after_bias": False, "top_logprobs_cap": 5}, {}),
    ],
)
def test_counted_methods_cost_exactly_what_the_run_spends(tmp_path, method, switches, settings):
    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB, **switches))
    (bill,) = estimate_run(PROMPTS, endpoint, method, **settings)
    real_run(tmp_path, endpoint, method, **settings)
    assert bill.calls == endpoint.calls


@pytest.mark.parametrize("eps", [1e-2, 1e-4])  # 1e-3: auto picks bisection below
def test_bisection_estimate_within_ten_percent(tmp_path, eps):
    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB))
    (bill,) = estimate_run(PROMPTS, endpoint, "bisection", eps=eps)
    real_run(tmp_path, endpoint, "bisection", eps=eps)
    assert within(bill.calls, endpoint.calls), (bill.calls, endpoint.calls)


@pytest.mark.parametrize(
    "switches, picked",
    [
        ({}, "topk"),
        ({"top_logprobs_cap": 5}, "topk"),
        ({"logprobs_after_bias": False}, "forced"),
        ({"logprobs_after_bias": False, "sampled_logprob": "sentinel"}, "bisection"),
        ({"logprobs_after_bias": False, "bias_steers_sampling": False}, "visible"),
    ],
)
def test_auto_on_the_simulator_probes_and_estimates_the_method_picked(tmp_path, switches, picked):
    config = SimulatorConfig(vocab_size=VOCAB, **switches)
    report = asyncio.run(probe(SimulatedEndpoint(config), PROMPTS[0]))
    (bill,) = estimate_run(PROMPTS, SimulatedEndpoint(config), "auto", report=report)
    endpoint = SimulatedEndpoint(config)
    assert real_run(tmp_path, endpoint, "auto") == bill.method == picked
    assert within(bill.calls, endpoint.calls), (bill.calls, endpoint.calls)


@pytest.mark.parametrize("method, switches", [("topk", {}), ("auto", {"logprobs_after_bias": False})])
def test_served_simulator_calls_and_billed_tokens(tmp_path, method, switches):
    """Over HTTP: the token check's 2 calls, the probe's, and the prompt tokens the server bills."""
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=VOCAB, **switches))) as server:
        endpoint = BilledEndpoint(
            "simulator", load_vocabulary(f"simulator:{VOCAB}"), base_url=server.url, api_key="x", system="Be brief."
        )
        rows = estimate_run(PROMPTS, endpoint, method)
        chosen = real_run(tmp_path, endpoint, method)
        (bill,) = [row for row in rows if row.method == chosen]
        assert len(rows) == (5 if method == "auto" else 1)
        assert within(bill.calls, server.endpoint.calls, 0.01), (bill.calls, server.endpoint.calls)
        assert within(bill.prompt_tokens, endpoint.billed_prompt_tokens, 0.01)
        assert bill.completion_tokens == bill.calls and not bill.tokens_counted


def test_tiktoken_vocabularies_count_chat_tokens_with_openai_framing():
    encoding = tiktoken_encoding("o200k_base")
    chat = OpenAIEndpoint("gpt-4o", load_vocabulary("o200k_base"), system="You are terse.")
    count, counted = chat.count_prompt_tokens, chat.prompt_tokens_counted
    plain = Prompt(id=0, line=1, prompt="The capital of France is")
    messages = Prompt(id=1, line=2, messages=[{"role": "user", "content": "Name a prime between 10 and 20."}])

    def framed(*pairs):
        return 3 + sum(3 + len(encoding.encode(role)) + len(encoding.encode(text)) for role, text in pairs)

    assert counted
    assert count(plain) == framed(("system", "You are terse."), ("user", "The capital of France is"))
    assert count(messages) == framed(("user", "Name a prime between 10 and 20."))
    legacy = OpenAIEndpoint("davinci-002", load_vocabulary("cl100k_base"), api="completions").count_prompt_tokens
    assert legacy(plain) == len(tiktoken_encoding("cl100k_base").encode("The capital of France is"))
    with pytest.raises(ValueError, match='api="chat"'):  # the Python API names the setting
        legacy(messages)


def test_auto_without_a_free_probe_shows_every_candidate_with_its_condition():
    endpoint = OpenAIEndpoint("gpt-4o-mini", load_vocabulary("o200k_base"))
    rows = estimate_run(PROMPTS, endpoint, "auto", price=price_for("gpt-4o-mini"))
    assert [row.method for row in rows] == ["direct", "topk", "forced", "bisection", "visible"]
    assert all(row.condition for row in rows)
    by_method = {row.method: row for row in rows}
    assert by_method["forced"].calls_per_prompt == endpoint.vocab_size - 20 + 4
    assert by_method["topk"].calls_per_prompt < by_method["forced"].calls_per_prompt < by_method["bisection"].calls_per_prompt


def test_direct_is_refused_where_the_endpoint_caps_the_top_k():
    with pytest.raises(EndpointUnsuitable, match="whole vocabulary"):
        estimate_run(PROMPTS, SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB)), "direct")


def test_dollars_are_the_price_of_the_tokens():
    endpoint = OpenAIEndpoint("gpt-4o", load_vocabulary("o200k_base"))
    price = Price(2.5, 10.0)
    (bill,) = estimate_run(PROMPTS, endpoint, "topk", price=price)
    assert bill.cost == pytest.approx(bill.prompt_tokens * 2.5e-6 + bill.completion_tokens * 10e-6)
    (unpriced,) = estimate_run(PROMPTS, endpoint, "topk")
    assert unpriced.cost is None


def test_price_cost_arithmetic():
    assert Price(2.5, 10.0).cost(1_000_000, 500_000) == pytest.approx(7.5)
    assert Price(0.15, 0.60).cost(2_000, 10) == pytest.approx(0.000306)
    assert Price(0, 0).cost(10**9, 10**9) == 0


def test_price_lookup():
    assert price_for("gpt-4o") == Price(2.50, 10.00)
    assert price_for("gpt-4o-2024-08-06") == Price(2.50, 10.00)
    assert price_for("gpt-4o-mini-2024-07-18") == Price(0.15, 0.60)  # the longer base name wins
    assert price_for("gpt-4.1-nano-2025-04-14") == Price(0.10, 0.40)
    assert price_for("gpt-3.5-turbo-0125") == Price(0.50, 1.50)
    assert price_for("gpt-4o-2024-05-13") == Price(5.00, 15.00)  # a snapshot the table lists itself
    assert price_for("mystery-model") is None
    assert price_for("gpt-4o-audio-preview") is None  # not a dated snapshot: not guessed
    assert price_for(None) == Price(0.0, 0.0)
    assert price_for("mystery-model", Price(1, 2)) == price_for("gpt-4o", Price(1, 2)) == Price(1, 2)


@pytest.mark.parametrize("text", ["2.5", "2.5,10,1", "a,b", "", "-1,2", "nan,1", "1,inf"])
def test_parse_price_rejects_what_is_not_two_prices(text):
    with pytest.raises(ValueError, match="^price"):
        parse_price(text)


def test_parse_price():
    assert parse_price("2.5,10") == Price(2.5, 10.0)
    assert parse_price(" 0.15 , 0.6 ") == Price(0.15, 0.6)


def test_time_is_set_by_the_tightest_limit():
    assert duration(600, 100, concurrency=16, latency=0.5) == pytest.approx(600 / 32)
    assert duration(600, 100, concurrency=16, latency=0.5, rpm=600) == pytest.approx(60)
    assert duration(600, 100, concurrency=16, latency=0.5, rpm=6000, tpm=30_000) == pytest.approx(120)


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt}) + "\n" for p in PROMPTS))
    return path


def test_cli_json_agrees_with_the_calls_extract_spends(tmp_path):
    """`logprobs estimate --json`, then `logprobs extract` with every simulator call counted."""
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    sim = ["--sim", f"vocab_size={VOCAB}", "--sim", "logprobs_after_bias=false"]
    result = CliRunner().invoke(app, ["estimate", str(prompts), *sim, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["rows"]
    calls = tmp_path / "calls.log"
    run = subprocess.run(
        [sys.executable, str(COUNTER), "extract", str(prompts), *sim, "-q"],
        capture_output=True, text=True, env={**os.environ, "CALL_LOG": str(calls)}, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert row["method"] == "forced"
    assert within(row["calls"], calls.stat().st_size), (row["calls"], calls.stat().st_size)


def test_cli_table(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    result = CliRunner().invoke(app, ["estimate", str(prompts), "--sim", f"vocab_size={VOCAB}", "-m", "topk"])
    assert result.exit_code == 0, result.output
    (bill,) = estimate_run(PROMPTS, SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB)), "topk")
    for column in ("method", "calls", "prompt", "tokens", "US$", "time"):
        assert column in result.stdout
    assert f"{bill.calls:,}" in result.stdout and f"{bill.prompt_tokens:,}" in result.stdout
    unknown = CliRunner().invoke(app, ["estimate", str(prompts), "--model", "mystery", "--tokenizer", "cl100k_base"])
    assert unknown.exit_code == 0, unknown.output
    assert "unknown" in unknown.stdout and "--price" in unknown.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--price", "2.5"], "--price takes two numbers"),
        (["-m", "direct"], "whole vocabulary"),
        (["--model", "gpt-4o", "--api", "completions"], "--api chat"),
    ],
)
def test_cli_errors_are_one_line_messages(tmp_path, args, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    result = CliRunner().invoke(app, ["estimate", str(prompts), *args])
    assert result.exit_code != 0
    assert "error:" in result.output and "Traceback" not in result.output
    assert message in " ".join(result.output.split())
