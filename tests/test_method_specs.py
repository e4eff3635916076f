"""Each method's cost model exists once, in its spec: runs spend what it says, and estimate, the probe's
recommendation and `--help` all read it; the method layer's messages name methods, not CLI flags."""

import ast
import asyncio
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from conftest import run_method
from logprob_cli import methods
from logprob_cli.cli import app
from logprob_cli.endpoints._base import EndpointUnsuitable, Prompt
from logprob_cli.run._estimate import calls_per_prompt, estimate_run
from logprob_cli.methods import DEFAULT_EPS, METHODS, SPECS, cheapest
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.run._probe import MAX_TOP_K, probe
from logprob_cli.endpoints._simulator import SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._vocabulary import load_vocabulary

VOCAB = 2000
PROMPT = Prompt(id=0, line=1, prompt="The capital of France is")
# A simulator that behaves as each method needs (and, for auto, on which the probe picks it).
SUITED = {
    "listed": {"logprobs_after_bias": False, "bias_steers_sampling": False, "chosen_ids": 128},
    "direct": {"top_logprobs_cap": VOCAB},
    "topk": {},
    "exact": {},
    "forced": {"logprobs_after_bias": False},
    "bisection": {"logprobs_after_bias": False, "sampled_logprob": "sentinel"},
    "visible": {"logprobs_after_bias": False, "bias_steers_sampling": False},
    "topk+image": {},  # with an image (tests/test_image.py): the probe never picks an image method
    "forced+image": {"logprobs_after_bias": False},
    "bisection+image": {"logprobs_after_bias": False, "sampled_logprob": "sentinel"},
}
RUNS = [
    ("listed", 20, DEFAULT_EPS),
    ("direct", 20, DEFAULT_EPS),
    ("topk", 5, DEFAULT_EPS),
    ("topk", 20, DEFAULT_EPS),
    ("exact", 5, DEFAULT_EPS),
    ("exact", 20, DEFAULT_EPS),
    ("forced", 1, DEFAULT_EPS),
    ("forced", 5, DEFAULT_EPS),
    ("forced", 20, DEFAULT_EPS),
    ("bisection", 5, 1e-2),
    ("bisection", 20, 1e-2),
    ("visible", 5, DEFAULT_EPS),
    ("visible", 20, DEFAULT_EPS),
]


def within(estimated: int, real: int, tolerance: float = 0.10) -> bool:
    return abs(estimated - real) <= tolerance * real


def test_every_method_is_declared_once_in_the_registry():
    assert list(SPECS) == list(METHODS) == list(SUITED)
    assert all(spec.name == name and METHODS[name] is spec.plan for name, spec in SPECS.items())


@pytest.mark.parametrize("name, top_k, eps", RUNS)
def test_a_run_spends_what_the_spec_says(name, top_k, eps):
    config = SimulatorConfig(vocab_size=VOCAB, **SUITED[name])
    limits = SimulatedEndpoint(config).limits
    expected = SPECS[name].calls(VOCAB, min(top_k, limits.top_logprobs), eps, limits)
    result, calls, _ = run_method(name, config, top_k=top_k, eps=eps)
    assert not result.unrecovered_ids.size or name == "visible"
    if SPECS[name].exact_count:
        assert calls == expected, (calls, expected)
    else:
        assert within(expected, calls), (expected, calls)


@pytest.mark.parametrize("name, top_k, eps", RUNS)
def test_estimate_bills_each_prompt_by_the_spec(name, top_k, eps):
    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB, **SUITED[name]))
    (row,) = estimate_run([PROMPT], endpoint, name, top_k=top_k, eps=eps)
    k = min(top_k, endpoint.limits.top_logprobs)
    assert row.calls_per_prompt == SPECS[name].calls(VOCAB, k, eps, endpoint.limits)
    assert row.calls_per_prompt == calls_per_prompt(name, VOCAB, k, eps, endpoint.limits)


def test_topk_and_exact_are_refused_below_two_logprobs_a_call():
    for name in ("topk", "exact"):
        with pytest.raises(EndpointUnsuitable, match="at least 2 logprobs"):
            calls_per_prompt(name, VOCAB, 1)


