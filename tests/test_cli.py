"""End to end: the `logprobs` command on the built-in simulator, in a subprocess as a user runs it."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from logprob_cli.run._journal import Journal
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig

COUNTER = Path(__file__).parent / "tools" / "counting_logprobs.py"
ROOT = Path(__file__).parent.parent


def logprobs(*args, calls: Path, timeout=300, **kw):
    """Run the CLI with simulator calls counted into `calls`; returns the CompletedProcess."""
    env = {**os.environ, "CALL_LOG": str(calls)}
    return subprocess.run(
        [sys.executable, str(COUNTER), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout, **kw
    )


def count(calls: Path) -> int:
    return calls.stat().st_size if calls.exists() else 0


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt number {i}", "n": i}) + "\n" for i in range(n)))
    return path


def test_example_run_writes_one_full_vector_per_prompt(tmp_path):
    out = tmp_path / "out.parquet"
    run = logprobs("extract", ROOT / "examples" / "prompts.jsonl", "--method", "exact", "-o", out, calls=tmp_path / "c")
    assert run.returncode == 0, run.stderr
    assert "simulated endpoint" in run.stderr
    table = pq.read_table(out)
    lines = (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()
    assert table.num_rows == len(lines)
    vocab = SimulatorConfig().vocab_size
    for vector in table.column("logprobs").to_pylist():
        probs = np.exp(np.array(vector, dtype=np.float64))
        assert probs.size == vocab
        assert abs(probs.sum() - 1) < 1e-5
    meta = json.loads(pq.read_schema(out).metadata[b"logprob_cli"])
    assert meta["endpoint"]["backend"] == "simulator"
    assert meta["vocabulary"]["size"] == vocab
    assert table.column("model").to_pylist() == ["simulator"] * len(lines)


def test_vectors_match_ground_truth(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "p.parquet"
    run = logprobs("extract", prompts, "--sim", "vocab_size=5000", "-q", calls=tmp_path / "c")
    assert run.returncode == 0, run.stderr
    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=5000))
    rows = pq.read_table(out).to_pylist()
    for row in rows:
        truth = sim.true_logprobs(f"prompt number {row['n']}")
        assert np.abs(np.array(row["logprobs"]) - truth).max() < 1e-4
        assert row["method"] == "topk", "auto picks topk where logprobs move with the bias"
    probe = json.loads(pq.read_schema(out).metadata[b"logprob_cli"])["probe"]
    assert sum(row["calls"] for row in rows) + probe["calls"] + probe["rejected_calls"] == count(tmp_path / "c")


def test_malformed_line_spends_no_calls(tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": \n')
    run = logprobs("extract", prompts, calls=tmp_path / "c")
    assert run.returncode != 0
    assert "line 2" in run.stderr
    assert "Traceback" not in run.stderr
    assert count(tmp_path / "c") == 0
    assert not (tmp_path / "bad.parquet").exists()


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    args = ["--sim", "vocab_size=20000", "--top-k", "5", "-c", "4", "-q"]
    reference = tmp_path / "ref.parquet"
    assert logprobs("extract", prompts, "-o", reference, *args, calls=tmp_path / "ref-calls").returncode == 0
    uninterrupted = count(tmp_path / "ref-calls")

    out = tmp_path / "run.parquet"
    env = {**os.environ, "CALL_LOG": str(tmp_path / "calls")}
    child = subprocess.Popen([sys.executable, str(COUNTER), "extract", prompts, "-o", out, *args], env=env)
    journal = tmp_path / "run.checkpoint.sqlite"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if journal.exists():
            with sqlite3.connect(journal) as db:
                try:
                    if db.execute("select count(*) from answers").fetchone()[0] > 6000:
                        break
                except sqlite3.OperationalError:
                    pass
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    first = count(tmp_path / "calls")
    assert 0 < first < uninterrupted

    resumed = logprobs("extract", prompts, "-o", out, *args, calls=tmp_path / "calls")
    assert resumed.returncode == 0, resumed.stderr
    assert pq.read_table(out).equals(pq.read_table(reference))
    assert pq.read_schema(out).metadata == pq.read_schema(reference).metadata
    assert count(tmp_path / "calls") - uninterrupted <= 4  # at most the calls in flight


def test_rerun_with_other_settings_is_refused(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    assert logprobs("extract", prompts, "--sim", "vocab_size=2000", "-q", calls=tmp_path / "c").returncode == 0
    spent = count(tmp_path / "c")
    again = logprobs("extract", prompts, "--sim", "vocab_size=2000", "--method", "exact", calls=tmp_path / "c")
    assert again.returncode == 1
    assert "other settings" in again.stderr and "--fresh" in again.stderr
    assert count(tmp_path / "c") == spent
    fresh = logprobs("extract", prompts, "--sim", "vocab_size=2000", "--method", "exact", "--fresh", "-q", calls=tmp_path / "c")
    assert fresh.returncode == 0, fresh.stderr
    assert pq.read_table(tmp_path / "p.parquet").column("method").to_pylist() == ["exact"]


def test_finished_run_repeated_spends_nothing(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    assert logprobs("extract", prompts, "--sim", "vocab_size=2000", "-q", calls=tmp_path / "c").returncode == 0
    spent = count(tmp_path / "c")
    before = pq.read_table(tmp_path / "p.parquet")
    again = logprobs("extract", prompts, "--sim", "vocab_size=2000", "-q", calls=tmp_path / "c")
    assert again.returncode == 0, again.stderr
    assert count(tmp_path / "c") == spent
    assert pq.read_table(tmp_path / "p.parquet").equals(before)


def test_second_process_on_the_same_checkpoint_is_refused(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    with Journal.open(tmp_path / "p.checkpoint.sqlite", {"anything": 1}):
        run = logprobs("extract", prompts, "--sim", "vocab_size=2000", calls=tmp_path / "c")
    assert run.returncode == 1
    assert "in use" in run.stderr
    assert count(tmp_path / "c") == 0


def test_pre_bias_endpoint_stops_with_advice(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    run = logprobs(
        "extract", prompts, "--method", "topk", "--sim", "vocab_size=2000", "--sim", "logprobs_after_bias=false",
        calls=tmp_path / "c",
    )
    assert run.returncode == 1
    assert "bisection" in run.stderr and "Traceback" not in run.stderr
    assert count(tmp_path / "c") <= 10


def test_user_mistakes_are_one_line_errors(tmp_path):
    missing = logprobs("extract", tmp_path / "nope.jsonl", calls=tmp_path / "c")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "nope.jsonl" in missing.stderr
    bad_switch = logprobs("extract", ROOT / "examples" / "prompts.jsonl", "--sim", "colour=blue", "-o", tmp_path / "x.parquet", calls=tmp_path / "c")
    assert bad_switch.returncode == 2 and "vocab_size" in bad_switch.stderr
    stdin_without_output = logprobs("extract", "-", calls=tmp_path / "c", input="")
    assert stdin_without_output.returncode == 2 and "--output" in stdin_without_output.stderr
    not_parquet = tmp_path / "x.txt"
    not_parquet.write_text("hello")
    inspect = logprobs("inspect", not_parquet, calls=tmp_path / "c")
    assert inspect.returncode == 1 and "Traceback" not in inspect.stderr
    assert count(tmp_path / "c") == 0


def test_stdin_input_and_inspect(tmp_path):
    out = tmp_path / "s.parquet"
    run = logprobs("extract", "-", "-o", out, "--sim", "vocab_size=2000", "-q", calls=tmp_path / "c", input='{"prompt": "hi"}\n')
    assert run.returncode == 0, run.stderr
    shown = logprobs("inspect", out, calls=tmp_path / "c")
    assert shown.returncode == 0, shown.stderr
    assert "entropy" in shown.stdout.lower()


@pytest.mark.parametrize(
    "switches, method",
    [
        ([], "topk"),
        (["logprobs_after_bias=false"], "forced"),
        (["logprobs_after_bias=false", "sampled_logprob=sentinel"], "bisection"),
        (["logprobs_after_bias=false", "bias_steers_sampling=false"], "visible"),
    ],
)
def test_auto_picks_the_method_the_endpoint_supports(tmp_path, switches, method):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    sim_args = [a for s in ["vocab_size=1500", *switches] for a in ("--sim", s)]
    run = logprobs("extract", prompts, *sim_args, "--eps", "1e-2", calls=tmp_path / "c")
    assert run.returncode == 0, run.stderr
    assert f"method: {method}" in run.stderr
    (row,) = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert row["method"] == method
    truth = SimulatedEndpoint(SimulatorConfig(vocab_size=1500)).true_logprobs("prompt number 0")
    values = np.array([np.nan if v is None else v for v in row["logprobs"]])
    known = ~np.isnan(values)
    tolerance = 2e-2 if method == "bisection" else 1e-4
    assert np.abs(values[known] - truth[known]).max() < tolerance
    if method == "visible":
        assert known.sum() == 20 and row["unrecovered_count"] == 1480
        assert row["unrecovered_mass_bound"] >= 1 - np.exp(truth[known]).sum() - 1e-6
        assert (truth[~known] <= np.array(row["unrecovered_upper_bounds"]) + 1e-6).all()
    else:
        assert known.all()


def test_serving_banner_tells_the_limits_and_faults_it_serves_with():
    from logprob_cli.cli import serving_banner
    from logprob_cli.server import ServerConfig

    config = ServerConfig(
        SimulatorConfig(vocab_size=5000), "m", rpm=60, tpm=1000.5, rate_headers=False, fault_rate=0.25,
        faults=("cut", "timeout"),
    )
    assert serving_banner(config, "http://127.0.0.1:9/v1").splitlines() == [
        "serving the simulator (5,000 tokens) as model 'm' at http://127.0.0.1:9/v1",
        "rate limits: 60 requests and 1,000.5 tokens per minute (not announced)",
        "faults: 25.0% of completions (cut, timeout)",
        "try: logprobs extract examples/prompts.jsonl --model m --base-url http://127.0.0.1:9/v1 "
        "--tokenizer simulator:5000 --api-key any",
    ]
    quiet = serving_banner(ServerConfig(SimulatorConfig(vocab_size=5000), "m", rpm=60), "u").splitlines()
    assert quiet[1] == "rate limits: 60 requests per minute" and not quiet[2].startswith("faults")
