import math

import numpy as np
import pytest

from logprob_cli.endpoints._base import WITHHELD, Answer, EndpointUnsuitable, Limits, Query
from logprob_cli.methods import METHODS, Context, drive
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig

from conftest import max_error, run_method


@pytest.mark.parametrize("name", ["exact", "topk"])
@pytest.mark.parametrize("k", [5, 20])
def test_reference_methods_match_float32_ground_truth(name, k, small):
    result, calls, truth = run_method(name, small, top_k=k)
    assert result.unrecovered_ids.size == 0
    assert max_error(result, truth) < 1e-4
    assert max_error(result, truth, floor=-math.inf) < 1e-4
    assert abs(result.probability_sum() - 1) < 1e-5
    assert result.precision >= max_error(result, truth)  # the reported bound holds


@pytest.mark.parametrize("k", [5, 20])
def test_topk_calls_within_two_percent_of_ideal(k, small):
    _, calls, _ = run_method("topk", small, top_k=k)
    assert calls <= 1.02 * math.ceil(small.vocab_size / (k - 1))


def test_topk_default_vocabulary_reaches_endpoint_rounding():
    result, calls, truth = run_method("topk", SimulatorConfig(), top_k=20)
    assert max_error(result, truth) < 2e-5
    assert calls <= 1.02 * math.ceil(100_000 / 19)


@pytest.mark.parametrize("name", ["exact", "topk"])
def test_pre_bias_endpoint_is_refused_quickly(name, small):
    config = SimulatorConfig(vocab_size=small.vocab_size, logprobs_after_bias=False)
    with pytest.raises(EndpointUnsuitable, match="bisection") as err:
        run_method(name, config)
    assert "before the bias" in str(err.value)


@pytest.mark.parametrize("name", ["exact", "topk"])
def test_bias_ignored_entirely_is_refused(name, small):
    config = SimulatorConfig(vocab_size=small.vocab_size, logprobs_after_bias=False, bias_steers_sampling=False)
    with pytest.raises(EndpointUnsuitable, match="no method can see beyond the top-k"):
        run_method(name, config)


@pytest.mark.parametrize("name", ["exact", "topk"])
def test_narrow_bias_range_reports_unrecovered_with_true_bounds(name, small):
    config = SimulatorConfig(vocab_size=small.vocab_size, bias_max=20.0)
    result, _, truth = run_method(name, config, top_k=20)
    missing = result.unrecovered_ids
    assert missing.size > 0, "tokens more than 20 nats below the top cannot be revealed"
    recovered = ~np.isnan(result.logprobs)
    assert np.nanmax(np.abs(result.logprobs[recovered] - truth[recovered])) < 1e-4
    bounds = np.array([result.upper_bounds[int(i)] for i in missing])
    assert not np.isnan(bounds).any()
    assert (truth[missing] <= bounds + 1e-4).all()
    assert 0 < result.unrecovered_mass_bound() <= 1


def llama_like(endpoint, held, prompt="The capital of France is"):
    """Answers withheld when the generated token is held; an unbiased one asked again with the held tokens at -B
    (what OpenAIEndpoint does for llama-server)."""

    def answer(query):
        got = endpoint.answer(prompt, query)
        if got.sampled not in held:
            return got
        if query.bias:
            return Answer(WITHHELD, None)
        again = endpoint.answer(prompt, Query.make({i: -endpoint.limits.bias_max for i in held}, query.top_logprobs))
        return Answer(again.top_ids[0], again.top_logprobs[0], again.top_ids, again.top_logprobs)

    return answer


def held_tokens(truth, share=10):
    ranked = np.argsort(-truth)
    rng = np.random.default_rng(3)
    return {int(ranked[0]), *(int(i) for i in rng.choice(ranked[25:], truth.size // share, replace=False))}


def test_forced_searches_held_tokens_by_bisection_to_eps():
    """The top token and a tenth of the rest are held: forced finds every one of them within eps of the truth."""
    config = SimulatorConfig(vocab_size=1000, logprobs_after_bias=False)
    endpoint = SimulatedEndpoint(config)
    truth = endpoint.true_logprobs("The capital of France is")
    held = held_tokens(truth)
    ctx = Context(config.vocab_size, endpoint.limits, top_k=20, eps=1e-3, withheld=frozenset(held))
    result, calls = drive(METHODS["forced"](ctx), llama_like(endpoint, held))
    assert result.unrecovered_ids.size == 0
    error = np.abs(result.logprobs - truth)
    assert error.max() <= result.precision <= 1e-3
    assert any("found by bisection" in note for note in result.notes)
    assert calls < config.vocab_size + 25 * len(held)


def test_forced_without_the_list_bounds_withheld_tokens_by_the_top_k():
    config = SimulatorConfig(vocab_size=1000, logprobs_after_bias=False)
    endpoint = SimulatedEndpoint(config)
    truth = endpoint.true_logprobs("The capital of France is")
    held = held_tokens(truth) - {int(np.argmax(truth))}
    ctx = Context(config.vocab_size, endpoint.limits, top_k=20)
    result, _ = drive(METHODS["forced"](ctx), llama_like(endpoint, held))
    assert set(result.unrecovered_ids.tolist()) == held
    assert all(truth[i] <= result.upper_bounds[i] for i in held)
    known = ~np.isnan(result.logprobs)
    assert np.abs(result.logprobs - truth)[known].max() <= result.precision


@pytest.mark.parametrize("name", ["visible", "direct"])
def test_a_withheld_answer_leaves_everything_unrecovered_without_a_crash(name):
    config = SimulatorConfig(vocab_size=1000)
    ctx = Context(config.vocab_size, Limits(top_logprobs=1000), top_k=20)
    result, calls = drive(METHODS[name](ctx), lambda q: Answer(WITHHELD, None))
    assert calls == 1 and result.unrecovered_ids.size == config.vocab_size
    assert any("withheld" in note for note in result.notes)


@pytest.mark.parametrize("name", ["bisection", "forced", "topk"])
def test_a_withheld_first_answer_is_refused_with_a_message(name):
    config = SimulatorConfig(vocab_size=1000)
    ctx = Context(config.vocab_size, Limits(), top_k=20)
    with pytest.raises(EndpointUnsuitable, match="withheld its whole answer"):
        drive(METHODS[name](ctx), lambda q: Answer(WITHHELD, None))


def test_forced_stops_where_a_forced_token_outside_the_top_k_reports_the_sentinel():
    """OpenAI's contract: the check's tokens come from the top-k, whose values are shown, but a token forced from
    outside it reports -9999. forced must stop at the first such token, not spend V - k calls and then call every
    token 'more than 100 nats below the top'."""
    config = SimulatorConfig(vocab_size=2_000, logprobs_after_bias=False, sampled_logprob="sentinel")
    endpoint = SimulatedEndpoint(config)
    ctx = Context(endpoint.vocab_size, endpoint.limits, top_k=20)
    with pytest.raises(EndpointUnsuitable, match="bisection"):
        drive(METHODS["forced"](ctx), lambda q: endpoint.answer("The capital of France is", q))
    assert endpoint.calls <= 1 + 3 + 1