@pytest.mark.parametrize("picked", ["direct", "topk", "forced", "bisection", "visible"])  # listed: for targets
def test_the_probe_recommends_by_the_spec_and_the_run_spends_about_that(picked):
    config = SimulatorConfig(vocab_size=VOCAB, **SUITED[picked])
    report = asyncio.run(probe(SimulatedEndpoint(config), PROMPT))
    k = min(report.top_logprobs_cap, MAX_TOP_K)
    assert report.recommended == picked
    assert report.estimated_calls == SPECS[picked].calls_observed(VOCAB, k, DEFAULT_EPS, report.limits())
    observed, calls, _ = run_method(picked, config, top_k=k, bias_observed=report.bias_observed())  # as auto runs it
    assert within(report.estimated_calls, calls), (report.estimated_calls, calls)
    checked, checking, _ = run_method(picked, config, top_k=k)  # the method named: its plan checks the bias itself
    assert checking == calls + SPECS[picked].checks_bias  # the probe's findings stand for the check's second call
    assert np.array_equal(observed.logprobs, checked.logprobs, equal_nan=True)


def test_auto_rows_without_a_probe_are_the_specs_the_probe_would_pick():
    endpoint = OpenAIEndpoint("gpt-4o-mini", load_vocabulary("o200k_base"))
    rows = estimate_run([PROMPT], endpoint, "auto")
    offered = [name for name, spec in SPECS.items() if spec.picked_when and not spec.needs.chosen_ids]
    assert [row.method for row in rows] == offered  # no listed row: this endpoint takes no list of ids
    k = min(20, endpoint.limits.top_logprobs)
    for row in rows:
        spec = SPECS[row.method]
        assert row.condition == spec.picked_when
        assert row.calls_per_prompt == spec.calls_observed(endpoint.vocab_size, k, DEFAULT_EPS, endpoint.limits)


def test_exact_is_never_cheaper_than_topk_so_auto_never_picks_it():
    limits = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB)).limits
    for vocab in (300, 2000, 100_000, 200_019):
        for k in (2, 3, 5, 19, 20):
            assert SPECS["exact"].calls(vocab, k, DEFAULT_EPS, limits) >= SPECS["topk"].calls(vocab, k, DEFAULT_EPS, limits)


def test_cheapest_prefers_a_method_that_recovers_every_token():
    report = asyncio.run(probe(SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB)), PROMPT))
    assert SPECS["visible"].calls(VOCAB, 20, DEFAULT_EPS, report.limits()) < SPECS["topk"].calls(VOCAB, 20, DEFAULT_EPS, report.limits())
    assert cheapest(report, VOCAB, 20, report.limits()).name == "topk"


def test_help_shows_each_specs_line():
    text = CliRunner().invoke(app, ["extract", "--help"], env={"COLUMNS": "2000"}).output
    for spec in SPECS.values():
        assert f"{spec.name}: {spec.help}." in text


def _cli_flags() -> set[str]:
    """The flags of the commands that run methods (serve's mirror a vLLM server's, which messages may name)."""
    group = typer.main.get_command(app)
    return {
        flag
        for name, command in group.commands.items()
        if name != "serve"
        for param in command.params
        if param.param_type_name == "option"
        for flag in (*param.opts, *param.secondary_opts)
        if flag.startswith("--")
    }


def _strings(tree: ast.AST) -> list[str]:
    """Every string literal but docstrings."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
        and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_method_layer_names_no_cli_flag():
    flags = _cli_flags()
    assert "--method" in flags and "--top-k" in flags
    for path in Path(methods.__file__).parent.glob("*.py"):
        for text in _strings(ast.parse(path.read_text())):
            assert not [flag for flag in flags if flag in text], (path.name, text)


def test_a_refusal_names_the_method_that_would_work_as_a_setting():
    config = SimulatorConfig(vocab_size=VOCAB, **SUITED["forced"])
    with pytest.raises(EndpointUnsuitable, match='Use method="bisection"'):
        run_method("topk", config)
    with pytest.raises(EndpointUnsuitable, match='Use method="auto"'):
        run_method("direct", config)


def test_auto_rows_leave_out_a_method_the_cap_rules_out():
    endpoint = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB, top_logprobs_cap=1))
    rows = estimate_run([PROMPT], endpoint, "auto")
    assert [row.method for row in rows] == ["direct", "forced", "bisection", "visible"]
    assert {row.method: row.calls_per_prompt for row in rows}["forced"] == SPECS["forced"].calls(VOCAB, 1, DEFAULT_EPS, endpoint.limits)


@pytest.mark.parametrize("method, observed", [("topk", (True, False)), ("bisection", (False, True))])
def test_a_plan_refuses_where_the_probes_findings_lack_what_it_needs(method, observed):
    """The probe's findings stand for the check's second call, so they refuse as that call would, after one call."""
    with pytest.raises(EndpointUnsuitable, match="the run's probe found this endpoint has none"):
        run_method(method, SimulatorConfig(vocab_size=VOCAB), bias_observed=observed)
