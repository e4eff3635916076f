"""Ctrl-C (SIGINT) and SIGTERM stop `logprobs extract` within seconds on every endpoint kind, keep every answer
paid for, and the same command then resumes to the uninterrupted run's output.

The in-process simulator answers without waiting on anything, so an event loop that never yields would serve
its whole queue of calls before it noticed the signal (it took 6.5-18 s). Each run is long (~10-30 s on a
2-core machine) and is signalled once it has journaled its first answers.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatorConfig

COUNTER = Path(__file__).parent / "tools" / "counting_logprobs.py"
STOP_SECONDS = 3.5  # signal to exit, interpreter teardown included (~0.3 s idle, ~1.5 s of it on a loaded CI box)
SIM_ARGS = ["--method", "topk", "-c", "4", "-q"]  # 5,265 calls a prompt on the default 100,000-token simulator
SIM_PROMPTS = 3
HTTP_VOCAB = 20_000
HTTP_PROMPTS = 3
KEY = "sk-interrupt-tests"


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt number {i}"}) + "\n" for i in range(n)))
    return path


def journaled(checkpoint: Path) -> int:
    """Answers the checkpoint holds (0 before its table exists)."""
    if not checkpoint.exists():
        return 0
    with sqlite3.connect(checkpoint) as db:
        try:
            return db.execute("select count(*) from answers").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def interrupt_when(child: subprocess.Popen, started, sig: int) -> float:
    """Send `sig` once `started()` holds; returns the seconds from the signal to the child's exit."""
    deadline = time.monotonic() + 180
    while not started():
        assert child.poll() is None, f"the run ended before the signal: {child.stderr.read()}"
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    sent = time.monotonic()
    child.send_signal(sig)
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        raise AssertionError("the run went on for a minute after the signal")
    return time.monotonic() - sent


def calls_in(log: Path) -> int:
    return log.stat().st_size if log.exists() else 0


def simulator_run(prompts: Path, out: Path, log: Path, **kw):
    env = {**os.environ, "CALL_LOG": str(log), "COLUMNS": "1000"}
    command = [sys.executable, str(COUNTER), "extract", str(prompts), "-o", str(out), *SIM_ARGS]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def simulator_reference(tmp_path_factory):
    """An uninterrupted run on the in-process simulator: (output path, calls it made)."""
    directory = tmp_path_factory.mktemp("reference")
    prompts = write_prompts(directory / "p.jsonl", SIM_PROMPTS)
    child = simulator_run(prompts, directory / "p.parquet", directory / "calls")
    assert child.wait(timeout=600) == 0, child.stderr.read()
    return directory / "p.parquet", calls_in(directory / "calls")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_simulator_run_at_once_and_resume_is_identical(tmp_path, simulator_reference, sig):
    reference, reference_calls = simulator_reference
    prompts = write_prompts(tmp_path / "p.jsonl", SIM_PROMPTS)
    out, log, checkpoint = tmp_path / "p.parquet", tmp_path / "calls", tmp_path / "p.checkpoint.sqlite"
    child = simulator_run(prompts, out, log)
    at_signal = []
    seconds = interrupt_when(child, lambda: journaled(checkpoint) > 500 and not at_signal.append(calls_in(log)), sig)
    stderr = child.stderr.read()
    assert child.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert seconds < STOP_SECONDS, f"exit took {seconds:.1f} s after the signal"
    made = calls_in(log)
    assert made - at_signal[-1] <= 64, "calls went on after the signal"
    assert journaled(checkpoint) == made, "every answered call is in the checkpoint"
    assert made < reference_calls / 2

    resumed = simulator_run(prompts, out, log)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert pq.read_table(out).equals(pq.read_table(reference))
    assert pq.read_schema(out).metadata == pq.read_schema(reference).metadata
    assert calls_in(log) == reference_calls, "the resumed run asked only what the checkpoint lacked"


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(SimulatorConfig(vocab_size=HTTP_VOCAB), api_key=KEY)
    with SimulatorServer(config) as running:
        yield running


def http_run(prompts: Path, out: Path, server: SimulatorServer) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "logprob_cli.cli", "extract", str(prompts), "-o", str(out), "--model", "simulator",
        "--base-url", server.url, "--tokenizer", f"simulator:{HTTP_VOCAB}", "--api-key", KEY, "--method", "topk",
        "-c", "4", "-q",
    ]
    env = {**os.environ, "COLUMNS": "1000"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_http_run_at_once_and_resume_is_identical(tmp_path, server, sig):
    prompts = write_prompts(tmp_path / "p.jsonl", HTTP_PROMPTS)
    reference = tmp_path / "reference.parquet"
    before = server.endpoint.calls
    child = http_run(prompts, reference, server)
    assert child.wait(timeout=600) == 0, child.stderr.read()
    reference_calls = server.endpoint.calls - before

    out, checkpoint = tmp_path / "p.parquet", tmp_path / "p.checkpoint.sqlite"
    before = server.endpoint.calls
    child = http_run(prompts, out, server)
    seconds = interrupt_when(child, lambda: journaled(checkpoint) > 200, sig)
    stderr = child.stderr.read()
    assert child.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert seconds < STOP_SECONDS, f"exit took {seconds:.1f} s after the signal"
    answered = server.endpoint.calls - before
    assert answered < reference_calls / 2

    resumed = http_run(prompts, out, server)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert pq.read_table(out).equals(pq.read_table(reference))
    assert pq.read_schema(out).metadata == pq.read_schema(reference).metadata
    lost = server.endpoint.calls - before - reference_calls  # answered by the server but not journaled
    assert 0 <= lost <= 4, "at most the calls in flight at the signal are asked again"
