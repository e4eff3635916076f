"""Calls per prompt and accuracy of each method against simulator ground truth.

    python benchmarks/calls_per_prompt.py [--vocab 100000] [--prompts 3] [--methods exact,topk,bisection]

Prints one row per (method, k): mean calls per prompt, the ideal for that method
(exact: ceil(V/k); topk: ceil(V/(k-1)); bisection: calls per token, ~34 for one token at a
time), and the worst absolute error in nats for tokens with log p > -20, on the float32
simulator.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from logprob_cli.methods import METHODS, Context, drive
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig


def measure(method: str, vocab: int, k: int, eps: float, prompts: list[str]) -> dict:
    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=vocab))
    ctx = Context(vocab, endpoint.limits, top_k=k, eps=eps)
    calls, errors, started = [], [], time.perf_counter()
    for prompt in prompts:
        result, n = drive(METHODS[method](ctx), lambda q: endpoint.answer(prompt, q))
        truth = endpoint.true_logprobs(prompt)
        mask = truth > -20
        calls.append(n)
        errors.append(float(np.nanmax(np.abs(result.logprobs[mask] - truth[mask]))))
    return {"calls": float(np.mean(calls)), "error": max(errors), "seconds": (time.perf_counter() - started) / len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=100_000)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--methods", default="exact,topk,bisection")
    parser.add_argument("--eps", type=float, default=1e-3)
    args = parser.parse_args()
    prompts = [f"benchmark prompt {i}" for i in range(args.prompts)]
    v = args.vocab
    print(f"vocabulary {v:,}, {args.prompts} prompts, float32 simulator\n")
    print(f"{'method':<10} {'k':>3} {'calls/prompt':>13} {'ideal':>8} {'ratio':>6} {'max err (nats)':>15} {'s/prompt':>9}")
    for method in args.methods.split(","):
        if method == "bisection":
            row = measure(method, v, 20, args.eps, prompts)
            per_token = row["calls"] / v
            print(
                f"{method:<10} {'-':>3} {row['calls']:>13,.0f} {'':>8} {'':>6} {row['error']:>15.2e} {row['seconds']:>9.1f}"
                f"   = {per_token:.2f} calls per token at eps {args.eps:g}"
            )
            continue
        for k in (5, 20):
            row = measure(method, v, k, args.eps, prompts)
            ideal = math.ceil(v / k) if method == "exact" else math.ceil(v / (k - 1))
            print(
                f"{method:<10} {k:>3} {row['calls']:>13,.0f} {ideal:>8,} {row['calls'] / ideal:>6.3f} "
                f"{row['error']:>15.2e} {row['seconds']:>9.1f}"
            )


if __name__ == "__main__":
    main()
