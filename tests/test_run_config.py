"""One run configuration for the CLI and the Python API: endpoints built from settings, RunConfig, extract_file."""

import asyncio
import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer.main
from typer.testing import CliRunner

from logprob_cli import extract_file, extract_logprobs
from logprob_cli.cli import FLAGS, app
from logprob_cli.endpoints._factory import EndpointSettings, SettingsError, build_endpoint
from logprob_cli.run._config import RunConfig
from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig
from test_probe import answering, http_server

CONFIG = SimulatorConfig(vocab_size=1000)
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]


def served() -> SimulatorServer:
    return SimulatorServer(ServerConfig(CONFIG, api_key="sk-test"))


def served_truth(prompt: str) -> np.ndarray:
    """What the served simulator's model reads for a plain prompt over the chat API: one user message."""
    return SimulatedEndpoint(CONFIG).true_logprobs([{"role": "user", "content": prompt}])


def test_extract_logprobs_reaches_logprobs_serve_as_a_notebook_would():
    truth = served_truth(PROMPTS[0])
    with served() as server:
        result = extract_logprobs(
            PROMPTS[0], method="topk", model="simulator", base_url=server.url, api_key="sk-test",
            tokenizer="simulator:1000",
        )

        async def in_a_cell():  # Jupyter runs cells inside an event loop
            return extract_logprobs(PROMPTS[0], model="simulator", base_url=server.url, api_key="sk-test",
                                    tokenizer="simulator:1000")

        chosen = asyncio.run(in_a_cell())
    assert result.method == "topk" and result.calls > 1
    assert np.abs(result.logprobs - truth).max() < 1e-4
    assert chosen.probe is not None and chosen.method == chosen.probe.recommended
    recovered = ~np.isnan(chosen.logprobs)
    assert recovered.any() and np.abs(chosen.logprobs[recovered] - truth[recovered]).max() < 1e-3


