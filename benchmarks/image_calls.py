"""Calls per prompt against batch size with `--image auto` (the image learned from the run), against ground truth.

    python benchmarks/image_calls.py [--vocab 100000] [--hidden 64] [--prompts 192] [--method topk+image]

One run of `--prompts` prompts through the built-in simulator (float32, logprobs after the bias for topk+image,
before it for forced+image), one call at a time: the learning then depends only on the prompts before, so the
first n prompts of the run spend exactly what a batch of n prompts would, and one run gives every batch size.
Prints, per batch size n (from 1 to a few times d): the calls per prompt of the batch, what the base method
alone spends, their ratio, and the worst error against ground truth over every token of every row, for the rows
the image produced and for all; then the image's rank, after how many prompts it was learned, and the calls of
one prompt after the warm-up. Takes about 10 minutes at the default V = 100,000 on two busy cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from logprob_cli.api import extract_file
from logprob_cli.endpoints import SimulatedEndpoint, SimulatorConfig
from logprob_cli.io import read_metadata
from logprob_cli.methods import SPECS


def measure(vocab: int, hidden: int, prompts: int, method: str) -> tuple[list[dict], dict]:
    config = SimulatorConfig(vocab_size=vocab, hidden_size=hidden, logprobs_after_bias=method == "topk+image")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.jsonl"
        path.write_text("".join(json.dumps({"id": i, "prompt": f"prompt number {i}"}) + "\n" for i in range(prompts)))
        started = time.perf_counter()
        extract_file(path, method=method, image="auto", simulator=config, concurrency=1)
        seconds = time.perf_counter() - started
        rows = sorted(pq.read_table(Path(folder) / "p.parquet").to_pylist(), key=lambda row: row["id"])
        image = read_metadata(Path(folder) / "p.parquet")["image"]
    truth = SimulatedEndpoint(config)
    errors = [float(np.abs(np.array(r["logprobs"], dtype=float) - truth.true_logprobs(r["prompt"])).max()) for r in rows]
    imaged = [row["method"] == method for row in rows]
    base = method.removesuffix("+image")
    plain = SPECS[base].calls(vocab, 20, 1e-3, truth.limits)
    table = []
    for n in sorted({1, hidden // 2, hidden, image["prompts"], 2 * hidden, 3 * hidden, prompts} - {0}):
        if n > prompts:
            continue
        spent = sum(row["calls"] for row in rows[:n])
        image_errors = [e for e, on in zip(errors[:n], imaged[:n]) if on]
        table.append({
            "batch": n, "calls_per_prompt": spent / n, "plain": plain, "ratio": spent / n / plain,
            "image_rows": sum(imaged[:n]), "error_image_rows": max(image_errors, default=None),
            "error_all_rows": max(errors[:n]),
        })
    after = [row["calls"] for row, on in zip(rows, imaged) if on]
    summary = {"rank": image["rank"], "learned_after": image.get("prompts"), "image_prompt_calls": sorted(set(after)),
               "seconds": seconds, "base": base}
    return table, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=100_000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--method", default="topk+image", choices=["topk+image", "forced+image"])
    args = parser.parse_args()
    table, summary = measure(args.vocab, args.hidden, args.prompts, args.method)
    print(f"{args.method}, --image auto, simulator V = {args.vocab:,}, d = {args.hidden}, one call at a time")
    print(f"| prompts | calls / prompt | {summary['base']} alone | ratio | rows by the image | "
          "worst error, image rows (nats) | worst error, all rows (nats) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in table:
        image_error = "-" if row["error_image_rows"] is None else f"{row['error_image_rows']:.1e}"
        print(f"| {row['batch']:,} | {row['calls_per_prompt']:,.0f} | {row['plain']:,} | {row['ratio']:.3f} | "
              f"{row['image_rows']} | {image_error} | {row['error_all_rows']:.1e} |")
    print(f"image: rank {summary['rank']}, learned after {summary['learned_after']} prompts; a prompt after the "
          f"warm-up: {summary['image_prompt_calls']} calls; {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
