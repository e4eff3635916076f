import numpy as np
import pytest

from logprob_cli.methods import METHODS, Context, drive
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig


def run_method(name: str, config: SimulatorConfig, prompt="The capital of France is", **settings):
    """Run one method on the simulator; returns (result, calls, ground truth)."""
    endpoint = SimulatedEndpoint(config)
    ctx = Context(endpoint.vocab_size, endpoint.limits, **settings)
    result, calls = drive(METHODS[name](ctx), lambda q: endpoint.answer(prompt, q))
    assert calls == endpoint.calls
    return result, calls, endpoint.true_logprobs(prompt)


def max_error(result, truth, floor=-20.0):
    mask = truth > floor
    return float(np.nanmax(np.abs(result.logprobs[mask] - truth[mask])))


@pytest.fixture
def small():
    return SimulatorConfig(vocab_size=20_000)


class BilledEndpoint(OpenAIEndpoint):
    """An OpenAI-compatible endpoint that adds up the prompt and completion tokens the server bills (usage)."""

    billed_prompt_tokens = 0
    billed_completion_tokens = 0

    async def ask(self, prompt, query):
        answer = await super().ask(prompt, query)
        self.billed_prompt_tokens += answer.prompt_tokens
        self.billed_completion_tokens += answer.completion_tokens
        return answer
