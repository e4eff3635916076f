"""Extraction methods. Each module's `plan(ctx)` is a generator of query batches (see base.py)."""

from __future__ import annotations

from typing import Callable

from ..endpoint import Answer, Query
from . import bisection, direct, exact, forced, topk, visible
from .base import Context, MethodResult, Plan

METHODS: dict[str, Callable[[Context], Plan]] = {
    "bisection": bisection.plan,
    "exact": exact.plan,
    "topk": topk.plan,
    "direct": direct.plan,
    "forced": forced.plan,
    "visible": visible.plan,
}


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


__all__ = ["METHODS", "Context", "MethodResult", "Plan", "drive"]
