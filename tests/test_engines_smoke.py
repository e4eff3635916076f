"""A real engine is wired in: llama-server with the tiny model returns the whole distribution.

Skips unless `scripts/build_llama_server.sh` has filled the cache (see tests/engines.py).
"""

import json
import math
import urllib.request

from engines import llama_server_fixture

tiny_server = llama_server_fixture("tiny")


def post(base_url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def get(base_url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base_url}{path}", timeout=10) as response:
        return json.load(response)


def test_llama_server_returns_the_whole_vocabulary(tiny_server):
    n_vocab = get(tiny_server, "/v1/models")["data"][0]["meta"]["n_vocab"]
    assert n_vocab == 459  # 256 bytes + 200 merges + 3 specials

    answer = post(tiny_server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "The capital of France is"}],
        "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": n_vocab,
        # Pin the sampled token to a complete UTF-8 token (" the" style merges are ids
        # 256..455) so the position is not reported as null: only the sampling moves,
        # the default (pre-bias) logprobs do not.
        "logit_bias": {"300": 100},
    })
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == 1
    top = content[0]["top_logprobs"]
    assert content[0]["id"] == 300

    ids = [entry["id"] for entry in top]
    assert sorted(ids) == list(range(n_vocab))
    for entry in top:
        assert isinstance(entry["bytes"], list) and isinstance(entry["token"], str)
        assert entry["logprob"] <= 0.0
    by_id = {entry["id"]: entry for entry in top}
    assert by_id[ord("A")]["bytes"] == [ord("A")]  # ids 0..255 are the 256 single bytes, in byte order

    total = math.fsum(math.exp(entry["logprob"]) for entry in top)
    assert abs(total - 1.0) < 1e-4
