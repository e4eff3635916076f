"""429s over HTTP: random ones cost little, a limit the server does not announce is waited out.

The end-to-end tests run `logprobs extract` in a child process against a `SimulatorServer`
in this process, sampling the server's answered calls as they come; ground truth is a
fault-free run's output and the limit's own arithmetic (calls / rate). Throughput is
compared within one test, fault-free and faulted on the same machine minutes apart, with
the margin the issue sets (half), so a busy machine slows both alike.
"""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logprob_cli.endpoints._base import EndpointFatal
from logprob_cli.endpoints._ratelimit import RateLimiter
from logprob_cli.server import FAULT_KINDS, ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatorConfig
from logprob_cli.endpoints._transport import RetryPolicy, Transport

VOCAB = 400  # method topk, k = 20: 22 calls a prompt
KEY = "sk-rate-tests"
CONCURRENCY = 16


@dataclass
class Run:
    done: subprocess.CompletedProcess
    table: pa.Table | None  # the output, schema metadata dropped (it names the server's URL)
    calls: int  # completions the server answered
    rate: float  # answered calls a second from 20% to 80% of them
    seconds: float  # from the first answered call to the exit
    server: SimulatorServer


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt number {i}"}) + "\n" for i in range(n)))
    return path


def extract(prompts: Path, output: Path, concurrency: int = CONCURRENCY, **settings) -> Run:
    """`logprobs extract -c concurrency` against a fresh server with these ServerConfig settings,
    its answered calls sampled every 10 ms."""
    config = ServerConfig(SimulatorConfig(vocab_size=VOCAB), api_key=KEY, **settings)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    with SimulatorServer(config) as server:

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic(), server.endpoint.calls))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        command = [
            sys.executable, "-m", "logprob_cli.cli", "extract", str(prompts), "-o", str(output), "--model", "simulator",
            "--base-url", server.url, "--tokenizer", f"simulator:{VOCAB}", "--api-key", KEY, "--method", "topk",
            "-c", str(concurrency), "-q", "--timeout", "2",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "1000"})
        ended = time.monotonic()
        stop.set()
        sampler.join()
    calls = server.endpoint.calls
    table = pq.read_table(output).replace_schema_metadata(None) if output.exists() else None
    started = next(t for t, answered in samples if answered > 0)
    first = next(t for t, answered in samples if answered >= 0.2 * calls)
    last = next(t for t, answered in samples if answered >= 0.8 * calls)
    return Run(done, table, calls, 0.6 * calls / max(last - first, 1e-9), ended - started, server)


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param({"fault_rate": 0.1, "faults": FAULT_KINDS, "stall": 0.3}, id="10%-of-five-kinds"),
        pytest.param({"fault_rate": 0.075, "faults": ("429",)}, id="7.5%-429s"),
    ],
)
def test_random_faults_with_429s_keep_over_half_the_fault_free_throughput(tmp_path, faults):
    """The five kinds: 429 (retry after 50 ms, no rate headers), 500, a 0.3 s stall, a cut
    connection, a truncated body. 7.5% 429s alone once cut the run to 1/20 of this rate."""
    prompts = write_prompts(tmp_path / "p.jsonl", 40)  # 882 calls
    free = extract(prompts, tmp_path / "free.parquet", latency=0.05)
    faulty = extract(prompts, tmp_path / "faulty.parquet", latency=0.05, fault_seed=9, **faults)
    assert free.done.returncode == 0, free.done.stderr
    assert faulty.done.returncode == 0, faulty.done.stderr
    assert faulty.table.equals(free.table)
    assert all(faulty.server.faults_injected[kind] > 0 for kind in faults["faults"]), faulty.server.faults_injected
    print(f"\nfault-free {free.rate:.0f} calls/s, faulted {faulty.rate:.0f} calls/s "
          f"({faulty.rate / free.rate:.2f}); faults {faulty.server.faults_injected}")
    assert faulty.rate > 0.5 * free.rate


def test_a_limit_the_server_does_not_announce_is_waited_out(tmp_path):
    """600 requests a minute, told only by 429 + retry-after, and 64 calls in flight: 332 calls,
    33 times the one-second burst, finish at about the pace the limit allows, with no prompt failed."""
    rpm = 600
    n = 15
    run = extract(write_prompts(tmp_path / "p.jsonl", n), tmp_path / "p.parquet", concurrency=64, latency=0.01,
                  rpm=rpm, rate_headers=False)
    assert run.done.returncode == 0, run.done.stderr
    assert run.table.num_rows == n and "failed" not in run.done.stderr
    allowed = (run.calls - rpm / 60) / (rpm / 60)  # a one-second burst, then rpm/60 a second
    print(f"\n{run.calls} calls in {run.seconds:.1f} s (the limit allows {allowed:.1f} s); "
          f"{run.server.rejected} requests refused with 429")
    assert run.server.rejected > 0, "the client must have met the limit"
    assert run.seconds < 1.6 * allowed


def test_the_server_can_keep_its_limits_to_itself():
    import urllib.error
    import urllib.request

    body = json.dumps({"model": "simulator", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=VOCAB), rpm=60, rate_headers=False)) as server:
        statuses = []
        for _ in range(2):  # a bucket of one request: the second is refused
            request = urllib.request.Request(server.url + "/chat/completions", body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request) as response:
                    statuses.append((response.status, response.headers))
            except urllib.error.HTTPError as error:
                statuses.append((error.code, error.headers))
    assert [status for status, _ in statuses] == [200, 429]
    for _, headers in statuses:
        assert not [name for name in headers if name.lower().startswith("x-ratelimit")]
    assert statuses[1][1]["retry-after-ms"]


def post_many(server: SimulatorServer, n: int, retry: RetryPolicy) -> tuple[list, RateLimiter]:
    """`n` concurrent chat completions through one Transport; returns their results (or exceptions)."""
    limiter = RateLimiter()
    body = {"model": "simulator", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

    async def go() -> list:
        transport = Transport(server.url, KEY, limiter=limiter, retry=retry)
        try:
            calls = [transport.post("/chat/completions", body, 1, lambda answer: answer["id"]) for _ in range(n)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await transport.aclose()

    return asyncio.run(go()), limiter


def test_429s_do_not_use_up_the_retries_of_a_call():
    """Two tries per call, yet 30 calls at once against a bucket of 10 a second all get through."""
    config = ServerConfig(SimulatorConfig(vocab_size=VOCAB), api_key=KEY, rpm=600, rate_headers=False)
    with SimulatorServer(config) as server:
        results, limiter = post_many(server, 30, RetryPolicy(attempts=2))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert server.endpoint.calls == 30
    assert limiter.throttles == server.rejected > 0
    assert limiter.retries == limiter.throttles  # every 429 was retried, and counted


def test_a_limit_that_outlasts_the_patience_stops_the_run_with_one_message():
    """One request a minute: the second call is asked to wait ~60 s, past a 5 s patience."""
    config = ServerConfig(SimulatorConfig(vocab_size=VOCAB), api_key=KEY, rpm=1, rate_headers=False)
    with SimulatorServer(config) as server:
        started = time.monotonic()
        results, _ = post_many(server, 2, RetryPolicy(patience=5.0))
    assert time.monotonic() - started < 5  # not waited for nothing
    fatal = [r for r in results if isinstance(r, EndpointFatal)]
    assert len(fatal) == 1 and "429" in str(fatal[0]) and "run the same command later" in str(fatal[0])
