"""Extraction methods. Each module's `plan(ctx)` is a generator of query batches (see _base.py), and its
`SPEC` (_spec.py) declares what it needs, what it costs and its help line; SPECS collects them.

A new method is one module here with its plan and its SPEC, added to SPECS: `auto` (cheapest),
`estimate`, the CLI's choices and help, and tests/test_method_specs.py then cover it."""

from __future__ import annotations

from typing import Callable

from logprob_cli.endpoints import Answer, Limits, Query
from logprob_cli.methods import _bisection, _direct, _exact, _forced, _image, _listed, _topk, _visible
from logprob_cli.methods._image import Image, Learner, learning_prompts
from logprob_cli.methods._base import DEFAULT_EPS, Context, MethodResult, Plan
from logprob_cli.methods._spec import MethodSpec, Needs, Observations
from logprob_cli.methods._base import BFLOAT16_ROUNDOFF, bias_response, lowered_top_response, probe_ranks, roundoff

# In the README's order, cheapest first where several fit: a tie goes to the earlier (listed before direct:
# the same one call for chosen tokens, without the whole vocabulary in the answer; topk before exact).
SPECS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        _listed.SPEC, _direct.SPEC, _topk.SPEC, _exact.SPEC, _forced.SPEC, _bisection.SPEC, _visible.SPEC, *_image.SPECS
    )
}
METHODS: dict[str, Callable[[Context], Plan]] = {name: spec.plan for name, spec in SPECS.items()}


def cheapest(
    observed: Observations, vocab_size: int, top_k: int, limits: Limits, eps: float = DEFAULT_EPS, targets: int = 0
) -> MethodSpec:
    """The method `auto` runs: of those whose needs were observed, the cheapest that recovers every token
    (by spec.calls for the whole vocabulary, or for `targets` chosen tokens; ties to the earlier in SPECS),
    else the cheapest of the rest (visible needs nothing)."""
    usable = [spec for spec in SPECS.values() if spec.needs.met_by(observed)]
    return min(usable, key=lambda spec: (not spec.recovers_all, spec.calls(vocab_size, top_k, eps, limits, targets)))


def with_image(name: str, vocab_size: int, top_k: int, limits: Limits, eps: float, targets: int,
               image_rank: int | None) -> str:
    """The method `auto` runs where an image is given: the image method of the picked method `name` where there is
    one and it is cheaper for the given image's rank; with --image auto (`image_rank` None: learned by the run) the
    image method always, since its warm-up prompts are the base method's own whole vectors and cost nothing more."""
    variant = f"{name}+image"
    if variant not in SPECS:
        return name
    if image_rank is None:
        return variant
    cheaper = SPECS[variant].calls(vocab_size, top_k, eps, limits, targets, rank=image_rank) < SPECS[name].calls(
        vocab_size, top_k, eps, limits, targets
    )
    return variant if cheaper else name


def drive(plan: Plan, answer: Callable[[Query], Answer]) -> tuple[MethodResult, int]:
    """Run a plan to the end, answering each query in order; returns the result and the call count."""
    calls = 0
    queries = next(plan)
    while True:
        answers = [answer(q) for q in queries]
        calls += len(answers)
        try:
            queries = plan.send(answers)
        except StopIteration as stop:
            return stop.value, calls


__all__ = [
    "BFLOAT16_ROUNDOFF",
    "Context",
    "DEFAULT_EPS",
    "Image",
    "Learner",
    "METHODS",
    "MethodResult",
    "MethodSpec",
    "Needs",
    "Observations",
    "Plan",
    "SPECS",
    "bias_response",
    "cheapest",
    "drive",
    "learning_prompts",
    "lowered_top_response",
    "probe_ranks",
    "roundoff",
    "with_image",
]
