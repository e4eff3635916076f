"""The pre-flight check: what used to fail after calls were paid is found before any call, with its line.

Class 2 (hostile input lines) runs the CLI in-process on the built-in simulator with every
simulator call counted (one case also in a subprocess); class 4 (errors every prompt would hit) runs it against an in-process
SimulatorServer and counts the HTTP requests the client sends.
"""

import asyncio
import json
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from logprob_cli.endpoints import _transport as transport
from logprob_cli.cli import app, failure_advice
from logprob_cli.endpoints._base import Answer, Prompt
from logprob_cli.io._jsonl import InputError, check_prompts
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.run._runner import extract_batch
from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._vocabulary import load_vocabulary

OK = '{"prompt": "a fine line"}'

# name: (lines of the input, the line numbers the message must name, a fragment it must hold)
HOSTILE = {
    "key named like a column": ([OK, '{"prompt": "x", "calls": 3}'], [2], '"calls"'),
    "key named like a column, other case": ([OK, '{"prompt": "x", "Logprobs": [1]}'], [2], '"Logprobs"'),
    "key named like a head column": (['{"prompt": "x", "ID": 3}'], [1], '"ID"'),
    "id beyond int64": ([OK, '{"id": 9223372036854775808, "prompt": "x"}'], [2], "64-bit"),
    "id below int64": (['{"id": -9223372036854775809, "prompt": "x"}'], [1], "64-bit"),
    "lone surrogate in prompt": ([OK, '{"prompt": "x\\ud800"}'], [2], "Unicode"),
    "lone surrogate in messages": ([OK, '{"messages": [{"role": "user", "content": "\\udfff"}]}'], [2], "Unicode"),
    "lone surrogate in id": (['{"id": "a\\ud800", "prompt": "x"}'], [1], "Unicode"),
    "lone surrogate in an extra key": (['{"prompt": "x", "k\\ud800": 1}'], [1], "Unicode"),
    "lone surrogate in an extra value": ([OK, '{"prompt": "x", "tags": ["ok", {"n": "\\ud800"}]}'], [2], "Unicode"),
    "nested past the parser": ([OK, '{"prompt": "x", "k": ' + "[" * 100_000 + "]" * 100_000 + "}"], [2], "nested"),
    "NaN": ([OK, '{"prompt": "x", "score": NaN}'], [2], "NaN"),
    "Infinity": (['{"prompt": "x", "score": [1, -Infinity]}'], [1], "Infinity"),
    "overflowing float": (['{"prompt": "x", "score": 1e999}'], [1], "Infinity"),
    "content part not an object": (['{"messages": [{"role": "user", "content": ["hi"]}]}'], [1], "content[0]"),
    "text part without text": (['{"messages": [{"role": "user", "content": [{"type": "text"}]}]}'], [1], '"text"'),
}


@pytest.fixture
def simulator_calls(monkeypatch):
    """A list that grows by one for every call the in-process simulator answers on the main thread, where the
    CLI runs (a served simulator left over from another test answers on its own threads)."""
    calls = []
    answer = SimulatedEndpoint.answer

    def counted(self, prompt, query):
        if threading.current_thread() is threading.main_thread():
            calls.append(query)
        return answer(self, prompt, query)

    monkeypatch.setattr(SimulatedEndpoint, "answer", counted)
    return calls


def run_cli(*args) -> tuple[int, str]:
    """The CLI in-process: (exit code, everything it printed, unwrapped)."""
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


