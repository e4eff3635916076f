"""The image methods on a real engine: llama-server with SmolLM2-135M (V = 49,152, image rank 577), against its own
whole-vocabulary answer.

    python benchmarks/image_llama_server.py [--prompts 3] [--modes forced topk] [--port 0]

Starts the cached llama-server (~/.cache/logprob-cli/llama-server-0.3.36, `-c 2048 -t 2 --no-repack`) on the
cached SmolLM2-135M-Instruct.Q4_1.gguf, loads the image from that GGUF (`load_image`), and per prompt runs
`forced+image` against the server as it is (logprobs before the bias) and `topk+image` in post-bias mode
(`post_bias`: llama-server's post_sampling_probs), one call at a time. Prints per prompt and mode the calls,
what the method without the image would spend (forced: about V; topk: about V / (k - 1)), the image's own
(d + 1) / (k - 1) where k = 20, the top logprobs a call the methods read, and the worst |error| over every token against the server's
whole-vocabulary answer (`top_logprobs` = V, the ground truth only: the measured runs never read it).
A forced+image prompt is about 600 calls; each mode restarts the server.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np

from logprob_cli.api import extract_logprobs
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints._vocabulary import server_vocabulary
from logprob_cli.io import load_image
from logprob_cli.methods import SPECS

from image_bisection import whole_distribution  # the server's own answer for every token: the ground truth

CACHE = Path(os.environ.get("LOGPROB_CLI_CACHE") or Path.home() / ".cache" / "logprob-cli")
SERVER = CACHE / "llama-server-0.3.36" / "bin" / "llama-server"
MODEL = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152
PROMPTS = ["The capital of France is", "It was the best of times", "1, 2, 3, 4,", "Once upon a time there",
           "The quick brown fox"]


@contextlib.contextmanager
def llama_server(port: int) -> Iterator[str]:
    """The cached llama-server on 127.0.0.1:`port` (0: a free one) until GET /health answers 200; its base URL.
    Always stopped on exit; RuntimeError with the tail of its log if it exits or is not up within 120 s."""
    if not port:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([str(SERVER), "-m", str(MODEL), "--host", "127.0.0.1", "--port", str(port),
                                    "-c", "2048", "-t", "2", "--no-repack"],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not _healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"llama-server did not start:\n{log.read()[-2000:].decode(errors='replace')}")
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def measure(mode: str, prompts: list[str], port: int, rank: int, image) -> list[dict]:
    """One row per prompt: calls, seconds and worst error of `mode`+image (forced: pre-bias, topk: post-bias)."""
    rows = []
    with llama_server(port) as url:
        endpoint = OpenAIEndpoint("smollm2", server_vocabulary(VOCAB), base_url=f"{url}/v1", dialect="llama.cpp",
                                  post_bias=mode == "topk")
        k = min(20, endpoint.limits.top_logprobs)  # the methods read at most OpenAI's 20 a call
        plain = SPECS[mode].calls(VOCAB, k, 1e-3, endpoint.limits)
        for text in prompts:
            started = time.perf_counter()
            extraction = extract_logprobs(text, method=f"{mode}+image", endpoint=endpoint, image=image)
            seconds = time.perf_counter() - started
            error = float(np.nanmax(np.abs(extraction.logprobs - whole_distribution(url, text, VOCAB))))
            rows.append({"mode": mode, "prompt": text, "method": extraction.method, "calls": extraction.calls,
                         "plain": plain, "ideal": math.ceil(rank / (k - 1)) if mode == "topk" else rank,
                         "error": error, "precision": extraction.result.precision, "unrecovered": int(np.isnan(extraction.logprobs).sum()),
                         "seconds": seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--modes", nargs="+", default=["forced", "topk"], choices=["forced", "topk"])
    parser.add_argument("--port", type=int, default=0, help="llama-server's port (0: a free one)")
    args = parser.parse_args()
    if not SERVER.is_file() or not MODEL.is_file():
        parser.error(f"needs {SERVER} and {MODEL}: run scripts/build_llama_server.sh")
    image = load_image(MODEL)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    rows = [row for mode in args.modes for row in measure(mode, PROMPTS[:args.prompts], args.port, image.rank, image)]
    print(f"commit {commit}; llama-server 0.3.36, {MODEL.name}, V = {VOCAB:,}, image rank {image.rank} from the GGUF; "
          "one call at a time, error against the server's whole-vocabulary answer")
    print("| mode | prompt | method | calls | without the image | d + 1 (forced), (d + 1) / (k - 1) (topk) | "
          "worst error (nats) | stated precision | unrecovered tokens | seconds |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        mode = "pre-bias" if row["mode"] == "forced" else "post-bias"
        print(f"| {mode} | {row['prompt']} | {row['method']} | {row['calls']:,} | {row['plain']:,} | {row['ideal']:,} | "
              f"{row['error']:.1e} | {row['precision']:.1e} | {row['unrecovered']} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
