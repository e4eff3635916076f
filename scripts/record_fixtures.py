"""Re-record tests/fixtures/http/llama-*.json from a real llama-server (the tiny model tests use).

Starts llama-server as the tests do (tests/engines.py; build it with scripts/build_llama_server.sh),
sends a few requests through OpenAIEndpoint with a wire that keeps each exchange, and writes one
fixture per exchange: the request (method, path, body), the response (status, content type, body),
the query that produced it, and what the answer must read as, taken from the response's own ids
(tests/test_dialects.py replays them through a MockWire). Run: python scripts/record_fixtures.py
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from engines import LLAMA_SERVER_VERSION, model_path, run_llama_server  # noqa: E402

from logprob_cli.endpoints._base import Prompt, Query  # noqa: E402
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint, ask_server_facts  # noqa: E402
from logprob_cli.endpoints._transport import AiohttpWire, RawResponse  # noqa: E402
from logprob_cli.endpoints._vocabulary import server_vocabulary  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "http"
PROMPT = "The capital of France is"
N_VOCAB = 459  # the tiny model's; llama-server names tokens by id, so any vocabulary of that size reads them


class RecordingWire(AiohttpWire):
    """The network, keeping every exchange."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[dict] = []

    async def send(self, method, url, headers, body) -> RawResponse:
        response = await super().send(method, url, headers, body)
        self.exchanges.append({
            "request": {"method": method, "path": urlsplit(url).path.removeprefix("/v1"),  # relative to the base URL
                        "body": json.loads(body) if body else None},
            "response": {
                "status": response.status,
                "headers": {"Content-Type": response.headers.get("Content-Type", "")},
                "body": json.loads(response.body),
            },
        })
        return response


def expected(body: dict) -> dict:
    """What the answer must read as, straight from llama-server's entries (ids given, best first)."""
    choice = body["choices"][0]
    entries = (choice.get("logprobs") or {}).get("content")
    usage = body.get("usage") or {}
    counts = {"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0)}
    if not entries:
        return {"withheld": True, **counts}
    entry = entries[0]
    return {
        "sampled": entry["id"], "sampled_logprob": entry["logprob"],
        "top_ids": [t["id"] for t in entry["top_logprobs"]], "top_logprobs": [t["logprob"] for t in entry["top_logprobs"]],
        **counts,
    }


async def record(base_url: str) -> None:
    wire = RecordingWire()
    facts = await ask_server_facts(f"{base_url}/v1", None, "tiny", wire=wire)
    save("llama-models", wire.exchanges.pop(), {"facts": facts}, "GET /v1/models: n_vocab in each model's meta")
    assert facts["n_vocab"] == N_VOCAB, facts
    vocabulary = server_vocabulary(N_VOCAB)
    prompt = Prompt("p", 1, PROMPT)
    for api in ("chat", "completions"):
        endpoint = OpenAIEndpoint("tiny", vocabulary, base_url=f"{base_url}/v1", api=api, dialect="llama.cpp", wire=wire)
        # the legacy prompt's greedy token is an incomplete UTF-8 piece (withheld): force "x" there (its logprobs
        # stay the unbiased ones)
        query = Query.make({10: 5.0, 20: -3.0} if api == "chat" else {120: 100.0, 20: -3.0}, top_logprobs=5)
        await endpoint.ask(prompt, query)
        exchange = wire.exchanges.pop()
        save(f"llama-{api}", exchange, {"query": query_json(query, api), "expect": expected(exchange["response"]["body"])},
             f"{api} API, logprobs with top 5 and a logit_bias")
        if api == "chat":
            held = sorted(await endpoint.withheld_tokens())
            wire.exchanges.clear()  # the /tokenize exchange (every id's piece) is not kept
            if held:
                query = Query.make({held[0]: 100.0}, top_logprobs=5)
                await endpoint.ask(prompt, query)
                exchange = wire.exchanges.pop()
                save("llama-withheld", exchange, {"query": query_json(query, api), "expect": expected(exchange["response"]["body"])},
                     f"chat API, token {held[0]} (an incomplete UTF-8 piece) forced: llama-server withholds the answer")
        await endpoint.aclose()
    await wire.aclose()


def query_json(query: Query, api: str) -> dict:
    return {"api": api, "prompt": PROMPT, "bias": {str(i): b for i, b in query.bias}, "top_logprobs": query.top_logprobs}


def save(name: str, exchange: dict, extra: dict, what: str) -> None:
    fixture = {
        "source": f"recorded from llama-server {LLAMA_SERVER_VERSION} (tests/engines.py's tiny model) by scripts/record_fixtures.py",
        "note": what, "dialect": "llama.cpp", "vocabulary": f"simulator:{N_VOCAB}", **exchange, **extra,
    }
    (OUT / f"{name}.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print("wrote", OUT / f"{name}.json")


def main() -> None:
    model = model_path("tiny")
    if model is None:
        sys.exit("the tiny model is not cached: see tests/engines.py")
    OUT.mkdir(parents=True, exist_ok=True)
    with run_llama_server(model) as base_url:
        asyncio.run(record(base_url))


if __name__ == "__main__":
    main()
