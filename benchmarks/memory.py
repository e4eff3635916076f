"""Peak memory of a run against the number of prompts, at a 200k vocabulary (it must stay flat).

    python benchmarks/memory.py [--prompts 100,300,1000] [--vocab 200000] [--concurrency 16]

Each size runs in a child process of its own: extract_batch (method direct: the whole
vector in one call) on the in-process simulator returning the whole vocabulary
(SimulatorConfig(vocab_size=V, top_logprobs_cap=V)), with the real checkpoint and Parquet
output in a temporary directory that is deleted afterwards. The child reports its peak
resident set (ru_maxrss) before the run (imports and the simulated model, whose V x 64
float32 weights alone are V * 256 bytes) and after it.

Disk: the Parquet file holds V float32 per prompt and the checkpoint the answer (V ids and
V values, 16 bytes per entry) and the result (V float32), and each rewrite of the Parquet
file needs room for a second copy: about 28 * V bytes per prompt in all (5.6 MB at
V = 200k). Sizes are scaled down, with a message, when the free disk space is short.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import machine_note, prompts

DISK_BYTES_PER_ENTRY = 28  # per prompt and vocabulary entry: Parquet 4, answer 16, result 4, rewrite copy 4


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(n: int, vocab: int, concurrency: int, directory: Path) -> None:
    """Run n prompts and print one JSON line: peaks, seconds, file sizes."""
    from logprob_cli.run._runner import checkpoint_path, extract_batch
    from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig

    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=vocab, top_logprobs_cap=vocab))
    output = directory / "out.parquet"
    before = peak_mb()
    started = time.perf_counter()
    summary = extract_batch(prompts(n), output, endpoint, "direct", concurrency=concurrency)
    seconds = time.perf_counter() - started
    if summary.failures or summary.rows_written != n:
        raise SystemExit(f"run incomplete: {summary.rows_written} rows, failures {summary.failures}")
    journal = checkpoint_path(output)
    checkpoint = sum(p.stat().st_size for p in directory.glob(journal.name + "*"))
    print(json.dumps({"before": before, "peak": peak_mb(), "seconds": seconds,
                      "parquet": output.stat().st_size, "checkpoint": checkpoint}))


def measure(n: int, vocab: int, concurrency: int) -> dict:
    """One child process for n prompts, in a fresh temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--child", str(n), "--vocab", str(vocab),
                   "--concurrency", str(concurrency), "--dir", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the child for {n} prompts failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def fit_to_disk(sizes: list[int], vocab: int) -> list[int]:
    """The sizes, scaled down (with a message) so the largest fits in the free space of the temp directory."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    need = max(sizes) * vocab * DISK_BYTES_PER_ENTRY
    print(f"disk: the largest run needs about {need / 1e9:.1f} GB; {free / 1e9:.1f} GB free in {tempfile.gettempdir()}")
    if need <= 0.8 * free:
        return sizes
    scale = 0.8 * free / need
    scaled = sorted({max(1, int(n * scale)) for n in sizes})
    print(f"not enough free disk: prompts scaled by {scale:.2f} to {scaled}")
    return scaled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="100,300,1000", help="comma-separated sizes, one child process each")
    parser.add_argument("--vocab", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.vocab, args.concurrency, args.dir)
        return
    sizes = fit_to_disk(sorted(int(n) for n in args.prompts.split(",")), args.vocab)
    print(f"peak memory: method direct, vocabulary {args.vocab:,} (whole vector in one call), in-process simulator, "
          f"concurrency {args.concurrency}; {machine_note()}\n")
    print(f"{'prompts':>7} {'peak MB':>8} {'before run MB':>13} {'run MB':>7} {'Parquet MB':>10} "
          f"{'checkpoint MB':>13} {'s':>6}")
    for n in sizes:
        r = measure(n, args.vocab, args.concurrency)
        print(f"{n:>7,} {r['peak']:>8.0f} {r['before']:>13.0f} {r['peak'] - r['before']:>7.0f} "
              f"{r['parquet'] / 1e6:>10.0f} {r['checkpoint'] / 1e6:>13.0f} {r['seconds']:>6.1f}", flush=True)
    print("\npeak: the child's ru_maxrss; before run: after imports and building the simulated model; "
          "run MB: what the run added to the peak, including the simulator's own cache of its last 65 prompts "
          f"(12 bytes per token each: {65 * 12 * args.vocab / 1e6:.0f} MB here, constant beyond 65 prompts).")


if __name__ == "__main__":
    main()
