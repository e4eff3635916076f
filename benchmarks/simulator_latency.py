"""What one in-process simulator call costs in a run, beside the simulator's own answer.

    python benchmarks/simulator_latency.py [--vocab 100000,5000] [--method exact]

For each vocabulary size: the simulator's answer to a typical query (what `estimate`
times, `simulator_latency` without the bookkeeping constant), then a real extract_batch of
examples/prompts.jsonl in a temporary directory, its seconds per call, the difference
(the runner's bookkeeping, estimate.IN_PROCESS_BOOKKEEPING) and estimate's predicted time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from logprob_cli.endpoints._base import Prompt
from logprob_cli.run._estimate import IN_PROCESS_BOOKKEEPING, estimate_run, simulator_latency
from logprob_cli.io._jsonl import read_prompts
from logprob_cli.run._runner import extract_batch
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig

EXAMPLES = Path(__file__).parent.parent / "examples" / "prompts.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="100000,5000")
    parser.add_argument("--method", default="exact")
    args = parser.parse_args()
    prompts = read_prompts(str(EXAMPLES))
    for vocab in (int(v) for v in args.vocab.split(",")):
        endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=vocab))
        answer = simulator_latency(endpoint, Prompt(0, 0, "x"), 20) - IN_PROCESS_BOOKKEEPING
        (bill,) = estimate_run(prompts, endpoint, args.method, latency=answer + IN_PROCESS_BOOKKEEPING)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = extract_batch(prompts, Path(tmp) / "out.parquet", endpoint, args.method)
            seconds = time.perf_counter() - start
        per_call = seconds / summary.calls
        print(
            f"V={vocab:,}: answer {answer * 1e3:.3f} ms, run {seconds:.1f} s for {summary.calls:,} calls = "
            f"{per_call * 1e3:.3f} ms a call, bookkeeping {(per_call - answer) * 1e3:.3f} ms; "
            f"estimate predicted {bill.seconds:.1f} s"
        )


if __name__ == "__main__":
    main()
