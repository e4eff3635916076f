"""Chosen tokens ("targets") through every method, against the simulator's ground truth (float32 engine).

Each plan reads only the targets its first call did not show, at the cost its spec declares."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pytest

from logprob_cli.methods import SPECS, Context, cheapest, drive, METHODS
from logprob_cli.methods._bisection import few_chance
from logprob_cli.endpoints import Answer, EndpointRejected, Limits, Query
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig

PROMPT = "Is the sky green? Answer:"
OPENAI = SimulatorConfig(vocab_size=20_000, logprobs_after_bias=False, sampled_logprob="sentinel")
POST_BIAS = SimulatorConfig(vocab_size=20_000)
PRE_BIAS = SimulatorConfig(vocab_size=20_000, logprobs_after_bias=False)


def far_targets(config: SimulatorConfig, count: int, ranks=(200, 5000), prompt=PROMPT) -> tuple[int, ...]:
    """`count` ids ranked between ranks[0] and ranks[1] (far outside the top 20), in no particular order."""
    order = np.argsort(-SimulatedEndpoint(config).true_logprobs(prompt))
    picked = np.random.default_rng(count).choice(order[ranks[0]:ranks[1]], count, replace=False)
    return tuple(int(i) for i in picked)


def run(method: str, config: SimulatorConfig, targets: tuple[int, ...], **settings):
    endpoint = SimulatedEndpoint(config)
    ctx = Context(endpoint.vocab_size, endpoint.limits, targets=targets, **settings)
    result, calls = drive(METHODS[method](ctx), lambda q: endpoint.answer(PROMPT, q))
    return result, calls, endpoint.true_logprobs(PROMPT), endpoint.limits


def check_only_targets(result, targets, truth, tolerance):
    """Every target within `tolerance` (and within the stated precision); every other unshown token NaN."""
    got = result.logprobs[list(targets)]
    assert not np.isnan(got).any()
    error = np.abs(got - truth[list(targets)]).max()
    assert error <= tolerance and error <= result.precision + 1e-12
    assert np.count_nonzero(~np.isnan(result.logprobs)) <= len(targets) + 20


@pytest.mark.parametrize("method", ["topk", "exact"])
@pytest.mark.parametrize("count", [3, 40])
def test_topk_and_exact_read_targets_k_minus_one_a_call(method, count):
    targets = far_targets(POST_BIAS, count)
    result, calls, truth, limits = run(method, POST_BIAS, targets)
    assert calls == 2 + math.ceil(count / 19) == SPECS[method].calls(20_000, 20, 1e-3, limits, count)
    check_only_targets(result, targets, truth, 1e-4)


def test_forced_spends_one_call_a_target():
    targets = far_targets(PRE_BIAS, 5)
    result, calls, truth, limits = run("forced", PRE_BIAS, targets)
    assert calls == 1 + 3 + 5 == SPECS["forced"].calls(20_000, 20, 1e-3, limits, 5)
    check_only_targets(result, targets, truth, 1e-5)


def test_targets_in_the_top_k_cost_nothing_more():
    order = np.argsort(-SimulatedEndpoint(POST_BIAS).true_logprobs(PROMPT))
    targets = (int(order[3]), int(order[17]))
    result, calls, truth, _ = run("topk", POST_BIAS, targets)
    assert calls == 2  # the check alone
    check_only_targets(result, targets, truth, 1e-5)


@pytest.mark.parametrize("eps", [1e-3, 1e-1])
def test_bisection_finds_targets_on_openai_contract_within_eps(eps):
    """Pre-bias top-20, -9999 for a forced token, bias steers sampling: argmax-only, anchored on the top's logprob."""
    targets = far_targets(OPENAI, 3)
    result, calls, truth, limits = run("bisection", OPENAI, targets, eps=eps)
    check_only_targets(result, targets, truth, eps)
    model = SPECS["bisection"].calls(20_000, 20, eps, limits, 3)
    assert abs(calls - model) <= 0.1 * calls
    assert not result.upper_bounds


def test_bisection_bounds_a_target_beyond_the_bias_range():
    config = SimulatorConfig(vocab_size=20_000, logprobs_after_bias=False, sampled_logprob="sentinel", bias_max=12.0)
    truth = SimulatedEndpoint(config).true_logprobs(PROMPT)
    deep = int(np.argmin(truth))  # far more than 12 nats below the top
    near = int(np.argsort(-truth)[20])  # the first outside the top 20
    assert truth[near] > truth.max() - 10.0
    result, _, truth, _ = run("bisection", config, (near, deep), eps=1e-3)
    assert np.isnan(result.logprobs[deep]) and truth[deep] <= result.upper_bounds[deep] <= truth.max() - 12.0 + 1e-6
    assert abs(result.logprobs[near] - truth[near]) <= 1e-3


def test_visible_bounds_targets_outside_the_top_k():
    order = np.argsort(-SimulatedEndpoint(OPENAI).true_logprobs(PROMPT))
    shown, hidden = int(order[2]), int(order[500])
    result, calls, truth, _ = run("visible", OPENAI, (hidden, shown))
    assert calls == 1 and abs(result.logprobs[shown] - truth[shown]) < 1e-5 and np.isnan(result.logprobs[hidden])
    assert set(result.upper_bounds) == {hidden} and result.upper_bounds[hidden] >= truth[hidden]


