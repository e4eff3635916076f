"""The progress of a run as numbers: what the runner reports (`RunStart`), and the `Tally` that turns
its calls into a `Snapshot` (calls answered of calls expected, the recent call rate and the ETA it
gives, prompts finished, spend against the caps, retries and 429s).

Progress is counted in calls, not prompts (prompts finish in groups, so a count of prompts sits at 0 for most
of a run): calls answered this run of the calls expected (each method's count per prompt, from its spec;
answers a resumed run finds in its checkpoint are not expected again). Where the expected count is not exact
(bisection's is a fit; a prompt that needed more or fewer calls, a failed one) it is an estimate corrected as
prompts finish; it never falls below the calls made, so the bar never passes 100%. The display that draws a
Snapshot lives beside the CLI (logprob_cli/_display.py).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from logprob_cli.endpoints import Pressure

RATE_WINDOW = 30.0
SAMPLE_SECONDS = 0.25


@dataclass(frozen=True)
class RunStart:
    """What the runner knows when the calls begin.

    calls_expected: calls this run is expected to make (None: unknown); exact: it is a count, not an estimate.
    cost / calls_spent: the checkpoint's US$ (None: price unknown) and calls so far, earlier runs included, as
    --max-cost / --max-calls count them.
    """

    prompts: int
    prompts_done: int
    calls_expected: int | None
    exact: bool
    cost: Callable[[], float | None] = lambda: None
    calls_spent: Callable[[], int] = lambda: 0
    max_calls: int | None = None
    max_cost: float | None = None
    pressure: Callable[[], Pressure | None] | None = None  # the endpoint's `pressure`


@dataclass(frozen=True)
class Snapshot:
    """The numbers shown at one moment (see module docstring); None where not known."""

    elapsed: float
    calls: int
    expected: int | None
    exact: bool
    rate: float
    eta: float | None
    prompts_done: int
    prompts_failed: int
    prompts: int
    silent_for: float
    cost: float | None
    calls_spent: int
    max_calls: int | None
    max_cost: float | None
    pressure: Pressure | None

    @property
    def fraction(self) -> float | None:
        return None if not self.expected else min(1.0, self.calls / self.expected)


class Tally:
    """Counts what the runner reports and turns it into a `Snapshot` (thread-safe to read)."""

    def __init__(self, run: RunStart, clock: Callable[[], float] = time.monotonic):
        self.run = run
        self.clock = clock
        self.calls = 0
        self.prompts_done = run.prompts_done
        self.prompts_failed = 0
        self.planned = run.calls_expected  # the start's count, corrected by each finished prompt's overrun
        self.exact = run.exact
        self.started = self.last_call = clock()
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])

    def call(self) -> None:
        now = self.clock()
        self.calls += 1
        self.last_call = now
        if now - self._samples[-1][0] >= SAMPLE_SECONDS:
            self._samples.append((now, self.calls))
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
                self._samples.popleft()
        if self.planned is not None and self.calls > self.planned:
            self.exact = False

    def prompt_done(self, extra_calls: int, failed: bool = False) -> None:
        """A prompt finished (or failed) after `extra_calls` more calls than expected (negative: fewer)."""
        if failed:
            self.prompts_failed += 1
        else:
            self.prompts_done += 1
        if self.planned is not None and extra_calls:
            self.planned, self.exact = self.planned + extra_calls, False

    @property
    def expected(self) -> int | None:
        """The calls this run should make in all: the corrected count, and never fewer than those made (calls past
        it while a prompt runs raise it until the prompt ends and corrects the count by its overrun, once)."""
        return None if self.planned is None else max(self.calls, self.planned)

    def rate(self, now: float) -> float:
        """Calls a second over the later half of the run so far, at most the last RATE_WINDOW seconds: a run's
        first moments, its first plans, are slower than the rest. It falls while no call is answered, to 0 once
        none was in the window."""
        window = min(RATE_WINDOW, (now - self.started) / 2)
        since = now - window
        calls_then, later = self._samples[0][1], None
        for t, calls in reversed(tuple(self._samples)):  # a copy: the display's thread reads while calls come in
            if t <= since:
                calls_then = calls
                if later is not None:  # the count between two samples, read off the line joining them
                    calls_then += (later[1] - calls) * (since - t) / (later[0] - t)
                break
            later = (t, calls)
        return (self.calls - calls_then) / max(window, 1e-9)

    def snapshot(self) -> Snapshot:
        now = self.clock()
        rate = self.rate(now)
        expected = self.expected
        eta = (expected - self.calls) / rate if expected is not None and rate > 0 else None
        run = self.run
        return Snapshot(
            now - self.started, self.calls, expected, self.exact, rate, eta,
            self.prompts_done, self.prompts_failed, run.prompts, now - self.last_call,
            run.cost(), run.calls_spent(), run.max_calls, run.max_cost, run.pressure() if run.pressure else None,
        )