def test_extract_file_writes_parquet_and_resumes_without_paying_twice(tmp_path):
    source = tmp_path / "batch.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    whole = extract_file(source, tmp_path / "whole.parquet", "topk", simulator=CONFIG)
    first = extract_file(source, method="topk", simulator=CONFIG, max_calls=whole.calls // 2)
    assert first.budget_reached and 0 < first.finished < len(PROMPTS)
    assert (tmp_path / "batch.checkpoint.sqlite").exists()
    second = extract_file(source, method="topk", simulator=CONFIG)
    assert second.finished == len(PROMPTS) and not second.failures
    assert first.calls + second.calls == whole.calls, "a resumed run spends only what is left"
    rows = pq.read_table(tmp_path / "batch.parquet").to_pylist()
    truth = SimulatedEndpoint(CONFIG)
    assert [row["id"] for row in rows] == [0, 1, 2]
    for row, prompt in zip(rows, PROMPTS):
        assert np.abs(np.array(row["logprobs"], dtype=float) - truth.true_logprobs(prompt)).max() < 1e-4


def test_extract_file_against_a_served_endpoint_and_one_shard(tmp_path):
    source = tmp_path / "batch.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    with served() as server:
        summary = extract_file(
            source, method="topk", shard=(0, 2), model="simulator", base_url=server.url, api_key="sk-test",
            tokenizer="simulator:1000",
        )
    rows = pq.read_table(tmp_path / "batch.shard-0-of-2.parquet").to_pylist()
    assert summary.finished == len(rows) == summary.total and not summary.failures
    assert "sk-test" not in (tmp_path / "batch.shard-0-of-2.parquet").read_bytes().decode("latin-1")
    for row in rows:
        truth = served_truth(PROMPTS[row["id"]])
        assert np.abs(np.array(row["logprobs"], dtype=float) - truth).max() < 1e-4


@pytest.mark.parametrize("settings, python_words, cli_words", [
    (EndpointSettings(rpm=10), "rpm/tpm pace a model endpoint", "--rpm/--tpm pace a --model endpoint"),
    (EndpointSettings(model="m", simulator=CONFIG), "simulator settings apply", "--sim switches apply"),
    (EndpointSettings(model="m", post_bias=True), "post_bias is llama-server's mode: give its base_url",
     "--post-bias is llama-server's mode: give its --base-url"),
    (EndpointSettings(model="no-such-model"), "(no tokenizer given, so the model name 'no-such-model' was tried)",
     "(no --tokenizer given, so the model name 'no-such-model' was tried)"),
])
def test_settings_errors_name_settings_and_the_cli_words_them_as_flags(settings, python_words, cli_words):
    with pytest.raises(SettingsError) as refused:
        build_endpoint(settings)
    assert python_words in str(refused.value) and "--" not in str(refused.value)
    assert cli_words in refused.value.worded(FLAGS)


def test_the_api_refuses_an_endpoint_and_settings_together_and_bad_run_settings_before_any_call():
    endpoint = SimulatedEndpoint(CONFIG)
    with pytest.raises(ValueError, match="not both"):
        extract_logprobs("hi", endpoint=endpoint, model="gpt-4o-mini")
    with pytest.raises(ValueError, match="top_k must be"):
        extract_logprobs("hi", endpoint=endpoint, top_k=1)
    assert endpoint.calls == 0


def test_run_config_is_frozen_checked_and_settings_hide_the_key():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().top_k = 5
    for bad in ({"method": "magic"}, {"top_k": 1}, {"concurrency": 0}, {"eps": 0.0}, {"max_calls": -1}):
        with pytest.raises(ValueError):
            RunConfig(**bad)
    assert "sk-secret" not in repr(EndpointSettings(model="m", api_key="sk-secret"))


SHARED = {"input", "method", "top_k", "eps", "concurrency", "sim", "model", "base_url", "api_key", "api", "system",
          "extra_body", "tokenizer", "post_bias", "rpm", "tpm", "price"}


def test_shared_options_read_the_same_in_every_command():
    """An option that extract, probe and estimate share is declared once: same flags, help, default."""
    commands = typer.main.get_command(app).commands
    seen: dict[str, list] = {}
    for name in ("extract", "probe", "estimate"):
        for param in commands[name].params:
            if param.name in SHARED:
                seen.setdefault(param.name, []).append(
                    (tuple(param.opts), param.help, repr(param.default), param.metavar, getattr(param, "envvar", None))
                )
    assert all(len(seen[name]) >= 2 for name in SHARED), "every option listed is shared"
    assert {name: kinds for name, kinds in seen.items() if len(set(kinds)) > 1} == {}


def listing(models: list):
    """A server whose every answer (GET /models first) lists `models`."""
    body = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in models]}).encode()
    return http_server(answering(200, body, "application/json"))


def test_a_base_url_alone_runs_the_one_model_its_server_serves(tmp_path):
    source = tmp_path / "batch.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:2])))
    with served() as server:
        summary = extract_file(source, method="topk", base_url=server.url, api_key="sk-test", tokenizer="simulator:1000")
        result = CliRunner().invoke(app, [
            "extract", str(source), "-o", str(tmp_path / "cli.parquet"), "--method", "topk", "--quiet",
            "--base-url", server.url, "--api-key", "sk-test", "--tokenizer", "simulator:1000",
        ])
    assert summary.finished == 2 and not summary.failures
    assert result.exit_code == 0, result.output
    for output in (tmp_path / "batch.parquet", tmp_path / "cli.parquet"):
        table = pq.read_table(output)
        assert set(table.column("model").to_pylist()) == {ServerConfig(CONFIG).model}
        for row in table.to_pylist():
            assert np.abs(np.array(row["logprobs"], dtype=float) - served_truth(PROMPTS[row["id"]])).max() < 1e-4


@pytest.mark.parametrize("models, words", [
    (["llama-8b", "qwen-7b"], "serves 2 models (llama-8b, qwen-7b); name the one to use"),
    ([], "does not list the models it serves (GET /models); name the one to use"),
])
def test_a_base_url_alone_whose_server_does_not_serve_one_model_asks_for_model(models, words, tmp_path):
    source = tmp_path / "batch.jsonl"
    source.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    with listing(models) as url:
        with pytest.raises(SettingsError) as refused:
            build_endpoint(EndpointSettings(base_url=url))
        result = CliRunner().invoke(app, ["extract", str(source), "--base-url", url])
    assert "base_url needs model here" in str(refused.value) and words in str(refused.value)
    said = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "--base-url needs --model here" in said and words in said
    assert "Traceback" not in said and not (tmp_path / "batch.parquet").exists()
