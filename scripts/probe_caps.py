"""What `auto` picks and recovers on the simulator at every top-k cap, against ground truth.

For each cap and each behaviour (logprobs before or after the bias, the bias steering sampling or
not, a forced token's own logprob reported or -9999), it probes one prompt, runs the method the
probe recommends within the limits it learnt, and prints the probe's answered / rejected calls,
the method, the tokens recovered and the largest error against SimulatedEndpoint.true_logprobs
beside the method's own precision bound.

    PYTHONPATH=src python scripts/probe_caps.py --vocab 500 --caps 1-20
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

import numpy as np

from logprob_cli.endpoints._base import Prompt
from logprob_cli.methods import METHODS, Context, drive
from logprob_cli.run._probe import MAX_TOP_K, expected_calls, probe
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig

BEHAVIOURS = [  # (logprobs_after_bias, bias_steers_sampling, sampled_logprob)
    (True, True, "report"),
    (True, False, "report"),
    (False, True, "report"),
    (False, True, "sentinel"),
    (False, False, "report"),
]


def caps(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def run(vocab: int, cap: int, after: bool, steers: bool, sampled: str) -> str:
    config = SimulatorConfig(vocab_size=vocab, top_logprobs_cap=cap, logprobs_after_bias=after,
                             bias_steers_sampling=steers, sampled_logprob=sampled)
    prompt = Prompt(id=0, line=1, prompt="The capital of France is")
    endpoint = SimulatedEndpoint(config)
    report = asyncio.run(probe(endpoint, prompt))
    counted = "" if endpoint.calls == report.calls == expected_calls(report) else " COUNT MISMATCH"
    limits = report.limits()
    ctx = Context(vocab, limits, top_k=min(MAX_TOP_K, limits.top_logprobs))
    result, calls = drive(METHODS[report.recommended](ctx), lambda query: endpoint.answer(prompt, query))
    truth = endpoint.true_logprobs(prompt)
    seen = ~np.isnan(result.logprobs)
    error = float(np.abs(result.logprobs[seen] - truth[seen]).max())
    verdict = "ok" if error <= result.precision + 1e-9 else "ABOVE PRECISION"
    return (f"{cap:>3} {str(after):>5} {str(steers):>6} {sampled:>8}  {report.calls:>2}/{report.rejected_calls}{counted}  "
            f"{report.recommended:<9} {calls:>6} {seen.sum():>6}/{vocab}  {error:.1e} <= {result.precision:.1e} {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=500)
    parser.add_argument("--caps", type=caps, default=caps("1-20"), help="e.g. 1-20 or 3")
    args = parser.parse_args()
    print("cap after steers  sampled  probe  method     calls  recovered     error    precision")
    for cap, (after, steers, sampled) in itertools.product(args.caps, BEHAVIOURS):
        print(run(args.vocab, cap, after, steers, sampled), flush=True)


if __name__ == "__main__":
    main()
