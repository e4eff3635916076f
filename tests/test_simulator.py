"""The simulator is the ground truth: check that it answers as the documented endpoint contract says."""

import numpy as np
import pytest

from logprob_cli.endpoints._base import Answer, EndpointError, Query
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig, simulator_token_bytes, to_bfloat16

PROMPT = "The capital of France is"


def test_model_looks_like_a_language_model():
    sim = SimulatedEndpoint()
    assert sim.vocab_size >= 100_000
    for prompt in ("a", "b", "c", PROMPT):
        lp = sim.true_logprobs(prompt)
        assert abs(np.logaddexp.reduce(lp)) < 1e-9
        assert np.exp(lp.max()) > 0.05, "a peaked head"
        assert lp.min() < -30, "a tail below -30 nats"
    assert not np.array_equal(sim.true_logprobs("a"), sim.true_logprobs("b"))
    np.testing.assert_array_equal(sim.true_logprobs("a"), SimulatedEndpoint().true_logprobs("a"))


def test_logits_are_low_rank():
    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=2000, hidden_size=16))
    stacked = np.stack([sim.sim.logits(f"prompt {i}") for i in range(40)])
    assert np.linalg.matrix_rank(stacked.astype(np.float64), tol=1e-3) <= 17


def test_unbiased_answer_is_greedy_top_k_in_float32():
    sim = SimulatedEndpoint()
    answer = sim.answer(PROMPT, Query.make(top_logprobs=20))
    truth = sim.true_logprobs(PROMPT)
    order = np.argsort(-truth)[:20]
    assert list(answer.top_ids) == order.tolist()
    assert answer.sampled == order[0]
    assert np.abs(np.array(answer.top_logprobs) - truth[order]).max() < 1e-5
    assert all(float(np.float32(v)) == v for v in answer.top_logprobs)


def test_bias_moves_logprobs_and_sampling_by_default():
    sim = SimulatedEndpoint()
    truth = sim.true_logprobs(PROMPT)
    token = int(np.argsort(truth)[50_000])
    answer = sim.answer(PROMPT, Query.make({token: 100.0}, 5))
    assert answer.sampled == token and answer.top_ids[0] == token
    expected = truth[token] + 100 - np.logaddexp(np.logaddexp.reduce(np.delete(truth, token)), truth[token] + 100)
    assert abs(answer.top_logprobs[0] - expected) < 1e-4


def test_pre_bias_logprobs_with_steering_report_the_forced_token():
    config = SimulatorConfig(logprobs_after_bias=False)
    sim = SimulatedEndpoint(config)
    truth = sim.true_logprobs(PROMPT)
    token = int(np.argsort(truth)[50_000])
    answer = sim.answer(PROMPT, Query.make({token: 100.0}, 5))
    assert answer.sampled == token
    assert token not in answer.top_ids
    assert abs(answer.sampled_logprob - truth[token]) < 1e-4
    sentinel = SimulatedEndpoint(SimulatorConfig(logprobs_after_bias=False, sampled_logprob="sentinel"))
    assert sentinel.answer(PROMPT, Query.make({token: 100.0}, 5)).sampled_logprob is None


def test_bias_ignored_changes_nothing():
    sim = SimulatedEndpoint(SimulatorConfig(logprobs_after_bias=False, bias_steers_sampling=False))
    plain = sim.answer(PROMPT, Query.make(top_logprobs=5))
    biased = sim.answer(PROMPT, Query.make({7: 100.0, 9: -100.0}, 5))
    assert plain == biased


def test_limits_are_enforced():
    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=1000, bias_max=10.0))
    with pytest.raises(EndpointError, match="at most 300"):
        sim.answer(PROMPT, Query.make({i: 1.0 for i in range(301)}, 5))
    with pytest.raises(EndpointError, match="top_logprobs"):
        sim.answer(PROMPT, Query.make(top_logprobs=21))
    with pytest.raises(EndpointError, match="outside the vocabulary"):
        sim.answer(PROMPT, Query.make({1000: 1.0}, 5))
    truth = sim.true_logprobs(PROMPT)
    low = int(np.argmin(truth))
    clipped = sim.answer(PROMPT, Query.make({low: 1e6}, 5))
    assert clipped.sampled != low, "a bias beyond the range is clipped, not honoured"
    assert sim.calls == 1


def test_bfloat16_rounds_returned_values():
    sim = SimulatedEndpoint(SimulatorConfig(precision="bfloat16"))
    answer = sim.answer(PROMPT, Query.make({3: 20.0}, 20))
    values = np.array(answer.top_logprobs, dtype=np.float32)
    np.testing.assert_array_equal(to_bfloat16(values), values)


def test_tie_noise_makes_calls_nondeterministic():
    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=1000, tie_noise=1e-3))
    a = sim.answer(PROMPT, Query.make(top_logprobs=5))
    b = sim.answer(PROMPT, Query.make(top_logprobs=5))
    assert a.top_logprobs != b.top_logprobs


def test_vocabulary_bytes_are_distinct():
    tokens = [simulator_token_bytes(i) for i in range(100_000)]
    assert len(set(tokens)) == len(tokens)


def test_answer_round_trips_through_bytes():
    answer = Answer(5, None, (5, 7), (-0.1, -2.5))
    assert Answer.from_bytes(answer.to_bytes()) == answer
