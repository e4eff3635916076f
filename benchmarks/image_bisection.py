"""Whole vectors from argmax-only answers through the model's image (`bisection+image`), against ground truth.

    python benchmarks/image_bisection.py [--vocab 100000] [--prompts 10] [--eps 1e-2,1e-3,1e-4]
    python benchmarks/image_bisection.py --base-url http://127.0.0.1:8080 --image MODEL.gguf [--prompts 3]

The simulator answers as OpenAI documents: pre-bias top-20, -9999 for a forced token outside it, and a
bias that steers sampling, in float32; the image is its own output matrix (rank d + 2 = 66). Prints per
eps: mean and range of calls per prompt, what `estimate` predicts, plain bisection's prediction for the
whole vocabulary, the worst error against ground truth over every token, and the largest stated precision.

With --base-url, a llama-server (pre-bias logprobs, the default) answers instead, with the image from its
GGUF: its own whole-vocabulary answer (top_logprobs = V) is the ground truth, compared where p > 1e-6.
"""

from __future__ import annotations

import argparse
import json
import urllib.request

import numpy as np

from logprob_cli.api import extract_logprobs
from logprob_cli.io import load_image

from logprob_cli.endpoints import SimulatedEndpoint, SimulatorConfig
from logprob_cli.methods import METHODS, SPECS, Context, Image, drive


def measure(vocab: int, prompts: int, eps: float) -> dict:
    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=vocab, logprobs_after_bias=False, sampled_logprob="sentinel"))
    image = Image.from_matrix(endpoint.sim.output_matrix(), "simulator")
    calls, worst, stated = [], 0.0, 0.0
    for p in range(prompts):
        prompt = f"prompt {p}"
        ctx = Context(vocab, endpoint.limits, eps=eps, image=image)
        result, n = drive(METHODS["bisection+image"](ctx), lambda q: endpoint.answer(prompt, q))
        if np.isnan(result.logprobs).any():
            raise SystemExit(f"prompt {p}: not every token was recovered ({result.notes[-1]})")
        calls.append(n)
        worst = max(worst, float(np.abs(result.logprobs - endpoint.true_logprobs(prompt)).max()))
        stated = max(stated, result.precision)
    limits = endpoint.limits
    return {
        "eps": eps, "mean": float(np.mean(calls)), "min": min(calls), "max": max(calls),
        "spec": SPECS["bisection+image"].calls(vocab, 20, eps, limits, 0, image.rank),
        "plain": SPECS["bisection"].calls(vocab, 20, eps, limits), "error": worst, "stated": stated,
    }


def whole_distribution(base_url: str, prompt: str, vocab: int) -> np.ndarray:
    """llama-server's own logprob of every token by id (top_logprobs = V, no bias, no prompt cache)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0, "logprobs": True,
            "top_logprobs": vocab, "cache_prompt": False}
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        entries = json.load(response)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    truth = np.full(vocab, np.nan)
    for entry in entries:
        truth[entry["id"]] = entry["logprob"]
    return truth


def measure_server(base_url: str, image_path: str, prompts: int, eps: float) -> dict:
    image = load_image(image_path)
    calls, worst, stated = [], 0.0, 0.0
    for p in range(prompts):
        prompt = f"Tell me about the number {p}."
        got = extract_logprobs(prompt, method="bisection+image", image=image, eps=eps, model="served",
                               base_url=f"{base_url}/v1", api_key="unused")
        truth = whole_distribution(base_url, prompt, image.vocab_size)
        likely = np.exp(truth) > 1e-6
        calls.append(got.calls)
        worst = max(worst, float(np.abs(got.logprobs[likely] - truth[likely]).max()))
        stated = max(stated, got.result.precision)
    return {"eps": eps, "mean": float(np.mean(calls)), "min": min(calls), "max": max(calls), "error": worst,
            "stated": stated, "rank": image.rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=100_000)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--eps", default="1e-2,1e-3,1e-4")
    parser.add_argument("--base-url", help="a llama-server (pre-bias mode) instead of the simulator")
    parser.add_argument("--image", help="with --base-url: the served model's GGUF (its image)")
    args = parser.parse_args()
    if args.base_url:
        print("| eps | rank | calls/prompt (min–max) | max error (p > 1e-6) | largest stated precision |")
        print("|---|---|---|---|---|")
        for eps in map(float, args.eps.split(",")):
            r = measure_server(args.base_url, args.image, args.prompts, eps)
            print(f"| {eps:g} | {r['rank']} | {r['mean']:.0f} ({r['min']}–{r['max']}) | {r['error']:.1e} | "
                  f"{r['stated']:.1e} |", flush=True)
        return
    print("| eps | calls/prompt (min–max) | estimate | plain bisection (estimate) | max error | largest stated precision |")
    print("|---|---|---|---|---|---|")
    for eps in map(float, args.eps.split(",")):
        r = measure(args.vocab, args.prompts, eps)
        print(f"| {eps:g} | {r['mean']:.0f} ({r['min']}–{r['max']}) | {r['spec']} | {r['plain']:,} | "
              f"{r['error']:.1e} | {r['stated']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
