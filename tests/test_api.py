import numpy as np

from logprob_cli import extract_logprobs
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig


def test_extract_one_prompt_from_python():
    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=3000))
    result = extract_logprobs("The capital of France is", method="exact", endpoint=endpoint)
    assert result.calls == endpoint.calls
    assert result.logprobs.shape == (3000,)
    assert np.abs(result.logprobs - endpoint.true_logprobs("The capital of France is")).max() < 1e-4


def test_chat_messages_are_a_prompt_too():
    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=3000))
    messages = [{"role": "user", "content": "hi"}]
    result = extract_logprobs(messages, endpoint=endpoint)
    assert np.abs(result.logprobs - endpoint.true_logprobs(messages)).max() < 1e-4
