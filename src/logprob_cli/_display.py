"""What `logprobs extract` shows while it runs, on a terminal (a live display) or in a pipe or log (plain lines).

It draws the run's `Snapshot` (run/_progress.py): calls answered of calls expected, the percentage, the ETA
from the recent call rate, prompts finished, spend against --max-calls / --max-cost, and, on HTTP endpoints,
the current request-rate limit and the retries and 429s so far. When no call has been answered for
SILENT_SECONDS the display says so, with the retries behind it. Expected counts that are estimates are shown
as such.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from logprob_cli.run import RunStart, Snapshot, Tally
from logprob_cli.wording import plural

SILENT_SECONDS = 5.0  # no answer for this long: the display says so
PLAIN_INTERVAL = 10.0  # seconds between plain lines in a pipe or log


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


class _Tallied:
    """What both displays share: the console they draw on, and the run's `Tally` (made by `start`), which
    counts the runner's calls and finished prompts."""

    def __init__(self, console: Console, clock: Callable[[], float]):
        self.console = console
        self.clock = clock
        self.tally: Tally | None = None

    def call(self) -> None:
        self.tally.call()

    def prompt_done(self, extra_calls: int, failed: bool = False) -> None:
        self.tally.prompt_done(extra_calls, failed)


class RichProgress(_Tallied):
    """The live display on a terminal (see module docstring), redrawn 4 times a second."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic):
        super().__init__(console, clock)
        self._live: Live | None = None

    def start(self, run: RunStart) -> None:
        self.tally = Tally(run, self.clock)
        self._live = Live(_Display(self.tally), console=self.console, refresh_per_second=4, transient=False)
        self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class PlainProgress(_Tallied):
    """Plain lines for pipes and logs: one at the start, one every `interval` seconds, one at the end."""

    def __init__(self, console: Console, interval: float = PLAIN_INTERVAL, clock: Callable[[], float] = time.monotonic):
        super().__init__(console, clock)
        self.interval = interval
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