def test_direct_reads_every_target_in_one_call():
    config = SimulatorConfig(vocab_size=5_000, top_logprobs_cap=5_000, logprobs_after_bias=False)
    targets = far_targets(config, 4)
    result, calls, truth, _ = run("direct", config, targets)
    assert calls == 1 and np.abs(result.logprobs[list(targets)] - truth[list(targets)]).max() < 1e-5
    assert not result.upper_bounds


@dataclass
class Seen:
    top_logprobs_cap: int = 20
    whole_vocabulary: bool = False
    bias_steers_sampling: bool | None = True
    logprobs_after_bias: bool | None = False
    forced_logprob: str = "sentinel"
    chosen_ids: bool = False


def test_auto_prices_targets_not_the_vocabulary():
    limits = SimulatedEndpoint(OPENAI).limits
    assert cheapest(Seen(), 100_000, 20, limits, targets=3).name == "bisection"
    assert cheapest(Seen(forced_logprob="reported"), 100_000, 20, limits, targets=3).name == "forced"
    assert cheapest(Seen(logprobs_after_bias=True), 100_000, 20, limits, targets=3).name == "topk"
    listing = type(limits)(limits.top_logprobs, limits.bias_max, limits.bias_entries, token_ids=100)
    assert cheapest(Seen(chosen_ids=True), 100_000, 20, listing, targets=3).name == "listed"


def test_few_chance_maximises_the_expected_shrink():
    assert few_chance(1) == pytest.approx(0.5, abs=0.002)
    assert few_chance(3) == pytest.approx(0.265, abs=0.005)
    assert few_chance(300) < 2 / 300 * 1.5


def test_listed_reads_every_target_in_one_call_where_ids_may_be_listed():
    config = SimulatorConfig(vocab_size=20_000, logprobs_after_bias=False, chosen_ids=128)
    targets = far_targets(config, 50)
    result, calls, truth, limits = run("listed", config, targets)
    assert calls == 1 == SPECS["listed"].calls(20_000, 20, 1e-3, limits, 50)
    assert np.abs(result.logprobs[list(targets)] - truth[list(targets)]).max() < 1e-5
    assert not result.upper_bounds


def test_listed_is_refused_where_no_list_is_taken():
    with pytest.raises(Exception, match="listed needs an endpoint"):
        run("listed", OPENAI, far_targets(OPENAI, 2))


OPENAI_N = SimulatorConfig(vocab_size=20_000, logprobs_after_bias=False, sampled_logprob="sentinel", max_draws=128)


@pytest.mark.parametrize("eps", [1e-3, 1e-1])
def test_bisection_with_draws_finds_targets_in_about_four_calls_each(eps):
    """OpenAI's contract with its `n` (128 choices a request at a temperature): the draws locate the targets, greedy
    calls prove the brackets, so the values are as sure as plain bisection's, at far fewer calls."""
    targets = far_targets(OPENAI_N, 3)
    result, calls, truth, limits = run("bisection", OPENAI_N, targets, eps=eps)
    check_only_targets(result, targets, truth, eps)
    assert (calls - 2) / 3 <= 5.0
    assert calls < SPECS["bisection"].calls(20_000, 20, eps, Limits(), 3)  # plain bisection's count
    assert abs(calls - SPECS["bisection"].calls(20_000, 20, eps, limits, 3)) <= 0.1 * calls
    assert any("drew up to 128 choices" in note for note in result.notes)


def test_bisection_proves_what_the_draws_suggest_where_the_endpoint_ignores_n():
    """An endpoint that declares draws but answers each request with one greedy token (no draws): the drawing phase
    stops at its first answer and greedy bisection finds the same values."""
    endpoint = SimulatedEndpoint(OPENAI_N)
    targets = far_targets(OPENAI_N, 3)

    def greedy_only(query):
        return dataclasses.replace(endpoint.answer(PROMPT, dataclasses.replace(query, draws=1, temperature=0.0)), drawn=())

    ctx = Context(endpoint.vocab_size, endpoint.limits, targets=targets)
    result, calls = drive(METHODS["bisection"](ctx), greedy_only)
    check_only_targets(result, targets, endpoint.true_logprobs(PROMPT), 1e-3)


def test_drawn_choices_survive_the_journal_form_and_draws_change_the_key():
    endpoint = SimulatedEndpoint(OPENAI_N)
    query = Query.make({5: 3.0}, draws=16, temperature=1.0)
    answer = endpoint.answer(PROMPT, query)
    assert len(answer.drawn) == 16 and answer.sampled == answer.drawn[0]
    assert Answer.from_bytes(answer.to_bytes()) == answer
    assert endpoint.answer(PROMPT, query) == answer  # a replay draws the same
    assert query.key() != Query.make({5: 3.0}).key() == Query(((5, 3.0),)).key()
    plain = Answer(3, -1.0, (3,), (-1.0,))
    assert Answer.from_bytes(plain.to_bytes()) == plain and len(plain.to_bytes()) == 20 + 16
    with pytest.raises(EndpointRejected):
        SimulatedEndpoint(OPENAI).answer(PROMPT, query)
