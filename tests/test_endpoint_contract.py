"""The declared endpoint contract: descriptions checkpoints are bound to, members a wrapper forwards,
and llama-server's withheld-token list fetched without blocking the event loop."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from logprob_cli.endpoints import WrappingEndpoint
from logprob_cli.run._budget import MeteredEndpoint, Spend
from logprob_cli.endpoints._base import Endpoint
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._vocabulary import load_vocabulary

TOKENIZE_SECONDS = 0.5


def test_descriptions_keep_the_dicts_existing_checkpoints_are_bound_to():
    """`to_dict()` is the dict describe() returned before it was typed: keys, values and order."""
    simulator = SimulatedEndpoint(SimulatorConfig(vocab_size=500), system="Be brief.").describe()
    assert list(simulator.to_dict()) == [
        "backend", "model", "vocab_size", "hidden_size", "seed", "top_logprobs_cap", "bias_max", "bias_entries",
        "logprobs_after_bias", "bias_steers_sampling", "sampled_logprob", "precision", "tie_noise", "system",
    ]
    assert simulator.to_dict()["backend"] == "simulator" and simulator.to_dict()["vocab_size"] == 500
    assert "system" not in SimulatedEndpoint().describe().to_dict()
    assert simulator.vocabulary is None and "500-token vocabulary" in simulator.summary

    remote = OpenAIEndpoint(
        "gpt-4o", load_vocabulary("o200k_base"), base_url="https://api.example.com/v1", api_key="sk-secret",
        system="Be brief.", extra_body={"seed": 1},
    ).describe()
    assert remote.to_dict() == {
        "backend": "openai", "model": "gpt-4o", "base_url": "https://api.example.com/v1", "api": "chat",
        "dialect": "openai", "post_bias": False, "system": "Be brief.", "extra_body": {"seed": 1},
        "vocabulary": "o200k_base",
    }
    assert list(remote.to_dict())[-1] == "vocabulary" and "sk-secret" not in repr(remote)
    assert remote.summary == "gpt-4o at https://api.example.com/v1 (chat API; vocabulary o200k_base, 200,019 tokens)"


def test_the_meter_forwards_every_member_of_the_contract():
    """Each public member of Endpoint is the meter's own or forwarded by WrappingEndpoint (no fallback to a
    default), and reads the wrapped one."""
    members = {name for name in vars(Endpoint) if not name.startswith("_")}
    assert {"withheld_tokens", "verify_mapping", "pressure", "aclose", "identity", "in_process"} <= members
    own = set(vars(MeteredEndpoint)) | set(vars(WrappingEndpoint))
    assert members <= own, members - own
    wrapped = OpenAIEndpoint("gpt-4o", load_vocabulary("o200k_base"), api="completions")
    metered = MeteredEndpoint(wrapped, Spend(), None)
    for name in ("model", "vocab_size", "limits", "api", "one_call_at_a_time", "in_process", "mapping_check_calls",
                 "identity", "prompt_tokens_counted"):
        assert getattr(metered, name) == getattr(wrapped, name), name
    assert metered.describe() == wrapped.describe() and metered.pressure() == wrapped.pressure()


class _SlowTokenize(BaseHTTPRequestHandler):
    """/tokenize answering after TOKENIZE_SECONDS: ids 0-3, where 1 and 3 end in an incomplete UTF-8 sequence."""

    requests = 0

    def do_POST(self):
        type(self).requests += 1
        time.sleep(TOKENIZE_SECONDS)
        pieces = [{"id": 0, "piece": "a"}, {"id": 1, "piece": [0xC3]}, {"id": 2, "piece": [0xC3, 0xA9]},
                  {"id": 3, "piece": [0x61, 0xE2, 0x82]}]
        body = json.dumps({"tokens": pieces if self.path == "/tokenize" else []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_withheld_tokens_are_fetched_once_without_blocking_the_loop():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowTokenize)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    endpoint = OpenAIEndpoint("tiny", load_vocabulary("simulator:4"), base_url=url, dialect="llama.cpp")

    async def fetch_while_ticking():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        try:
            first = await endpoint.withheld_tokens()
            during = ticks
            again = await endpoint.withheld_tokens()
        finally:
            ticker.cancel()
            await endpoint.aclose()
        return first, again, during

    try:
        first, again, ticks = asyncio.run(fetch_while_ticking())
    finally:
        server.shutdown()
        server.server_close()
    assert first == again == frozenset({1, 3})
    assert _SlowTokenize.requests == 1, "the list is asked once, then cached"
    assert ticks >= 10, f"the event loop stood still while /tokenize answered ({ticks} ticks in {TOKENIZE_SECONDS} s)"


def test_a_wrapping_endpoint_forwards_every_member_but_the_one_it_exists_to_change():
    """A member added to Endpoint must be listed in WrappingEndpoint.FORWARDED, or a wrapper would answer with the
    base class's default instead of the wrapped endpoint's."""
    members = {name for name in vars(Endpoint) if not name.startswith("_")}
    assert members - set(WrappingEndpoint.FORWARDED) == {"ask", "describe"}
    simulator = SimulatedEndpoint(SimulatorConfig(vocab_size=1000, chosen_ids=8))
    wrapper = MeteredEndpoint(simulator, Spend(), None)
    assert wrapper.limits.token_ids == 8 and wrapper.token_text(300) == simulator.token_text(300)
    assert asyncio.run(wrapper.split_text("gi")) == asyncio.run(simulator.split_text("gi"))
