"""Throughput under injected faults and 429s, and a run against a rate limit the server never announces.

    python benchmarks/rate_recovery.py [--latency 0.05] [--concurrency 16] [--prompts 40]
                                       [--rpm 600] [--limited-prompts 15] [--limited-concurrency 64]
                                       [--only NAME,NAME]

Each row runs `logprobs extract` (method topk, k=20, vocabulary --vocab) in a child process
against a `SimulatorServer` in this process that sleeps --latency seconds per request, and
samples the server's answered-call count as it goes. Rows:

- fault-free: the reference, whose output every other row must equal;
- faults 10%: 10% of requests faulted, the five kinds drawn uniformly (429 asking for 50 ms,
  500, a --stall-second stall against --timeout 2, a cut connection, a truncated body);
- faults 10% no 429: the same without the 429s; 429s 7.5%: injected 429s only (issue 8);
- untold limit: --rpm requests a minute enforced with 429 + retry-after and no x-ratelimit-*
  headers, on --limited-prompts prompts at --limited-concurrency (the calls are tens of
  times the limit's one-second burst), server latency 0.01 s.

calls/s is the steady rate over the middle of the run (from 20% to 80% of its answered
calls), "of free" that rate over the fault-free row's. For the limited row, "ideal s" is
the time the limit allows for the run's calls (a one-second burst, then rpm/60 a second),
timed from the first call to the exit. 429s: the server's rejections plus injected 429s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from logprob_cli.server import FAULT_KINDS, ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatorConfig

KEY = "sk-bench"


@dataclass
class Row:
    name: str
    settings: dict = field(default_factory=dict)  # ServerConfig fields
    limited: bool = False  # the untold-limit row: its own prompt count


def sample_calls(server: SimulatorServer, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    """(time, answered calls) every 10 ms until `stop`."""
    while not stop.is_set():
        samples.append((time.monotonic(), server.endpoint.calls))
        time.sleep(0.01)


def steady_rate(samples: list[tuple[float, int]], total: int) -> float:
    """Calls a second between the moments the server had answered 20% and 80% of `total`."""
    first = next(t for t, calls in samples if calls >= 0.2 * total)
    last = next(t for t, calls in samples if calls >= 0.8 * total)
    return 0.6 * total / max(last - first, 1e-9)


def run_row(row: Row, args: argparse.Namespace, workdir: Path) -> dict:
    n = args.limited_prompts if row.limited else args.prompts
    concurrency = args.limited_concurrency if row.limited else args.concurrency
    latency = 0.01 if row.limited else args.latency
    prompts = workdir / f"{row.name.replace(' ', '_')}.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"prompt {i}"}) + "\n" for i in range(n)))
    output = prompts.with_suffix(".parquet")
    config = ServerConfig(SimulatorConfig(vocab_size=args.vocab), api_key=KEY, latency=latency, **row.settings)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    with SimulatorServer(config) as server:
        sampler = threading.Thread(target=sample_calls, args=(server, stop, samples), daemon=True)
        sampler.start()
        command = [
            sys.executable, "-m", "logprob_cli.cli", "extract", str(prompts), "-o", str(output), "--model", "simulator",
            "--base-url", server.url, "--tokenizer", f"simulator:{args.vocab}", "--api-key", KEY, "--method", "topk",
            "-c", str(concurrency), "-q", "--timeout", "2",
        ]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "1000"})
        ended = time.monotonic()
        stop.set()
        sampler.join()
        calls = server.endpoint.calls
        injected = server.faults_injected.get("429", 0)
        rejected = server.rejected
    started = next(t for t, c in samples if c > 0)
    failed = sum("failed" in line for line in done.stderr.splitlines())
    return {
        "calls": calls, "rate": steady_rate(samples, calls), "seconds": ended - started, "exit": done.returncode,
        "failed": failed, "429s": injected + rejected, "output": output, "stderr": done.stderr.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server sleeps per request")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=40, help="prompts of the fault rows (22 calls each at --vocab 400)")
    parser.add_argument("--vocab", type=int, default=400)
    parser.add_argument("--stall", type=float, default=0.3, help="seconds a timeout fault holds its request")
    parser.add_argument("--rpm", type=float, default=600, help="the untold limit, requests a minute")
    parser.add_argument("--limited-prompts", type=int, default=15, help="prompts of the untold-limit row")
    parser.add_argument("--limited-concurrency", type=int, default=64, help="-c of the untold-limit row")
    parser.add_argument("--only", default="", help="comma-separated row names to run (the fault-free one always runs)")
    args = parser.parse_args()
    rows = [
        Row("fault-free"),
        Row("faults 10%", {"fault_rate": 0.1, "stall": args.stall, "fault_seed": 9}),
        Row("faults 10% no 429", {"fault_rate": 0.1, "stall": args.stall, "fault_seed": 9,
                                  "faults": tuple(k for k in FAULT_KINDS if k != "429")}),
        Row("429s 7.5%", {"fault_rate": 0.075, "faults": ("429",), "fault_seed": 9}),
        Row("untold limit", {"rpm": args.rpm, "rate_headers": False}, limited=True),
    ]
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    rows = [row for row in rows if row.name == "fault-free" or not wanted or row.name in wanted]
    print(f"rate recovery: server latency {args.latency:g} s, concurrency {args.concurrency}, vocabulary "
          f"{args.vocab:,}, method topk k=20, stall {args.stall:g} s against --timeout 2; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print(f"{'row':<18} {'calls':>6} {'calls/s':>8} {'of free':>7} {'429s':>5} {'seconds':>8} {'ideal s':>8} "
          f"{'failed':>6} {'exit':>4} {'output':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        free = None
        for row in rows:
            r = run_row(row, args, Path(tmp))
            if free is None:
                free = r
            same = "-" if row.limited else "=" if _same(r["output"], free["output"]) else "DIFFERS"
            ideal = (max(0.0, r["calls"] - args.rpm / 60) / (args.rpm / 60)) if row.limited else math.nan
            print(f"{row.name:<18} {r['calls']:>6} {r['rate']:>8.1f} {r['rate'] / free['rate']:>7.2f} {r['429s']:>5} "
                  f"{r['seconds']:>8.1f} {ideal:>8.1f} {r['failed']:>6} {r['exit']:>4} {same:>9}", flush=True)
            if r["exit"] != 0:
                print("   ", r["stderr"][-500:].replace("\n", "\n    "))
    print("\ncalls/s: answered calls a second from 20% to 80% of the run's calls; of free: over the fault-free row. "
          "output '=': the Parquet values equal the fault-free run's (the untold-limit row has other prompts). "
          "ideal s: (calls - rpm/60) / (rpm/60), seconds: from the first answered call to the exit.")


def _same(a: Path, b: Path) -> bool:
    """Same rows and values (schema metadata differs: it names the server's URL)."""
    if not (a.exists() and b.exists()):
        return False
    return pq.read_table(a).replace_schema_metadata(None).equals(pq.read_table(b).replace_schema_metadata(None))


if __name__ == "__main__":
    main()
