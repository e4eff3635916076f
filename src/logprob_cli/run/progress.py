"""What `logprobs extract` shows while it runs, on a terminal (a live display) or in a pipe or log (plain lines).

Progress is counted in calls, not prompts (prompts finish in groups, so a count of prompts sits at 0 for most
of a run): calls answered this run of the calls expected (each method's count per prompt, see
estimate.calls_per_prompt; answers a resumed run finds in its checkpoint are not expected again), the
percentage, the recent call rate (`Tally.rate`) and the ETA it gives, prompts finished, spend
against --max-calls / --max-cost, and, on HTTP endpoints, the current request-rate limit and the retries and
429s so far. Where the expected count is not exact (bisection's is a fit; a prompt that needed more or fewer
calls, a failed one) it is shown as an estimate and corrected as prompts finish; it never falls below the
calls made, so the bar never passes 100%. When no call has been answered for SILENT_SECONDS the display says
so, with the retries behind it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from logprob_cli.endpoints.base import Pressure
from logprob_cli.wording import plural

RATE_WINDOW = 30.0
SAMPLE_SECONDS = 0.25
SILENT_SECONDS = 5.0
PLAIN_INTERVAL = 10.0


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
        self.expected = run.calls_expected
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
        if self.expected is not None and self.calls > self.expected:
            self.expected, self.exact = self.calls, False

    def prompt_done(self, extra_calls: int, failed: bool = False) -> None:
        """A prompt finished (or failed) after `extra_calls` more calls than expected (negative: fewer)."""
        if failed:
            self.prompts_failed += 1
        else:
            self.prompts_done += 1
        if self.expected is not None and extra_calls:
            self.expected, self.exact = max(self.calls, self.expected + extra_calls), False

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


def clock_text(seconds: float | None) -> str:
    """0:07, 12:03 or 2:05:09; -:-- when unknown."""
    if seconds is None:
        return "-:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def calls_text(s: Snapshot) -> str:
    """calls 1,234 of 5,265 (23.4%) -- or of ~5,265 (estimate), or with no total when none is known."""
    if s.expected is None:
        return f"calls {s.calls:,}"
    approx, note = ("", "") if s.exact else ("~", ", estimate")
    return f"calls {s.calls:,} of {approx}{s.expected:,} ({100 * (s.fraction or 0):.1f}%{note})"


def detail_parts(s: Snapshot) -> list[str]:
    """Prompts, spend against the caps, the rate limit, retries and 429s, and a stall if there is one."""
    failed = f" ({s.prompts_failed:,} failed)" if s.prompts_failed else ""
    parts = [f"prompts {s.prompts_done:,}/{s.prompts:,}{failed}"]
    if s.max_calls is not None:
        parts.append(f"{s.calls_spent:,} of --max-calls {s.max_calls:,}")
    if s.cost is not None:
        parts.append(f"${s.cost:,.4f}" + (f" of --max-cost ${s.max_cost:,.2f}" if s.max_cost is not None else " spent"))
    p = s.pressure
    if p is not None:
        parts.append("no rate limit known" if p.rpm is None else f"limit {p.rpm:,.0f} rpm")
        parts.append(f"{p.retries:,} retries, {p.throttles:,} 429s")
    if s.silent_for >= SILENT_SECONDS:
        waiting = " (retrying)" if p is not None and p.retries else ""
        parts.append(f"no answer for {s.silent_for:.0f} s{waiting}")
    return parts


def plain_line(s: Snapshot) -> str:
    """One line for logs: [elapsed] calls ... | rate, ETA | details."""
    eta = f", ETA {clock_text(s.eta)}" if s.expected is not None else ""
    return f"[{clock_text(s.elapsed)}] {calls_text(s)}, {s.rate:,.0f} calls/s{eta} | " + " | ".join(detail_parts(s))


class _Display:
    """A renderable Rich re-reads at every refresh, so the display moves even while no call is answered."""

    def __init__(self, tally: Tally):
        self.tally = tally

    def __rich__(self) -> Group:
        s = self.tally.snapshot()
        head = Table.grid(padding=(0, 1))
        head.add_row(
            ProgressBar(total=s.expected or None, completed=s.calls, width=30),
            Text(calls_text(s)),
            Text(f"{s.rate:,.0f}/s"),
            Text(f"ETA {clock_text(s.eta)}" if s.expected is not None else ""),
            Text(f"elapsed {clock_text(s.elapsed)}", style="dim"),
        )
        return Group(head, Text("  " + " · ".join(detail_parts(s)), style="dim"))


class RichProgress:
    """The live display on a terminal (see module docstring), redrawn 4 times a second."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.clock = clock
        self.tally: Tally | None = None
        self._live: Live | None = None

    def start(self, run: RunStart) -> None:
        self.tally = Tally(run, self.clock)
        self._live = Live(_Display(self.tally), console=self.console, refresh_per_second=4, transient=False)
        self._live.start()

    def call(self) -> None:
        self.tally.call()

    def prompt_done(self, extra_calls: int, failed: bool = False) -> None:
        self.tally.prompt_done(extra_calls, failed)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class PlainProgress:
    """Plain lines for pipes and logs: one at the start, one every `interval` seconds, one at the end."""

    def __init__(self, console: Console, interval: float = PLAIN_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.interval = interval
        self.clock = clock
        self.tally: Tally | None = None
        self._stopped = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self, run: RunStart) -> None:
        self.tally = Tally(run, self.clock)
        if run.calls_expected is None:
            expected = "an unknown number of calls"
        else:
            expected = ("" if run.exact else "~") + plural(run.calls_expected, "call")
        self.console.print(
            f"{run.prompts_done:,} of {plural(run.prompts, 'prompt')} already done; {expected} to make",
            highlight=False, soft_wrap=True,
        )
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._ticker.start()

    def call(self) -> None:
        self.tally.call()

    def prompt_done(self, extra_calls: int, failed: bool = False) -> None:
        self.tally.prompt_done(extra_calls, failed)

    def line(self) -> str:
        return plain_line(self.tally.snapshot())

    def stop(self) -> None:
        if self._ticker is None:
            return
        self._stopped.set()
        self._ticker.join()
        self._ticker = None
        self.console.print(self.line(), highlight=False, soft_wrap=True)

    def _tick(self) -> None:
        while not self._stopped.wait(self.interval):
            self.console.print(self.line(), highlight=False, soft_wrap=True)
