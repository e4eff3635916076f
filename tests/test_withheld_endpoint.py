"""OpenAIEndpoint's llama.cpp withheld-answer path without llama-server: a failing /tokenize is not fatal."""

import asyncio

from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatorConfig
from logprob_cli.endpoints._vocabulary import load_vocabulary


def test_a_server_without_tokenize_lists_no_withheld_tokens():
    """The simulator server has no /tokenize: the list is empty (direct never needs it), not a fatal error."""
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=1000))) as server:
        endpoint = OpenAIEndpoint("simulator", load_vocabulary("simulator:1000"), base_url=server.url, dialect="llama.cpp")

        async def ask_once():
            try:
                return await endpoint.withheld_tokens()
            finally:
                await endpoint.aclose()

        assert asyncio.run(ask_once()) == frozenset()
