"""Client CPU time per call: the tool end to end, its transport alone, and the official openai client.

    python benchmarks/client_cpu.py [--calls 3000] [--concurrency 16] [--vocab 1000]

One `logprobs serve` process (no latency, no limit) answers every row; this process is
the client, and its time.process_time (all threads) over the measured calls, divided by
them, is the figure (target <= 1 ms, aim 0.5). Rows:
- extract_batch: the whole tool (method topk, k = 20: runner, journal commits, Parquet
  rewrites, the method's own arithmetic) over a steady window, from the --warmup-th call
  to the (--warmup + --calls)-th (start-up, the token check and the tail excluded);
- OpenAIEndpoint.ask: the tool's request path alone (aiohttp transport, rate limiter, parse
  into an Answer), --concurrency workers asking the same topk-shaped request;
- AsyncOpenAI: the official client's chat.completions.create with the same request body,
  the same workers (after --warmup calls each of the last two rows).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

import openai
from harness import ServedSimulator, Window, machine_jiffies, machine_note, prompts

from logprob_cli.endpoints._base import Query
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.run._runner import extract_batch
from logprob_cli.endpoints._vocabulary import load_vocabulary

MODEL = "simulator"


def topk_query(vocab: int, k: int) -> Query:
    """A request shaped like topk's: k biased tokens, k logprobs back."""
    return Query.make({i: 100.0 for i in range(vocab // 3, vocab // 3 + k)}, k)


async def timed_calls(call: Callable[[int], Awaitable[object]], calls: int, warmup: int, concurrency: int) -> dict:
    """`warmup`, then `calls` calls from `concurrency` workers (each passes its index); wall and CPU of the latter."""

    async def batch(n: int) -> None:
        left = n

        async def worker(w: int) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call(w)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))

    await batch(warmup)
    wall, cpu, machine = time.perf_counter(), time.process_time(), machine_jiffies()
    await batch(calls)
    after = machine_jiffies()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            **{key: after[key] - machine[key] for key in after}}


def endpoint_for(url: str, vocab: int) -> OpenAIEndpoint:
    return OpenAIEndpoint(MODEL, load_vocabulary(f"simulator:{vocab}"), base_url=url, api_key="any")


def tool_end_to_end(server: ServedSimulator, args: argparse.Namespace) -> dict:
    endpoint = endpoint_for(server.url, args.vocab)
    per_prompt = math.ceil((args.vocab - 20) / 19) + 2  # topk's calls per prompt at k = 20
    n_prompts = math.ceil((args.warmup + args.calls) * 1.25 / per_prompt) + 1
    window = Window(args.warmup, args.warmup + args.calls,
                    lambda: {"wall": time.perf_counter(), "cpu": time.process_time(), **machine_jiffies()})
    with tempfile.TemporaryDirectory() as tmp:
        extract_batch(prompts(n_prompts), Path(tmp) / "out.parquet", endpoint, "topk", top_k=20,
                      concurrency=args.concurrency, progress=window)
    return window.delta()


def tool_ask(server: ServedSimulator, args: argparse.Namespace) -> dict:
    endpoint = endpoint_for(server.url, args.vocab)
    query, asking = topk_query(args.vocab, 20), prompts(args.concurrency, "ask")

    async def run() -> dict:
        try:
            return await timed_calls(
                lambda w: endpoint.ask(asking[w], query), args.calls, args.warmup, args.concurrency
            )
        finally:
            await endpoint.aclose()

    return asyncio.run(run())


def openai_create(server: ServedSimulator, args: argparse.Namespace) -> dict:
    query = topk_query(args.vocab, 20)
    bias = {str(i): b for i, b in query.bias}

    async def run() -> dict:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="any") as client:
            async def call(w: int) -> object:
                return await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"ask prompt {w}"}], max_tokens=1,
                    temperature=0, logprobs=True, top_logprobs=query.top_logprobs, logit_bias=bias,
                )

            return await timed_calls(call, args.calls, args.warmup, args.concurrency)

    return asyncio.run(run())


ROWS = {
    "extract_batch (topk, end to end)": tool_end_to_end,
    "OpenAIEndpoint.ask (aiohttp)": tool_ask,
    "AsyncOpenAI chat.completions.create": openai_create,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls measured per row")
    parser.add_argument("--warmup", type=int, default=300, help="calls before measuring, per row")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=1000)
    args = parser.parse_args()
    print(f"client CPU per call: server in another process (no latency), vocabulary {args.vocab:,}, "
          f"k = 20, concurrency {args.concurrency}, {args.calls:,} calls measured per row after {args.warmup:,} "
          f"(excluded, with extract_batch's start-up and tail); {machine_note()}\n")
    print(f"{'client':<38} {'CPU ms/call':>11} {'calls/s':>8} {'client CPU':>10} {'steal':>5}")
    with ServedSimulator(args.vocab) as server:
        for name, measure in ROWS.items():
            d = measure(server, args)
            print(f"{name:<38} {1000 * d['cpu'] / args.calls:>11.3f} {args.calls / d['wall']:>8.0f} "
                  f"{d['cpu'] / d['wall']:>10.0%} {d['steal'] / d['total']:>5.0%}", flush=True)
    print("\nCPU: this process's time.process_time (every thread) over the measured calls; client CPU: its share "
          "of one core. calls/s is set by the server here (a pure-Python server, no latency), not by the client. "
          "steal: the share of the machine's CPU time the hypervisor took meanwhile (/proc/stat); under heavy "
          "steal the CPU figures run high (the cores are shared).")


if __name__ == "__main__":
    main()
