"""Calls per chosen token (targets) with bisection on OpenAI's contract, against simulator ground truth.

    python benchmarks/target_calls.py [--vocab 100000] [--prompts 10] [--targets 1,3,10] [--eps 1e-3,1e-2,1e-1] [--draws 128] [--auto]

The simulator answers as OpenAI documents: pre-bias top-20, -9999 for a forced token outside
it, and a bias that steers sampling, in float32; with --draws M, also OpenAI's `n`: M choices a
request at a temperature, which bisection uses to locate the targets before it proves them. Per prompt, `targets` tokens ranked 50 to
5,000 are searched. With --auto the plan runs as `auto` runs it after its probe: the probe's findings
stand for the bias check's second call (Context.bias_observed), so a prompt has 1 fixed call, not 2.
Prints per (targets, eps): mean calls per prompt, calls per target beyond
those fixed calls, the spec's prediction (what `estimate` says), the information bound of greedy calls (one token a call; draws are not bound by it)
n ln(2B / eps) / ln(n + 1) per target, and the worst error against ground truth.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from logprob_cli.endpoints import SimulatedEndpoint, SimulatorConfig
from logprob_cli.methods import METHODS, SPECS, Context, drive


def measure(vocab: int, prompts: int, targets: int, eps: float, draws: int = 1, auto: bool = False) -> dict:
    config = SimulatorConfig(vocab_size=vocab, logprobs_after_bias=False, sampled_logprob="sentinel", max_draws=draws)
    endpoint = SimulatedEndpoint(config)
    calls, worst = [], 0.0
    for p in range(prompts):
        prompt = f"prompt {p}"
        truth = endpoint.true_logprobs(prompt)
        ranked = np.argsort(-truth)[50:5000]
        chosen = tuple(int(i) for i in np.random.default_rng(p).choice(ranked, targets, replace=False))
        ctx = Context(vocab, endpoint.limits, eps=eps, targets=chosen, bias_observed=(True, False) if auto else None)
        result, n = drive(METHODS["bisection"](ctx), lambda q: endpoint.answer(prompt, q))
        calls.append(n)
        worst = max(worst, float(np.abs(result.logprobs[list(chosen)] - truth[list(chosen)]).max()))
    mean = float(np.mean(calls))
    bound = math.log(2 * config.bias_max / eps) / math.log(targets + 1)
    spec = SPECS["bisection"].calls_observed if auto else SPECS["bisection"].calls
    return {
        "targets": targets, "eps": eps, "calls": mean, "per_target": (mean - (1 if auto else 2)) / targets,
        "spec": spec(vocab, 20, eps, endpoint.limits, targets), "bound": bound, "error": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=100_000)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--targets", default="1,3,10")
    parser.add_argument("--eps", default="1e-3,1e-2,1e-1")
    parser.add_argument("--draws", type=int, default=1, help="choices a request may draw (OpenAI's n; 1: greedy only)")
    parser.add_argument("--auto", action="store_true", help="as auto runs the plan: the probe's findings replace the bias check's second call")
    args = parser.parse_args()
    print("| targets | eps | calls/prompt | calls/target | spec (estimate) | bound/target | max error |")
    print("|---|---|---|---|---|---|---|")
    for n in map(int, args.targets.split(",")):
        for eps in map(float, args.eps.split(",")):
            r = measure(args.vocab, args.prompts, n, eps, args.draws, args.auto)
            print(f"| {n} | {eps:g} | {r['calls']:.1f} | {r['per_target']:.2f} | {r['spec']} | {r['bound']:.1f} | {r['error']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
