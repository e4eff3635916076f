"""Every position of a text on a running vLLM (`--max-logprobs -1`): one prompt_logprobs request for the text
against one whole-vocabulary request a position, through the tool's own endpoint, and how far apart they are.

    python benchmarks/vllm_positions.py --base-url http://127.0.0.1:8000/v1 --model MODEL \
        [--prompt "The capital of France is"] [--completion " Paris. It is a city"]

Prints, for each way, the requests sent and the seconds taken (all positions asked at once, as a run asks them),
then the largest difference between the two ways' values over every token of every position.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from logprob_cli.endpoints import Prompt, Query
from logprob_cli.endpoints._factory import EndpointSettings, build_endpoint
from logprob_cli.run._positions import positions


async def measure(endpoint, units: list[Prompt]) -> tuple[int, float, list]:
    """(requests sent, seconds, answers) for every unit's whole vocabulary, asked at once."""
    query = Query.make(top_logprobs=endpoint.vocab_size)
    start = time.perf_counter()
    answers = await asyncio.gather(*(endpoint.ask(unit, query) for unit in units))
    return sum(a.requests for a in answers), time.perf_counter() - start, answers


async def main(args: argparse.Namespace, endpoint) -> None:
    try:
        ids = await endpoint.split_text(args.completion)
        units = positions(Prompt("q", 1, prompt=args.prompt, completion_ids=ids))
        await endpoint.ask(Prompt("warm-up", 1, prompt=args.prompt), Query.make(top_logprobs=1))  # its /tokenize too
        rows = await measure(endpoint, units)
        endpoint.rows_per_call = 1  # one request a position
        each = await measure(endpoint, units)
    finally:
        await endpoint.aclose()
    for name, (requests, seconds, _) in (("prompt_logprobs", rows), ("a request a position", each)):
        print(f"{name:>22}: {len(units)} positions, {requests} requests, {seconds:.1f} s")
    worst = max(
        max(abs(x - y) for x, y in zip(np.array(a.top_logprobs)[np.argsort(a.top_ids)], np.array(b.top_logprobs)[np.argsort(b.top_ids)]))
        for a, b in zip(rows[2], each[2])
    )
    print(f"largest difference between the two: {worst:.2e} nats")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--completion", default=" Paris. It is a city")
    args = parser.parse_args()
    asyncio.run(main(args, build_endpoint(EndpointSettings(model=args.model, base_url=args.base_url, api="completions"))))
