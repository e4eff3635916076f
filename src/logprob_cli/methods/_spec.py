"""What a method declares about itself, once: `MethodSpec`, read by the probe's recommendation,
`estimate` and the CLI's `--method` help.

Each method module ends with `SPEC = MethodSpec(...)`; methods/__init__.py collects them in SPECS.
A spec says what the method needs from the endpoint (`Needs`, over the properties the probe
observes), what one prompt costs (`calls`), whether that count is exact or a fitted estimate,
and one help line. Nothing else keeps a copy of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from logprob_cli.endpoints import EndpointUnsuitable, Limits
from logprob_cli.methods._base import Context, Plan

CallModel = Callable[[int, int, float, Limits, int], int]


class Observations(Protocol):
    """The endpoint properties a method may need, as the probe observes them (probe.ProbeReport has
    them): None, or "unknown", where the probe could not tell, which meets no need."""

    top_logprobs_cap: int
    whole_vocabulary: bool
    bias_steers_sampling: bool | None
    logprobs_after_bias: bool | None
    forced_logprob: str
    chosen_ids: bool


@dataclass(frozen=True)
class Needs:
    """What a method needs from the endpoint; each True field must have been observed True.

    forced_logprob_reported: a token forced by the bias reports its own unbiased logprob.
    chosen_ids: a call returns the logprobs of the ids it lists (vLLM's logprob_token_ids).
    min_top_k: the fewest logprobs a call must return.
    image: the model's image (the image methods): given by the user, never observed, so `auto` never
        picks a method that needs it.
    """

    whole_vocabulary: bool = False
    bias_steers_sampling: bool = False
    logprobs_after_bias: bool = False
    forced_logprob_reported: bool = False
    chosen_ids: bool = False
    min_top_k: int = 1
    image: bool = False

    def met_by(self, observed: Observations) -> bool:
        """Whether every need was observed (an unknown property meets none)."""
        return (
            observed.top_logprobs_cap >= self.min_top_k
            and (observed.whole_vocabulary or not self.whole_vocabulary)
            and (observed.bias_steers_sampling is True or not self.bias_steers_sampling)
            and (observed.logprobs_after_bias is True or not self.logprobs_after_bias)
            and (observed.forced_logprob == "reported" or not self.forced_logprob_reported)
            and (observed.chosen_ids or not self.chosen_ids)
            and not self.image
        )


@dataclass(frozen=True)
class MethodSpec:
    """One extraction method, declared next to its plan.

    name: what `method=` names it. plan: its plan (_base.py). help: one line for `--method`'s help,
    with its cost in calls. needs: what it needs from the endpoint. picked_when: the observations
    under which the probe picks it, in words, shown by `estimate` for `auto` (empty: a cheaper
    method with the same needs is always picked instead). calls(vocab_size, top_k, eps, limits, targets):
    the calls one prompt costs on a fresh checkpoint, top_k already capped by the endpoint, for the
    whole vocabulary (targets = 0) or for that many chosen tokens outside the visible top-k; a method that
    needs an image also takes its rank (`rank=`), without which its count is unknown (ValueError).
    exact_count: calls() is what the simulator spends to the call (else a fit, within 10%).
    extra_tokens: the completion tokens (billed as output) one prompt's calls generate beyond one a call, by the
    same arguments as calls; None: none (a call drawing m choices generates m, every other one).
    recovers_all: it recovers every token the endpoint can reveal (visible: the top-k only).
    checks_bias: its plan starts with check_bias, whose second call a run with the probe's findings skips
    (`Context.bias_observed`): `calls` counts it, `calls_observed` does not.
    """

    name: str
    plan: Callable[[Context], Plan]
    help: str
    needs: Needs
    calls: CallModel
    exact_count: bool
    picked_when: str = ""
    recovers_all: bool = True
    extra_tokens: CallModel | None = None
    checks_bias: bool = False

    def calls_observed(self, vocab_size: int, top_k: int, eps: float, limits: Limits, targets: int = 0, **image: Any) -> int:
        """`calls` where the run's probe observed the bias (auto): one fewer for a plan that starts with check_bias."""
        return self.calls(vocab_size, top_k, eps, limits, targets, **image) - int(self.checks_bias)

    def generated_tokens(self, vocab_size: int, top_k: int, eps: float, limits: Limits, targets: int, calls: int) -> int:
        """The completion tokens of a prompt costing `calls` calls: one a call, and the extra ones."""
        return calls + (self.extra_tokens(vocab_size, top_k, eps, limits, targets) if self.extra_tokens else 0)


def at_least_two(method: str, top_k: int) -> None:
    """Raise EndpointUnsuitable where fewer than 2 logprobs a call leave `method` no reference beside a token."""
    if top_k < 2:
        raise EndpointUnsuitable(f"{method} needs at least 2 logprobs per call; this endpoint returns {top_k}")


def one_call(vocab_size: int, top_k: int, eps: float, limits: Limits, targets: int = 0) -> int:
    """The call model of a method that asks once a prompt."""
    return 1
