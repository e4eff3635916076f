"""Calls per second against a remote-like API, against the ideal min(concurrency / latency, rpm / 60).

    python benchmarks/throughput.py [--latency 0.1] [--concurrency 32,64] [--rpm 12000] [--calls 2000]

Each row starts `logprobs serve` (the HTTP simulator, vocabulary --vocab, --latency seconds
slept per request, optionally a requests-per-minute limit) in its own process and runs
`extract_batch` (method topk, k = --top-k) in this one through `OpenAIEndpoint`. Rows:
latency binds (no limit, or a limit above concurrency / latency), and the limit binds
(the client told --rpm, or left to learn it from the x-ratelimit headers and 429s).

Measured over a steady-state window: from the --warmup-th to the (--warmup + --calls)-th
call the runner journals; the prompts give 25% more calls than that, so the window ends
before the queue drains. Excluded: start-up (imports, server start, the 2-call token
check, connection set-up, the first --warmup calls, which hold the limit's initial burst
of one second's worth) and the tail (the last prompts finishing at falling concurrency).
Client CPU is this process's time.process_time (every thread: event loop, journal,
Parquet writer) per call; server CPU is the server process's user + system time, per
request it received (429s included) and as a share of one core: a pure-Python server is
held to about one core by the GIL, so near 100% it, not the client, sets the pace. The
steal column is the share of the machine's CPU time the hypervisor took in the window: on
a shared VM, rows measured under steal show the machine, not the tool.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import ServedSimulator, Window, machine_jiffies, machine_note, prompts

from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints._ratelimit import RateLimiter
from logprob_cli.run._runner import extract_batch
from logprob_cli.endpoints._vocabulary import load_vocabulary

SERVER_BOUND = 0.9  # server CPU share of one core above which the server is the bottleneck


@dataclass
class Row:
    concurrency: int
    server_rpm: float  # 0: no limit
    client_told: bool  # the client is given --rpm equal to the server's


def run_row(row: Row, args: argparse.Namespace) -> dict:
    """One server process, one extract_batch; the window's rates, counts and CPU."""
    per_prompt = math.ceil((args.vocab - args.top_k) / (args.top_k - 1)) + 2  # topk's calls per prompt
    n_prompts = math.ceil((args.warmup + args.calls) * 1.25 / per_prompt) + 1
    with ServedSimulator(args.vocab, latency=args.latency, rpm=row.server_rpm) as server, \
            tempfile.TemporaryDirectory() as tmp:
        endpoint = OpenAIEndpoint(
            "simulator", load_vocabulary(f"simulator:{args.vocab}"), base_url=server.url, api_key="any",
            limiter=RateLimiter(rpm=row.server_rpm if row.client_told else None),
        )
        transport = endpoint.transport

        def measure() -> dict[str, float]:
            return {
                "wall": time.perf_counter(), "cpu": time.process_time(), "server_cpu": server.cpu_seconds(),
                "throttles": transport.limiter.throttles, "retries": transport.retries, **machine_jiffies(),
            }

        window = Window(args.warmup, args.warmup + args.calls, measure)
        started = time.perf_counter()
        summary = extract_batch(
            prompts(n_prompts), Path(tmp) / "out.parquet", endpoint, "topk", top_k=args.top_k,
            concurrency=row.concurrency, progress=window,
        )
        total = time.perf_counter() - started
        if summary.failures:
            raise RuntimeError(f"{len(summary.failures)} prompts failed, e.g. {next(iter(summary.failures.values()))}")
    d = window.delta()
    rate = args.calls / d["wall"]
    limit = row.server_rpm / 60 if row.server_rpm else math.inf
    ideal = min(row.concurrency / args.latency, limit)
    requests = args.calls + d["throttles"]  # what the server received in the window
    return {
        "rate": rate, "ideal": ideal, "binds": "rpm" if limit < row.concurrency / args.latency else "latency",
        "throttles": d["throttles"], "run_throttles": transport.limiter.throttles, "retries": d["retries"],
        "cpu_ms": 1000 * d["cpu"] / args.calls, "client_share": d["cpu"] / d["wall"],
        "server_share": d["server_cpu"] / d["wall"], "server_ms": 1000 * d["server_cpu"] / requests,
        "seconds": total, "steal": d["steal"] / d["total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.1, help="seconds the server sleeps per request")
    parser.add_argument("--concurrency", default="32,64", help="comma-separated; the rpm rows use the largest")
    parser.add_argument("--rpm", type=float, default=12_000, help="the server's limit in the rpm-bound rows")
    parser.add_argument("--calls", type=int, default=2000, help="calls measured per row")
    parser.add_argument("--warmup", type=int, default=500, help="calls skipped at the start of each row")
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()
    levels = sorted(int(c) for c in args.concurrency.split(","))
    low, high = levels[0], levels[-1]
    above = 2 * 60 * low / args.latency  # a limit twice what the latency allows at the lowest concurrency
    rows = [Row(c, 0, False) for c in levels] + [
        Row(low, above, False), Row(high, args.rpm, True), Row(high, args.rpm, False),
    ]
    print(f"throughput: server latency {args.latency:g} s, vocabulary {args.vocab:,}, method topk k={args.top_k}, "
          f"calls {args.warmup + 1:,} to {args.warmup + args.calls:,} of each row measured; {machine_note()}\n"
          "excluded: start-up (server start, the 2-call token check, connections), the first "
          f"{args.warmup:,} calls (they hold a rate limit's initial one-second burst) and the calls after the window "
          "(the last prompts finishing at falling concurrency)\n")
    header = (f"{'conc':>4} {'server rpm':>10} {'client --rpm':>12} {'binds':>7} {'calls/s':>8} {'ideal':>7} "
              f"{'ratio':>6} {'429s':>5} {'(run)':>5} {'retries':>7} {'client CPU ms/call':>18} {'client CPU':>10} "
              f"{'server CPU':>10} {'server ms/req':>13} {'run s':>6} {'steal':>5}")
    print(header)
    notes = []
    for row in rows:
        r = run_row(row, args)
        limit = f"{row.server_rpm:,.0f}" if row.server_rpm else "-"
        told = limit if row.client_told else ("not told" if row.server_rpm else "-")
        print(
            f"{row.concurrency:>4} {limit:>10} {told:>12} {r['binds']:>7} {r['rate']:>8.1f} "
            f"{r['ideal']:>7.1f} {r['rate'] / r['ideal']:>6.3f} {r['throttles']:>5} {r['run_throttles']:>5} "
            f"{r['retries']:>7} {r['cpu_ms']:>18.3f} {r['client_share']:>10.0%} {r['server_share']:>10.0%} "
            f"{r['server_ms']:>13.3f} {r['seconds']:>6.1f} {r['steal']:>5.0%}",
            flush=True,
        )
        if r["server_share"] > SERVER_BOUND:
            notes.append(f"concurrency {row.concurrency}: the server used {r['server_share']:.0%} of a core: "
                         "it is the bottleneck there, not the client")
    print("\nclient CPU / server CPU: share of one core over the window. 429s, retries: seen by the client "
          "(limiter.throttles, transport.retries) in the window; (run): 429s over the whole row. run s: the whole "
          "row, start-up included. steal: the share of the machine's CPU time the hypervisor took in the window "
          "(/proc/stat); above a few %, every figure in the row is the machine's, not the tool's.")
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()
