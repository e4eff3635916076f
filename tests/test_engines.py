"""The tool against a real engine, llama.cpp's llama-server, compared with the server's own full distribution.

Skips unless `scripts/build_llama_server.sh` has filled the cache (see tests/engines.py).
"""

import asyncio
import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pyarrow.parquet as pq

from engines import llama_server_fixture
from logprob_cli.endpoints._base import Prompt, Query
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints._vocabulary import server_vocabulary

smollm2_server = llama_server_fixture("smollm2")
tiny_server = llama_server_fixture("tiny")


def whole_distribution(base_url: str, text: str, n_vocab: int, bias: dict | None = None) -> np.ndarray:
    """The server's own answer for every token, by id (the ground truth on this server). Its logprobs are
    pre-bias: `bias` forcing a clean token gets an answer where the unbiased greedy token's is withheld."""
    body = {
        "messages": [{"role": "user", "content": text}], "max_tokens": 1, "temperature": 0, "logprobs": True,
        "top_logprobs": n_vocab, "cache_prompt": False, "logit_bias": bias or {},
    }
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        entries = json.load(response)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    truth = np.full(n_vocab, np.nan)
    for entry in entries:
        truth[entry["id"]] = entry["logprob"]
    return truth


def logprobs(*args):
    return subprocess.run([sys.executable, "-m", "logprob_cli.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OPENAI_API_KEY": "unused"})


