import math

import numpy as np
import pytest

from logprob_cli.endpoint import EndpointUnsuitable
from logprob_cli.simulator import SimulatorConfig

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