@pytest.mark.parametrize("command", ["extract", "estimate"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_line_is_reported_before_any_call(tmp_path, simulator_calls, case, command):
    lines, numbers, fragment = HOSTILE[case]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    code, message = run_cli(command, source, "--sim", "vocab_size=1000")
    assert code == 2, message
    assert "Traceback" not in message
    for number in numbers:
        assert f"line {number}:" in message
    assert fragment in message
    assert f"line {numbers[-1] + 1}:" not in message
    assert simulator_calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no checkpoint


def test_hostile_line_in_a_subprocess_prints_no_traceback(tmp_path):
    """As a user runs it: the deepest case (a RecursionError in the parser) in a real process."""
    source = tmp_path / "in.jsonl"
    source.write_text(OK + '\n{"prompt": "x", "k": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    run = subprocess.run(
        [sys.executable, "-m", "logprob_cli.cli", "extract", str(source), "--sim", "vocab_size=1000"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2 and "line 2:" in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_every_colliding_key_of_every_line_is_listed(tmp_path, simulator_calls):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a", "calls": 1, "NOTES": 2}\n{"prompt": "b"}\n{"prompt": "c", "Method": 3}\n')
    code, message = run_cli("extract", source, "--sim", "vocab_size=1000")
    assert code == 2 and "3 problems" in message
    assert all(key in message for key in ('"calls"', '"NOTES"', '"Method"'))
    assert simulator_calls == []


def test_values_beyond_int64_in_extra_keys_are_stored_exactly_as_json(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a", "n": 123456789012345678901234567890}\n{"prompt": "b", "n": 1}\n'
                      '{"prompt": "c", "deep": ' + "[" * 60 + "1" + "]" * 60 + "}\n")
    code, message = run_cli("extract", source, "--sim", "vocab_size=1000", "-q")
    assert code == 0, message
    table = pq.read_table(tmp_path / "in.parquet")  # readable: the 60-deep list went in as JSON text too
    assert [None if v is None else json.loads(v) for v in table.column("n").to_pylist()] == [
        123456789012345678901234567890, 1, None
    ]
    assert json.loads(table.column("deep").to_pylist()[2]) == json.loads("[" * 60 + "1" + "]" * 60)


def test_python_api_prompts_get_the_same_check_before_a_checkpoint_exists(tmp_path):
    prompts = [
        Prompt(id="a", line=0, prompt="fine"),
        Prompt(id="b", line=0, prompt="x\ud800"),
        Prompt(id="c", line=0, prompt="x", extra={"probability_sum": 1}),
        Prompt(id="d", line=0, prompt="x", extra={"v": float("nan")}),
        Prompt(id="e", line=0, prompt="x", extra={"v": {1, 2}}),  # not JSON at all
    ]
    with pytest.raises(InputError) as caught:
        extract_batch(prompts, tmp_path / "out.parquet", SimulatedEndpoint(SimulatorConfig(vocab_size=1000)), "topk")
    listed = caught.value.problems
    assert [item.split(":")[0] for item in listed] == ["prompt 'b'", "prompt 'c'", "prompt 'd'", "prompt 'e'"]
    assert list(tmp_path.iterdir()) == []
    check_prompts(prompts[:1], api="completions")  # a clean prompt passes


def test_chat_lines_for_legacy_completions_are_listed(tmp_path):
    prompts = [Prompt(id=1, line=1, prompt="a"), Prompt(id=2, line=2, messages=[{"role": "user", "content": "b"}])]
    check_prompts(prompts, api="chat")
    check_prompts(prompts)  # the simulator takes both
    with pytest.raises(InputError) as caught:
        check_prompts(prompts, api="completions")
    assert caught.value.problems[0].startswith("line 2:") and 'api="chat"' in caught.value.problems[0]


# --- class 4: errors every prompt would hit stop early, and no futile advice ---------------------------


@pytest.fixture
def served(monkeypatch):
    """An in-process simulator server (1,000 tokens) and a list of the path of every completion request (POST)
    the client sends, tries included (GET /models is not counted)."""
    sent = []
    send = transport.AiohttpWire.send

    async def counted(self, method, url, headers, body):
        if method == "POST":
            sent.append(urlsplit(url).path)
        return await send(self, method, url, headers, body)

    monkeypatch.setattr(transport.AiohttpWire, "send", counted)
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=1000))) as server:
        yield server, sent


def invoke(tmp_path, url, *args, lines=None):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines or [{"prompt": f"p{i}"} for i in range(30)]))
    result = CliRunner().invoke(
        app, ["extract", str(source), "--model", "simulator", "--base-url", url, "--api-key", "k", "-q", *args]
    )
    return result, " ".join(result.output.split())


