"""`bisection+image`: a whole vector from argmax-only answers (OpenAI's contract), through the model's image, checked
against the simulator's ground truth; another model under the same image falls back and is never wrong."""

import numpy as np
import pytest

from logprob_cli.endpoints import SimulatedEndpoint, SimulatorConfig
from logprob_cli.methods import METHODS, SPECS, Context, Image, drive

VOCAB = 20_000
OPENAI = {"logprobs_after_bias": False, "sampled_logprob": "sentinel"}


def image_of(seed: int) -> Image:
    return Image.from_matrix(SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB, seed=seed)).sim.output_matrix(), f"seed {seed}")


def extract(prompt: str, image: Image, eps: float, seed: int = 0):
    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB, seed=seed, **OPENAI))
    ctx = Context(VOCAB, endpoint.limits, eps=eps, image=image)
    result, calls = drive(METHODS["bisection+image"](ctx), lambda q: endpoint.answer(prompt, q))
    return result, calls, endpoint.true_logprobs(prompt), endpoint.limits


@pytest.mark.parametrize("eps", [1e-2, 1e-3])
@pytest.mark.parametrize("prompt", ["The capital of France is", "Once upon a time"])
def test_every_token_within_eps_from_a_few_hundred_argmax_answers(prompt, eps):
    image = image_of(0)
    result, calls, truth, limits = extract(prompt, image, eps)
    assert not np.isnan(result.logprobs).any()
    error = np.abs(result.logprobs - truth).max()
    assert error <= result.precision <= 1.2 * eps
    assert "solved through the image" in result.notes[-1]
    predicted = SPECS["bisection+image"].calls(VOCAB, 20, eps, limits, 0, image.rank)
    assert 0.85 * predicted <= calls <= 1.15 * predicted
    assert calls < SPECS["bisection"].calls(VOCAB, 20, eps, limits) / 100  # plain bisection: ~2.5 V


def test_another_model_under_the_same_image_falls_back_and_is_never_wrong():
    result, _, truth, _ = extract("The capital of France is", image_of(0), 1e-3, seed=1)
    read = ~np.isnan(result.logprobs)
    assert read.sum() < 200  # only the tokens bisection read, nothing solved from the wrong image
    assert np.abs(result.logprobs[read] - truth[read]).max() <= result.precision
    assert any("did not fit" in note for note in result.notes)
