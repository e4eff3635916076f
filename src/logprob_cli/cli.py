"""The `logprobs` command: a thin Typer layer over runner.extract_batch and output.render_inspect."""

from __future__ import annotations

import dataclasses
import enum
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__
from .endpoint import EndpointError, EndpointUnsuitable
from .inputs import InputError, read_prompts
from .journal import Journal, JournalError
from .methods import METHODS
from .output import render_inspect
from .runner import checkpoint_path, extract_batch
from .simulator import SimulatedEndpoint, SimulatorConfig

app = typer.Typer(
    help="Extract FULL next-token probability distributions from LLM APIs that only return the top-k logprobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
Method = enum.Enum("Method", {name: name for name in METHODS}, type=str)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def version_callback(value: bool) -> None:
    if value:
        print(f"logprobs {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Show the version."),
) -> None:
    """Extract FULL next-token probability distributions from LLM APIs that only return the top-k logprobs."""


def simulator_config(switches: list[str]) -> SimulatorConfig:
    """SimulatorConfig from KEY=VALUE switches, typed by the config's own fields."""
    fields = {f.name: f for f in dataclasses.fields(SimulatorConfig)}
    values = {}
    for switch in switches:
        key, sep, raw = switch.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            fail(f"--sim takes KEY=VALUE with KEY one of: {', '.join(fields)} (got {switch!r})", 2)
        kind = type(getattr(SimulatorConfig(), key))
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("expected true or false")
                values[key] = raw.lower() in ("true", "1", "yes")
            else:
                values[key] = kind(raw)
        except ValueError as error:
            fail(f"--sim {key}: {raw!r} is not a valid {kind.__name__} ({error})", 2)
    try:
        return SimulatorConfig(**values)
    except ValueError as error:
        fail(f"--sim: {error}", 2)


class RichProgress:
    """Prompts done/total, calls, calls/s and ETA on a terminal."""

    def __init__(self, console: Console):
        self.bar = Progress(
            TextColumn("[bold]prompts"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[calls]:,} calls"),
            TextColumn("{task.fields[rate]:,.0f} calls/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.calls = 0
        self._shown = 0.0
        self._t0 = time.monotonic()

    def start(self, total: int, done: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("extract", total=total, completed=done, calls=0, rate=0.0)

    def call(self) -> None:
        self.calls += 1
        now = time.monotonic()
        if now - self._shown > 0.1:
            self._shown = now
            self.bar.update(self.task, calls=self.calls, rate=self.calls / max(now - self._t0, 1e-9))

    def prompt_done(self) -> None:
        self.bar.update(self.task, advance=1, calls=self.calls)

    def stop(self) -> None:
        if hasattr(self, "task"):
            self.bar.update(self.task, calls=self.calls, rate=self.calls / max(time.monotonic() - self._t0, 1e-9))
        self.bar.stop()


class PlainProgress:
    """One line per finished prompt, for logs and pipes."""

    def __init__(self, console: Console):
        self.console = console
        self.calls = 0

    def start(self, total: int, done: int) -> None:
        self.total, self.done = total, done
        self.console.print(f"{done} of {total} prompts already done", highlight=False)

    def call(self) -> None:
        self.calls += 1

    def prompt_done(self) -> None:
        self.done += 1
        self.console.print(f"prompt {self.done}/{self.total} done ({self.calls:,} calls so far)", highlight=False)

    def stop(self) -> None:
        pass


class Silent:
    def start(self, total: int, done: int) -> None:
        pass

    def call(self) -> None:
        pass

    def prompt_done(self) -> None:
        pass

    def stop(self) -> None:
        pass


@app.command()
def extract(
    input: str = typer.Argument(..., help="JSONL file, one prompt per line ({\"prompt\": ...} or {\"messages\": [...]}); - reads stdin."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Parquet file to write [default: the input's name with .parquet]. Its checkpoint (NAME.checkpoint.sqlite) sits beside it."),
    method: Method = typer.Option("topk", "--method", "-m", help="topk: k-1 tokens per call against a reference token. exact: k per call via the group normalizer where float32 allows. bisection: argmax-only search, for endpoints whose logprobs ignore the bias."),
    top_k: int = typer.Option(20, "--top-k", "-k", min=2, help="Logprobs to request per call (capped by the endpoint)."),
    eps: float = typer.Option(1e-3, "--eps", min=1e-6, help="bisection: precision in nats."),
    concurrency: int = typer.Option(16, "--concurrency", "-c", min=1, max=1024, help="Calls in flight at once."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard this output's checkpoint and start over."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    sim: list[str] = typer.Option([], "--sim", metavar="KEY=VALUE", help="Built-in simulator switch (repeatable), e.g. vocab_size=20000, logprobs_after_bias=false, bias_steers_sampling=false, sampled_logprob=sentinel, top_logprobs_cap=5, bias_max=50, precision=bfloat16, tie_noise=1e-4, seed=1."),
) -> None:
    """Extract one full next-token log-probability vector per prompt into Parquet (resumable)."""
    if input == "-" and output is None:
        fail("reading prompts from stdin: name the output with -o/--output", 2)
    output = output or Path(input).with_suffix(".parquet")
    journal_path = checkpoint_path(output)
    try:
        prompts = read_prompts(input)
    except InputError as error:
        fail(f"{error}\nNothing was sent to the endpoint; fix the input and run again.", 2)
    endpoint = SimulatedEndpoint(simulator_config(sim))
    if fresh:
        try:
            Journal.discard(journal_path)
        except JournalError as error:
            fail(str(error))
        output.unlink(missing_ok=True)
    elif output.exists() and not journal_path.exists():
        fail(f"{output} exists and has no checkpoint beside it; add --fresh to overwrite it or choose -o", 2)

    console = Console(stderr=True)
    if not quiet:
        console.print(
            f"endpoint: built-in simulated endpoint (offline, no API key; {endpoint.vocab_size:,}-token vocabulary)\n"
            f"method: {method.value}, k={min(top_k, endpoint.limits.top_logprobs)}; {len(prompts)} prompts -> {output}",
            highlight=False,
        )
    progress = Silent() if quiet else RichProgress(console) if console.is_terminal else PlainProgress(console)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = extract_batch(prompts, output, endpoint, method.value, top_k, eps, concurrency, progress)
    except (JournalError, EndpointUnsuitable, EndpointError) as error:
        progress.stop()
        fail(str(error))
    except OSError as error:
        progress.stop()
        fail(f"{error}. The checkpoint {journal_path} keeps every answer so far: fix the problem and run again.")
    progress.stop()
    if summary.interrupted:
        fail(
            f"interrupted: {summary.finished} of {summary.total} prompts finished, saved in {output}; "
            "run the same command again to resume",
            130,
        )
    if not quiet:
        console.print(
            f"wrote {summary.rows_written} rows to {output} ({summary.calls:,} calls this run; checkpoint {journal_path})",
            highlight=False,
        )
    if summary.failures:
        for prompt_id, message in summary.failures.items():
            err.print(f"[red]prompt {prompt_id!r} failed:[/] {message}", highlight=False)
        fail(f"{len(summary.failures)} prompts failed; run the same command again to retry them")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A Parquet file written by `logprobs extract`."),
    top: int = typer.Option(5, "--top", "-n", min=1, max=50, help="Top tokens to show per prompt."),
) -> None:
    """Show each prompt's top tokens, entropy and diagnostics."""
    if not path.exists():
        fail(f"{path} does not exist", 2)
    try:
        render_inspect(path, Console(), top=top)
    except ValueError as error:
        fail(str(error))


if __name__ == "__main__":
    sys.exit(app())