def test_tokenizer_larger_than_the_vocabulary_stops_in_the_mapping_check(tmp_path, served):
    server, sent = served
    result, message = invoke(tmp_path, server.url, "--tokenizer", "simulator:2000", "--method", "topk")
    assert result.exit_code == 1 and "Traceback" not in message
    assert "--tokenizer" in message and "vocabulary is smaller" in message
    assert "run the same command again" not in message
    assert len(sent) == 2  # the mapping check's two calls, not one per prompt
    assert not (tmp_path / "in.parquet").exists()


def test_refused_token_ids_during_the_run_are_fatal(tmp_path, served, monkeypatch):
    """Where the mapping check cannot see it (a server that accepts the last id), a refused id still stops at once."""
    server, sent = served

    async def unchecked(self, prompt, ask=None):
        return "not verified: skipped by the test"

    monkeypatch.setattr(OpenAIEndpoint, "verify_mapping", unchecked)
    result, message = invoke(tmp_path, server.url, "--tokenizer", "simulator:2000", "--method", "topk", "-c", "2")
    assert result.exit_code == 1 and "--tokenizer" in message and "run the same command again" not in message
    per_prompt = 2000 // 19 + 2  # topk's calls for one prompt of a 2,000-token vocabulary
    assert len(sent) < per_prompt  # stopped at the first refusal, within the first prompt; 30 would spend ~3,200


def test_chat_lines_with_completions_api_stop_before_any_call(tmp_path, served):
    server, sent = served
    lines = [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}, {"prompt": "c"}]
    result, message = invoke(tmp_path, server.url, "--tokenizer", "simulator:1000", "--api", "completions", lines=lines)
    assert result.exit_code == 2 and "line 2:" in message and "--api chat" in message
    assert "line 1:" not in message and "line 3:" not in message
    assert sent == [] and server.endpoint.calls == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_the_same_refusal_on_every_prompt_stops_the_run(tmp_path, served):
    """A server whose top-k cap is below what topk asks refuses every prompt's requests: stop after a few."""
    _, sent = served
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=1000, top_logprobs_cap=5))) as capped:
        result, message = invoke(tmp_path, capped.url, "--tokenizer", "simulator:1000", "--method", "topk", "-c", "2")
    assert result.exit_code == 1 and "Traceback" not in message
    assert "every prompt would be refused" in message and "top_logprobs" in message
    assert len(sent) < 20  # 30 prompts would have sent ~30 requests or more


def test_retry_advice_only_for_failures_a_retry_can_fix():
    assert "run the same command again" in failure_advice(3, 0)
    refused_only = failure_advice(2, 2)
    assert "run the same command again" not in refused_only and "refused" in refused_only
    mixed = failure_advice(3, 1)
    assert "2 on faults a retry can fix" in mixed and "1 refused" in mixed
    assert failure_advice(1, 0).startswith("1 prompt failed")


@pytest.mark.parametrize("tokenizer, last_ordinary", [("simulator:1000", 999), ("cl100k_base", 100255)])
def test_mapping_check_pushes_down_the_last_ordinary_id(tokenizer, last_ordinary):
    """The last id with bytes: OpenAI refuses special ids in logit_bias ("Maximum value is 100257" on cl100k)."""
    endpoint = OpenAIEndpoint("m", load_vocabulary(tokenizer), base_url="http://127.0.0.1:9/v1", api_key="k")
    asked = []

    async def ask(prompt, query):
        asked.append(query)
        bias = query.bias_dict()
        winner = max(bias, key=bias.get) if bias else 5
        return Answer(winner, -0.1, (winner,), (-0.1,))

    assert asyncio.run(endpoint.verify_mapping(Prompt(id=1, line=1, prompt="x"), ask)) == "verified"
    pushed = {i for i, b in asked[1].bias if b < 0}
    assert pushed == {last_ordinary} and max(i for i, _ in asked[1].bias) <= last_ordinary