def test_probe_reads_llama_server_right(smollm2_server):
    run = logprobs("probe", "--model", "smollm2", "--base-url", f"{smollm2_server}/v1", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["whole_vocabulary"] and report["vocab_size"] == 49152
    assert report["bias_steers_sampling"] and not report["logprobs_after_bias"]
    assert report["forced_logprob"] == "reported"
    assert report["identity"] == ["ids"]
    assert report["deterministic"]
    assert report["recommended"] == "direct"


def test_auto_matches_the_servers_own_distribution(smollm2_server, tmp_path):
    texts = ["The capital of France is", "1, 2, 3, 4,"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    run = logprobs("extract", prompts, "--model", "smollm2", "--base-url", f"{smollm2_server}/v1", "-q")
    assert run.returncode == 0, run.stderr
    for row, text in zip(pq.read_table(tmp_path / "p.parquet").to_pylist(), texts):
        assert row["method"] == "direct" and row["calls"] == 1
        truth = whole_distribution(smollm2_server, text, 49152)
        got = np.array(row["logprobs"], dtype=float)
        mask = truth > np.log(1e-6)
        assert np.abs(got[mask] - truth[mask]).max() < 1e-3


def test_direct_asked_by_name_matches_the_server_on_either_api(tiny_server, tmp_path):
    """llama-server is known to return the whole vocabulary, so --method direct needs no probe."""
    text = "It was the best of times"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": text}) + "\n")
    truth = whole_distribution(tiny_server, text, 459)
    for api in ("chat", "completions"):
        out = tmp_path / f"{api}.parquet"
        run = logprobs("extract", prompts, "-o", out, "--model", "tiny", "--base-url", f"{tiny_server}/v1",
                       "--api", api, "--method", "direct", "-q")
        assert run.returncode == 0, run.stderr
        (row,) = pq.read_table(out).to_pylist()
        assert row["calls"] == 1 and row["unrecovered_count"] == 0
        got = np.array(row["logprobs"], dtype=float)
        if api == "chat":  # whole_distribution asks the chat route
            assert np.abs(got - truth).max() < 1e-6
        else:
            assert abs(np.exp(got).sum() - 1) < 1e-4  # no chat template: another distribution, but a whole one


def test_methods_that_need_post_bias_logprobs_are_refused_quickly(smollm2_server, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The capital of France is"}\n')
    for method in ("topk", "exact"):
        run = logprobs("extract", prompts, "--model", "smollm2", "--base-url", f"{smollm2_server}/v1",
                       "--method", method, "--fresh", "-q")
        assert run.returncode == 1
        assert "before the bias" in run.stderr and "bisection" in run.stderr and "Traceback" not in run.stderr
        assert len(sqlite_answers(tmp_path / "p.checkpoint.sqlite")) <= 10


def sqlite_answers(path):
    import sqlite3
    with sqlite3.connect(path) as db:
        return db.execute("select seq from answers").fetchall()


def test_forced_matches_the_server_everywhere(tiny_server, tmp_path):
    text = "The capital of France is"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": text}) + "\n")
    run = logprobs("extract", prompts, "--model", "tiny", "--base-url", f"{tiny_server}/v1", "--method", "forced", "-q")
    assert run.returncode == 0, run.stderr
    (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
    got = np.array([np.nan if v is None else v for v in row["logprobs"]], dtype=float)
    truth = whole_distribution(tiny_server, text, 459)
    # Tokens whose answers llama.cpp withholds (incomplete UTF-8) are found by bisection over their bias.
    assert row["unrecovered_count"] == 0
    assert np.abs(got - truth).max() <= row["precision_nats"] <= 1e-3
    assert any("found by bisection" in note for note in row["notes"])


def test_post_bias_mode_serves_topk_and_exact(tiny_server, tmp_path):
    """llama-server's post_sampling_probs reflect the bias, so the reference and normalizer methods work there."""
    texts = ["The capital of France is", "It was the best of times"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    probe = logprobs("probe", "--model", "tiny", "--base-url", f"{tiny_server}/v1", "--post-bias", "--json")
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout)["logprobs_after_bias"]
    for method in ("topk", "exact"):
        out = tmp_path / f"{method}.parquet"
        run = logprobs("extract", prompts, "-o", out, "--model", "tiny", "--base-url", f"{tiny_server}/v1",
                       "--post-bias", "--method", method, "-q")
        assert run.returncode == 0, run.stderr
        for row, text in zip(pq.read_table(out).to_pylist(), texts):
            truth = whole_distribution(tiny_server, text, 459)
            got = np.array([np.nan if v is None else v for v in row["logprobs"]], dtype=float)
            mask = truth > np.log(1e-6)
            assert not np.isnan(got[mask]).any()
            assert np.abs(got[mask] - truth[mask]).max() < 1e-3


TINY_LEAD_BYTES = np.arange(0xC0, 0xF8)  # tiny ids 0-255 are the bytes: these are lone UTF-8 lead bytes


def test_withheld_tokens_are_the_ones_whose_answers_the_server_withholds(tiny_server):
    """Forcing each of the 459 ids in turn: the server withholds the answer exactly for `withheld_tokens`."""
    endpoint = OpenAIEndpoint("tiny", server_vocabulary(459), base_url=f"{tiny_server}/v1", dialect="llama.cpp")
    prompt = Prompt(id=0, line=1, prompt="The capital of France is")

    async def force_each():
        try:
            answers = [await endpoint.ask(prompt, Query.make({i: 1000.0})) for i in range(459)]
            return answers, await endpoint.withheld_tokens()
        finally:
            await endpoint.aclose()

    answers, listed = asyncio.run(force_each())
    withheld = {i for i, answer in enumerate(answers) if answer.withheld}
    assert set(TINY_LEAD_BYTES) <= withheld
    assert listed == withheld
    assert all(answer.sampled == i for i, answer in enumerate(answers) if not answer.withheld)


def test_bisection_matches_the_server_where_it_withholds_answers(tiny_server, tmp_path):
    """Lone lead bytes hold a tenth of the mass here and win queries whose answers the server withholds;
    bisection biases at most one such token per query, so a withheld answer names its winner."""
    text = "The capital of France is"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": text}) + "\n")
    run = logprobs("extract", prompts, "--model", "tiny", "--base-url", f"{tiny_server}/v1", "--method", "bisection",
                   "-q")
    assert run.returncode == 0, run.stderr
    (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
    truth = whole_distribution(tiny_server, text, 459)
    got = np.array([np.nan if v is None else v for v in row["logprobs"]], dtype=float)
    mask = truth > np.log(1e-6)
    assert mask[TINY_LEAD_BYTES].sum() >= 20 and np.exp(truth[TINY_LEAD_BYTES]).sum() > 0.05
    assert row["unrecovered_count"] == 0
    assert np.abs(got[mask] - truth[mask]).max() < 1e-3
    assert row["calls"] < 4 * 459  # measured 1,526 (3.3 per token)


def completion_distribution(base_url: str, text: str, n_vocab: int) -> np.ndarray:
    """The server's own legacy-completions answer for every token, with a clean token (id 0, a control byte)
    forced so that the answer is not withheld: its logprobs are pre-bias, so they are the unbiased ones."""
    body = {"prompt": text, "max_tokens": 1, "temperature": 0, "logprobs": n_vocab, "cache_prompt": False,
            "logit_bias": {"0": 100}}
    request = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        entry = json.load(response)["choices"][0]["logprobs"]["content"][0]
    assert entry["id"] == 0
    truth = np.full(n_vocab, np.nan)
    for e in entry["top_logprobs"]:
        truth[e["id"]] = e["logprob"]
    return truth


WITHHELD_GREEDY = "The capital of France is"  # with --api completions its greedy token is id 201, byte 0xC9: held


def test_methods_work_when_the_greedy_token_itself_is_withheld(tiny_server, tmp_path):
    """The unbiased answer comes back without logprobs: the endpoint asks again with the held tokens at -100, and
    auto (direct) and forced recover every token; forced finds the held ones by bisection over their bias."""
    truth = completion_distribution(tiny_server, WITHHELD_GREEDY, 459)
    assert int(np.argmax(truth)) in TINY_LEAD_BYTES
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": WITHHELD_GREEDY}) + "\n")
    for method in ("auto", "forced"):
        out = tmp_path / f"{method}.parquet"
        run = logprobs("extract", prompts, "-o", out, "--model", "tiny", "--base-url", f"{tiny_server}/v1",
                       "--api", "completions", "--method", method, "-q")
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        (row,) = pq.read_table(out).to_pylist()
        assert row["unrecovered_count"] == 0
        got = np.array(row["logprobs"], dtype=float)
        assert np.abs(got - truth).max() <= max(row["precision_nats"], 1e-6)
    assert row["calls"] < 4 * 459  # measured 1,531 (459 - 5 forced, 1,136 for the 63 held tokens outside the top-5)


def test_bisection_when_the_greedy_token_itself_is_withheld(tiny_server, tmp_path):
    """t0 is held: every query holds the held tokens above the best clean one down, and every token is found."""
    truth = completion_distribution(tiny_server, WITHHELD_GREEDY, 459)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": WITHHELD_GREEDY}) + "\n")
    run = logprobs("extract", prompts, "--model", "tiny", "--base-url", f"{tiny_server}/v1", "--api", "completions",
                   "--method", "bisection", "-q")
    assert run.returncode == 0, run.stderr
    (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
    got = np.array([np.nan if v is None else v for v in row["logprobs"]], dtype=float)
    assert row["unrecovered_count"] == 0
    assert np.abs(got - truth).max() <= row["precision_nats"] <= 1e-3
    assert row["calls"] < 4 * 459  # measured 1,514
    assert any("held the tokens above token" in note for note in row["notes"])


def test_a_chat_prompt_with_a_withheld_greedy_token_comes_back_whole(tiny_server):
    """Chat "Paris is": the greedy token (205) is held; one query with no bias still returns the true top-k."""
    endpoint = OpenAIEndpoint("tiny", server_vocabulary(459), base_url=f"{tiny_server}/v1", dialect="llama.cpp")

    async def once():
        try:
            answer = await endpoint.ask(Prompt(id=0, line=1, prompt="Paris is"), Query.make(top_logprobs=459))
            return answer, await endpoint.withheld_tokens()
        finally:
            await endpoint.aclose()

    answer, held = asyncio.run(once())
    truth = whole_distribution(tiny_server, "Paris is", 459, {"0": 100})
    got = np.full(459, np.nan)
    got[list(answer.top_ids)] = answer.top_logprobs
    assert answer.sampled in held and answer.sampled == int(np.argmax(truth))
    assert answer.sampled_logprob == truth.max() and np.array_equal(got, truth)
