"""Chosen tokens from the command line, checked as issue 10 says: the OpenAI contract (argmax only), the engines that
answer in one call (the vLLM emulation's id lists, llama-server's whole vocabulary), post-bias topk, a text that is
two tokens, and `estimate` against what a run then spends."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engines import llama_server_fixture
from logprob_cli.endpoints import Prompt, SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._simulator import simulator_token_bytes
from logprob_cli.server import ServerConfig, SimulatorServer

COUNTER = Path(__file__).parent / "tools" / "counting_logprobs.py"
VOCAB = 20_000
OPENAI = ["--sim", f"vocab_size={VOCAB}", "--sim", "logprobs_after_bias=false", "--sim", "sampled_logprob=sentinel"]
TEXTS = ["Is the sky green? Answer:", "Pick a letter: A, B, C or D.", "The weather today is"]

tiny_server = llama_server_fixture("tiny")


def logprobs(*args, calls: Path | None = None):
    """The CLI, with the simulator's calls counted into `calls` (one byte a call) where given."""
    env = {**os.environ, "OPENAI_API_KEY": "unused", **({"CALL_LOG": str(calls)} if calls else {})}
    command = [str(COUNTER)] if calls else ["-m", "logprob_cli.cli"]
    return subprocess.run([sys.executable, *command, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def prompts_file(tmp_path: Path, texts=TEXTS, **keys) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": t, **keys}) + "\n" for i, t in enumerate(texts)))
    return path


def truth(config: SimulatorConfig, text: str) -> np.ndarray:
    endpoint = SimulatedEndpoint(config)
    return endpoint.true_logprobs(endpoint.content(Prompt(id=0, line=1, prompt=text)))


def far(config: SimulatorConfig, texts, ranks=(300, 2_000, 9_000)) -> list[int]:
    """Ids ranked far outside the top 20 for every text (the ranks in the first text's order)."""
    order = np.argsort(-truth(config, texts[0]))
    return [int(order[r]) for r in ranks]


def targets_of(row) -> dict[int, dict]:
    return {t["token_id"]: t for t in row["targets"]}


def test_openai_contract_auto_finds_far_targets_within_eps_and_bounds_the_unreachable(tmp_path):
    """Pre-bias top-20, -9999 for a forced token, bias steers sampling: auto runs bisection on the targets only.
    A bias limit of 12 puts the least likely token out of reach: NULL, with a bound it does not exceed."""
    config = SimulatorConfig(vocab_size=VOCAB, logprobs_after_bias=False, sampled_logprob="sentinel", bias_max=12.0)
    ids = far(config, TEXTS, ranks=(20, 21, 22))  # just outside the top 20: within reach of a bias of 12
    deep = int(np.argmin(truth(config, TEXTS[0])))
    calls = tmp_path / "calls"
    run = logprobs("extract", prompts_file(tmp_path, TEXTS[:1]), *OPENAI, "--sim", "bias_max=12", "-q",
                   *[f"--target-id={i}" for i in [*ids, deep]], calls=calls)
    assert run.returncode == 0, run.stderr
    (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert row["method"] == "bisection" and "logprobs" not in row
    values, expected = targets_of(row), truth(config, TEXTS[0])
    for i in ids:
        assert abs(values[i]["logprob"] - expected[i]) <= 1e-3
    assert values[deep]["logprob"] is None and expected[deep] <= values[deep]["upper_bound"] <= expected.max() - 12.0 + 1e-5


def test_openai_contract_calls_per_target_as_measured(tmp_path):
    """3 targets far outside the top 20 at eps 1e-3: each within eps, at the calls bisection's spec predicts
    (about 10 a target beyond the probe: the issue's "about 4" is below the information bound, ~8 at this eps)."""
    config = SimulatorConfig(vocab_size=VOCAB, logprobs_after_bias=False, sampled_logprob="sentinel")
    ids = far(config, TEXTS)
    calls = tmp_path / "calls"
    run = logprobs("extract", prompts_file(tmp_path), *OPENAI, "-q", *[f"--target-id={i}" for i in ids], calls=calls)
    assert run.returncode == 0, run.stderr
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    for row, text in zip(rows, TEXTS):
        expected = truth(config, text)
        for i, value in targets_of(row).items():
            assert value["logprob"] is not None and abs(value["logprob"] - expected[i]) <= 1e-3
    per_target = (sum(row["calls"] for row in rows) / len(rows) - 2) / 3
    assert 8.0 <= per_target <= 12.0  # the information bound, and what the spec's model allows


def test_topk_reads_targets_k_minus_one_a_call_after_the_bias(tmp_path):
    config = SimulatorConfig(vocab_size=VOCAB)
    ids = far(config, TEXTS, ranks=tuple(range(100, 4_000, 100)))  # 39 targets: ceil(39 / 19) = 3 calls
    run = logprobs("extract", prompts_file(tmp_path), "--sim", f"vocab_size={VOCAB}", "--method", "topk", "-q",
                   *[f"--target-id={i}" for i in ids])
    assert run.returncode == 0, run.stderr
    for row, text in zip(pq.read_table(tmp_path / "p.parquet").to_pylist(), TEXTS):
        expected = truth(config, text)
        assert row["calls"] == 2 + math.ceil(39 / 19)
        assert max(abs(v["logprob"] - expected[i]) for i, v in targets_of(row).items()) < 1e-4


def test_a_text_of_two_tokens_is_refused_before_any_call_with_its_line_and_split(tmp_path):
    one = simulator_token_bytes(5000).decode()
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt": "x", "targets": [one]}) + "\n" + json.dumps({"id": 9, "prompt": "y", "targets": [one + one]}) + "\n")
    calls = tmp_path / "calls"
    run = logprobs("extract", path, calls=calls)
    assert run.returncode == 2
    assert "line 2" in run.stderr and f"2 tokens: {one!r} (5000) + {one!r} (5000)" in run.stderr
    assert calls.stat().st_size == 0 and not (tmp_path / "p.parquet").exists() and not (tmp_path / "p.checkpoint.sqlite").exists()


def test_the_vllm_emulation_answers_any_target_set_in_one_call_with_the_servers_values(tmp_path):
    config = SimulatorConfig(vocab_size=1_000)
    with SimulatorServer(ServerConfig(config, dialect="vllm")) as server:
        ids = far(config, TEXTS, ranks=(30, 300, 990))
        run = logprobs("extract", prompts_file(tmp_path), "--model", "simulator", "--base-url", server.url,
                       "--tokenizer", "simulator:1000", "-q", *[f"--target-id={i}" for i in ids])
    assert run.returncode == 0, run.stderr
    for row, text in zip(pq.read_table(tmp_path / "p.parquet").to_pylist(), TEXTS):
        assert row["method"] == "listed" and row["calls"] == 1
        endpoint = SimulatedEndpoint(config)
        # served as chat: the model reads the user message
        expected = endpoint.true_logprobs(endpoint.content([{"role": "user", "content": text}]))
        assert max(abs(v["logprob"] - expected[i]) for i, v in targets_of(row).items()) < 1e-5


def test_llama_server_answers_any_target_set_in_one_call_exactly(tiny_server, tmp_path):
    from test_engines import whole_distribution

    text = "It was the best of times"
    server_truth = whole_distribution(tiny_server, text, 459)
    ids = [int(i) for i in np.argsort(-server_truth)[[40, 200, 450]]]
    run = logprobs("extract", prompts_file(tmp_path, [text]), "--model", "tiny", "--base-url", f"{tiny_server}/v1",
                   "-q", *[f"--target-id={i}" for i in ids])
    assert run.returncode == 0, run.stderr
    (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert row["method"] == "direct" and row["calls"] == 1
    assert max(abs(v["logprob"] - server_truth[i]) for i, v in targets_of(row).items()) < 1e-6


@pytest.mark.parametrize("sim, targets", [(OPENAI, 3), (["--sim", f"vocab_size={VOCAB}"], 25)])
def test_estimate_with_targets_agrees_with_the_run(tmp_path, sim, targets):
    config = SimulatorConfig(vocab_size=VOCAB)
    ids = [f"--target-id={i}" for i in far(config, TEXTS, ranks=tuple(range(100, 100 + 50 * targets, 50)))]
    path = prompts_file(tmp_path)
    estimate = logprobs("estimate", path, *sim, "--json", *ids)
    assert estimate.returncode == 0, estimate.stderr
    (row,) = json.loads(estimate.stdout)["rows"]
    calls = tmp_path / "calls"
    run = logprobs("extract", path, *sim, "-q", *ids, calls=calls)
    assert run.returncode == 0, run.stderr
    probe = json.loads(pq.read_schema(tmp_path / "p.parquet").metadata[b"logprob_cli"])["probe"]
    spent = calls.stat().st_size - probe["rejected_calls"]  # estimate counts answered (billed) calls
    assert abs(row["calls"] - spent) <= 0.1 * spent, (row["calls"], spent)
