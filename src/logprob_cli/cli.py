"""The `logprobs` command: a thin Typer layer over runner.extract_batch and output.render_inspect."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__
from .endpoint import Endpoint, EndpointError, EndpointUnsuitable, Prompt
from .inputs import InputError, read_prompts
from .journal import Journal, JournalError
from .methods import METHODS
from .output import render_inspect
from .probe import probe as run_probe
from .runner import NoProgress, checkpoint_path, extract_batch
from .openai_endpoint import OpenAIEndpoint, server_facts
from .server import ServerConfig, SimulatorServer
from .simulator import SimulatedEndpoint, SimulatorConfig
from .vocabulary import VocabularyError, load_vocabulary, server_vocabulary

app = typer.Typer(
    help="Extract FULL next-token probability distributions from LLM APIs that only return the top-k logprobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
Method = enum.Enum("Method", {"auto": "auto", **{name: name for name in METHODS}}, type=str)
METHOD_HELP = (
    "auto: probe the endpoint and use the cheapest valid method. direct: the whole vocabulary in one call. "
    "topk: k-1 tokens per call against a reference token. exact: k per call via the group normalizer where float32 "
    "allows. forced: one call per token (pre-bias logprobs, bias steers sampling). bisection: argmax-only search. "
    "visible: the top-k only, the rest bounded."
)
Api = enum.Enum("Api", {"chat": "chat", "completions": "completions"}, type=str)
SIM_HELP = (
    "Built-in simulator switch (repeatable), e.g. vocab_size=20000, logprobs_after_bias=false, "
    "bias_steers_sampling=false, sampled_logprob=sentinel, top_logprobs_cap=5, bias_max=50, precision=bfloat16, "
    "tie_noise=1e-4, seed=1."
)
MODEL_HELP = "Model of an OpenAI-compatible endpoint. Without it, the built-in simulated endpoint answers (offline)."
POST_BIAS_HELP = (
    "llama-server only: read its post-sampling probabilities, which reflect the bias (sampler truncation switched "
    "off), so topk and exact work there."
)
TOKENIZER_HELP = (
    "The model's vocabulary: a tiktoken encoding (o200k_base, cl100k_base), a .tiktoken file, a tokenizer.json, "
    "or simulator:SIZE (default: from the model name, via tiktoken)."
)


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


def make_endpoint(
    sim: list[str],
    model: str | None,
    base_url: str | None,
    api_key: str | None,
    api: str,
    system: str | None,
    extra_body: str | None,
    tokenizer: str | None,
    post_bias: bool = False,
) -> Endpoint:
    """The simulator when no model is named, else an OpenAI-compatible endpoint with its vocabulary."""
    if model is None:
        if base_url and not sim:
            fail("--base-url needs --model: name the model the server serves", 2)
        return SimulatedEndpoint(simulator_config(sim))
    if sim:
        fail("--sim switches apply to the built-in simulator, not to --model endpoints", 2)
    if post_bias and not base_url:
        fail("--post-bias is llama-server's mode: give its --base-url", 2)
    try:
        extra = json.loads(extra_body) if extra_body else None
    except ValueError as error:
        fail(f"--extra-body is not valid JSON: {error}", 2)
    if extra is not None and not isinstance(extra, dict):
        fail("--extra-body must be a JSON object", 2)
    try:
        facts = server_facts(base_url, api_key, model) if base_url else {}
    except EndpointError as error:
        fail(str(error))
    try:
        if tokenizer is None and "n_vocab" in facts:
            vocabulary = server_vocabulary(facts["n_vocab"])
        else:
            vocabulary = load_vocabulary(tokenizer or model)
    except VocabularyError as error:
        hint = "" if tokenizer else f" (no --tokenizer given, so the model name {model!r} was tried)"
        fail(f"{error}{hint}", 2)
    if "n_vocab" in facts and vocabulary.size != facts["n_vocab"]:
        fail(f"--tokenizer {vocabulary.name} has {vocabulary.size:,} tokens but the server's model has {facts['n_vocab']:,}", 2)
    if post_bias and facts.get("dialect") != "llama.cpp":
        fail("--post-bias is llama-server's mode (post_sampling_probs), and this server is not llama-server", 2)
    return OpenAIEndpoint(
        model, vocabulary, base_url=base_url, api_key=api_key, api=api, system=system, extra_body=extra,
        dialect=facts.get("dialect", "openai"), post_bias=post_bias,
    )


def describe(endpoint: Endpoint) -> str:
    if isinstance(endpoint, SimulatedEndpoint):
        return f"built-in simulated endpoint (offline, no API key; {endpoint.vocab_size:,}-token vocabulary)"
    info = endpoint.describe()
    return f"{info['model']} at {info['base_url']} ({info['api']} API; vocabulary {info['vocabulary']}, {endpoint.vocab_size:,} tokens)"


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


@app.command()
def extract(
    input: str = typer.Argument(..., help="JSONL file, one prompt per line ({\"prompt\": ...} or {\"messages\": [...]}); - reads stdin."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Parquet file to write (default: the input's name with .parquet). Its checkpoint (NAME.checkpoint.sqlite) sits beside it."),
    method: Method = typer.Option("auto", "--method", "-m", help=METHOD_HELP),
    top_k: int = typer.Option(20, "--top-k", "-k", min=2, help="Logprobs to request per call (capped by the endpoint)."),
    eps: float = typer.Option(1e-3, "--eps", min=1e-6, help="bisection: precision in nats."),
    concurrency: int = typer.Option(16, "--concurrency", "-c", min=1, max=1024, help="Calls in flight at once."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard this output's checkpoint and start over."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    sim: list[str] = typer.Option([], "--sim", metavar="KEY=VALUE", help=SIM_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    base_url: Optional[str] = typer.Option(None, "--base-url", envvar="OPENAI_BASE_URL", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8080/v1 (default: OpenAI's)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", show_envvar=True, help="API key (default: $OPENAI_API_KEY). Never written to the checkpoint, output or logs."),
    api: Api = typer.Option("chat", "--api", help="chat: /chat/completions; completions: legacy /completions (string-keyed logprobs, at most 5)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message put before plain prompts (chat API)."),
    extra_body: Optional[str] = typer.Option(None, "--extra-body", metavar="JSON", help='Extra request fields for the server, e.g. \'{"return_tokens_as_token_ids": true}\'.'),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    post_bias: bool = typer.Option(False, "--post-bias", help=POST_BIAS_HELP),
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
    endpoint = make_endpoint(sim, model, base_url, api_key, api.value, system, extra_body, tokenizer, post_bias)
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
            f"endpoint: {describe(endpoint)}\n"
            f"{len(prompts)} prompts -> {output}",
            highlight=False,
        )

    def announce(chosen: str, report) -> None:
        if quiet:
            return
        why = f" (probe: {'; '.join(report.reasons)})" if report else ""
        console.print(f"method: {chosen}{why}", highlight=False)
    progress = NoProgress() if quiet else RichProgress(console) if console.is_terminal else PlainProgress(console)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = extract_batch(prompts, output, endpoint, method.value, top_k, eps, concurrency, progress, announce)
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
def probe(
    prompt: str = typer.Option("The capital of France is", "--prompt", help="Prompt to probe with."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    sim: list[str] = typer.Option([], "--sim", metavar="KEY=VALUE", help=SIM_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    base_url: Optional[str] = typer.Option(None, "--base-url", envvar="OPENAI_BASE_URL", help="OpenAI-compatible API root."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="API key (default: $OPENAI_API_KEY)."),
    api: Api = typer.Option("chat", "--api", help="chat or completions."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for plain prompts (chat API)."),
    extra_body: Optional[str] = typer.Option(None, "--extra-body", metavar="JSON", help="Extra request fields."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    post_bias: bool = typer.Option(False, "--post-bias", help=POST_BIAS_HELP),
) -> None:
    """Measure what an endpoint reveals (about 8 calls) and recommend the method that fits."""
    endpoint = make_endpoint(sim, model, base_url, api_key, api.value, system, extra_body, tokenizer, post_bias)
    async def measure():
        try:
            return await run_probe(endpoint, Prompt(id=0, line=0, prompt=prompt))
        finally:
            if hasattr(endpoint, "aclose"):
                await endpoint.aclose()

    try:
        report = asyncio.run(measure())
    except EndpointError as error:
        fail(str(error))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"probe of {describe(endpoint)}", show_header=False, title_justify="left")
    rows = [
        ("top_logprobs honoured", f"{report.top_logprobs_cap:,}" + (" (whole vocabulary)" if report.whole_vocabulary else "")),
        ("bias steers sampling", yes_no(report.bias_steers_sampling)),
        ("logprobs reflect the bias", "yes (post-bias)" if report.logprobs_after_bias else "no (pre-bias)"),
        ("forced token's own logprob", report.forced_logprob),
        ("bias above 100", report.bias_above_100),
        ("more than 300 bias entries", report.bias_entries_over_300),
        ("returned precision", report.precision),
        ("identical calls agree", yes_no(report.deterministic)),
        ("concurrent calls agree", yes_no(report.concurrent_agree)),
        ("tokens identified by", ", ".join(report.identity)),
        ("calls spent probing", str(report.calls)),
        ("recommended method", f"[bold]{report.recommended}[/] (~{report.estimated_calls:,} calls per prompt)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    for reason in report.reasons:
        Console().print(f"- {reason}", highlight=False)


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


@app.command()
def serve(
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Port on 127.0.0.1."),
    sim: list[str] = typer.Option([], "--sim", metavar="KEY=VALUE", help=SIM_HELP),
    model: str = typer.Option("simulator", "--model", help="Model name the server answers to."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require this API key (Bearer token)."),
    token_ids: bool = typer.Option(False, "--token-ids", help="llama.cpp dialect: every logprob entry carries its token id."),
    latency: float = typer.Option(0.0, "--latency", min=0.0, help="Seconds to wait per request, like a remote API."),
    log: bool = typer.Option(False, "--log", help="Log each request to stderr."),
) -> None:
    """Serve the built-in simulator as an OpenAI-compatible HTTP API on 127.0.0.1 (Ctrl-C stops it)."""
    config = ServerConfig(simulator_config(sim), model, api_key, token_ids, latency, log)
    try:
        server = SimulatorServer(config, port=port)
    except OSError as error:
        fail(f"cannot listen on 127.0.0.1:{port}: {error.strerror or error}")
    err.print(
        f"serving the simulator ({config.simulator.vocab_size:,} tokens) as model {model!r} at {server.url}\n"
        f"try: logprobs extract examples/prompts.jsonl --model {model} --base-url {server.url} "
        f"--tokenizer simulator:{config.simulator.vocab_size} --api-key any",
        highlight=False,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


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
