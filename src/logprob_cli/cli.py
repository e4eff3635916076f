"""The `logprobs` command: a thin Typer layer over runner.extract_batch and output.render_inspect."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
from inspect import Parameter, signature as signature_of
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, Optional

import typer
import typer.core
from rich import box
from rich.console import Console
from rich.table import Table

from logprob_cli.version import __version__
from logprob_cli.run import BudgetReached
from logprob_cli.endpoints import Endpoint, Prompt
from logprob_cli.errors import LogprobError, message_of, reworded
from logprob_cli.run import Estimate, ProbeReport, estimate_run, format_count, format_dollars, format_duration, in_process_latency, simulator_latency
from logprob_cli.io import InputError, read_prompts, with_targets
from logprob_cli.run import Refused
from logprob_cli.methods import METHODS, SPECS, Image
from logprob_cli.io import CompareError, ImageError, compare_files, image_setting, render_comparison, render_inspect
from logprob_cli.run import Price, parse_price, price_for
from logprob_cli._display import PlainProgress, RichProgress
from logprob_cli.run import PROBE_CALLS, image_method, probe as run_probe
from logprob_cli.run import discard
from logprob_cli.run import NoProgress, RunSummary, extract_batch
from logprob_cli.endpoints import EndpointSettings, SettingsError, build_endpoint, with_served_model
from logprob_cli.run import RunConfig, default_output, price_of_calls, read_batch, with_completion_ids
from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.endpoints import SimulatorConfig
from logprob_cli.wording import plural, top_k_capped
from logprob_cli.endpoints import redact
from logprob_cli.endpoints import VocabularyError


class _FlagsWithoutPlaceholder:
    """Flags in --help show no `<bool>` value placeholder (typer 0.29 renders one for every flag, --help included)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class PlainHelpCommand(_FlagsWithoutPlaceholder, typer.core.TyperCommand):
    """A command whose --help reads as users expect: flags without `<bool>`, and the usage line naming
    a required argument by its metavar (`INPUT`) rather than typer's `{input}`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar or param.name.upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class PlainHelpGroup(_FlagsWithoutPlaceholder, typer.core.TyperGroup):
    """The `logprobs` group: its flags without `<bool>` too."""


app = typer.Typer(
    cls=PlainHelpGroup,
    help="Extract FULL next-token probability distributions from LLM APIs that only return the top-k logprobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
Method = enum.Enum("Method", {"auto": "auto", **{name: name for name in METHODS}}, type=str)
METHOD_HELP = "auto: probe the endpoint and use the cheapest valid method. " + " ".join(
    f"{spec.name}: {spec.help}." for spec in SPECS.values()
)
Api = enum.Enum("Api", {"chat": "chat", "completions": "completions"}, type=str)
SIM_HELP = (
    "Built-in simulator switch (repeatable), e.g. vocab_size=20000, logprobs_after_bias=false, "
    "bias_steers_sampling=false, sampled_logprob=sentinel, top_logprobs_cap=5, bias_max=50, precision=bfloat16, "
    "tie_noise=1e-4, max_draws=128, seed=1."
)
MODEL_HELP = (
    "Model of an OpenAI-compatible endpoint, or hf:PATH for a local transformers model folder (offline; "
    "pip install 'logprob-cli[hf]'). Without it, the built-in simulated endpoint answers (offline)."
)
POST_BIAS_HELP = (
    "llama-server only: read its post-sampling probabilities, which reflect the bias (sampler truncation switched "
    "off), so topk and exact work there."
)
RPM_HELP = (
    "Requests per minute to stay under. Without it the limit the server announces (x-ratelimit-* headers) is "
    "used, and 429s slow the run down and it recovers on its own (estimate: no limit)."
)
MAX_CALLS_HELP = (
    "Stop cleanly before the checkpoint's calls (this run and earlier ones) pass this many; the same command with a "
    "higher cap resumes."
)
PRICE_HELP = (
    "US$ per 1M prompt and completion tokens, e.g. 2.5,10 (default: the built-in table for common OpenAI models; "
    "the built-in simulator is free)."
)
SHARD_HELP = (
    "Take part I of N (0-based) of the prompts, chosen by a hash of each id: N machines or job-array tasks split a "
    "batch with no coordination, and their outputs (default NAME.shard-I-of-N.parquet) read as one table."
)
TARGET_HELP = (
    "A token to read for every prompt, at any rank: its exact text, which must be one token of the model's "
    "vocabulary (matched by bytes, so \" Yes\" and \"Yes\" differ); repeat for several. The run then writes "
    "the targets' logprobs instead of whole vectors, at a cost that grows with the targets, not the vocabulary. "
    "A line's own \"targets\" key does the same per prompt."
)
TOKENIZER_HELP = (
    "The model's vocabulary: a tiktoken encoding (o200k_base, cl100k_base), a .tiktoken file, a tokenizer.json, "
    "a model's .gguf file, or simulator:SIZE (default: from the model name, via tiktoken; llama-server's own; "
    "for llama-cpp-python's server, the .gguf file it names when that file is on this machine)."
)

# Options shared by extract, probe and estimate, declared once so their flags and help cannot drift apart.
InputArgument = Annotated[str, typer.Argument(
    metavar="INPUT", help="JSONL file, one prompt per line ({\"prompt\": ...} or {\"messages\": [...]}); - reads stdin.")]
MethodOption = Annotated[Method, typer.Option("--method", "-m", help=METHOD_HELP)]
TargetOption = Annotated[list[str], typer.Option("--target", "-t", metavar="TEXT", help=TARGET_HELP)]
TargetIdOption = Annotated[list[int], typer.Option(
    "--target-id", metavar="ID", min=0, help="A token to read for every prompt, by its id in the vocabulary (as --target).")]
TopKOption = Annotated[int, typer.Option("--top-k", "-k", min=2, help="Logprobs to request per call (capped by the endpoint).")]
ImageOption = Annotated[Optional[str], typer.Option(
    "--image", metavar="auto|PATH",
    help="The model's image, for the image methods (topk+image, forced+image, bisection+image; auto picks one where "
    "cheaper): auto learns it from the run's first whole vectors; PATH reads it from a .npy/.npz V x d matrix (or a "
    "saved basis), a GGUF or safetensors model file (its output layer, else the tied embeddings; a Hugging Face "
    "model folder holding one), or an earlier run's Parquet output (its whole vectors).")]
StoreOption = Annotated[str, typer.Option(
    "--store", metavar="vector|top:N",
    help="vector: each row's whole vector. top:N: the N most likely tokens (top_ids, top_logprobs) and rest_mass "
    "instead, far smaller for distillation-sized jobs; with targets, how many top entries a row keeps (default: "
    "--top-k). Changing it on a resumed run rewrites the output in the new form.")]
StoreVectorOption = Annotated[bool, typer.Option(
    "--store-vector", help="With targets or --store top:N, also write each prompt's whole vector (NULL beyond what was read).")]
EpsOption = Annotated[float, typer.Option("--eps", min=1e-6, help="bisection: precision in nats.")]
ConcurrencyOption = Annotated[int, typer.Option("--concurrency", "-c", min=1, max=1024, help="Calls in flight at once.")]
SimOption = Annotated[list[str], typer.Option("--sim", metavar="KEY=VALUE", help=SIM_HELP)]
ModelOption = Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)]
BaseUrlOption = Annotated[Optional[str], typer.Option(
    "--base-url",
    help="OpenAI-compatible API root, e.g. http://127.0.0.1:8080/v1 (default with --model: $OPENAI_BASE_URL, else "
    "OpenAI's). Its GET /models (free) is "
    "asked first: llama-server tells its vocabulary there.")]
ApiKeyOption = Annotated[Optional[str], typer.Option(
    "--api-key",
    help="API key (default with --model: $OPENAI_API_KEY; the simulator and hf: models ignore the variable). Never "
    "written to the checkpoint, output or logs.")]
ApiOption = Annotated[Api, typer.Option(
    "--api", "--endpoint",
    help="chat: /chat/completions; completions: legacy /completions (string-keyed logprobs, at most 5).")]
SystemOption = Annotated[Optional[str], typer.Option(
    "--system", help="System message put before plain prompts (chat API); it adds prompt tokens.")]
ExtraBodyOption = Annotated[Optional[str], typer.Option(
    "--extra-body", metavar="JSON", help='Extra request fields for the server, e.g. \'{"return_tokens_as_token_ids": true}\'.')]
TokenizerOption = Annotated[Optional[str], typer.Option("--tokenizer", help=TOKENIZER_HELP)]
PostBiasOption = Annotated[bool, typer.Option("--post-bias", help=POST_BIAS_HELP)]
RpmOption = Annotated[Optional[float], typer.Option("--rpm", min=0.001, help=RPM_HELP)]
TpmOption = Annotated[Optional[float], typer.Option(
    "--tpm", min=0.001, help="Tokens per minute to stay under (prompt + 1 per call); as --rpm, learnt from the server "
    "if not given (estimate: no limit).")]
MaxDrawsOption = Annotated[Optional[int], typer.Option(
    "--max-draws", min=1, help="Most choices a call may draw at a temperature (OpenAI's n, which bisection uses to find "
    "chosen tokens in fewer calls; default: what the endpoint allows, 128 on OpenAI). 1: greedy calls only, which "
    "cost less money on short prompts (a drawing call bills up to 128 completion tokens).")]
PriceOption = Annotated[Optional[str], typer.Option("--price", metavar="PROMPT,COMPLETION", help=PRICE_HELP)]

FLAGS = {
    "model": "--model", "base_url": "--base-url", "api_key": "--api-key", "tokenizer": "--tokenizer",
    "post_bias": "--post-bias", "extra_body": "--extra-body", "rpm": "--rpm", "tpm": "--tpm",
    "simulator": "--sim switches", "price": "--price", "max_cost": "--max-cost", "max_calls": "--max-calls",
    "method": "--method", "method_auto": "--method auto", "api": "--api", "api_chat": "--api chat", "api_completions": "--api completions", "fresh": "--fresh", "output": "output with -o",
    "targets": "--target/--target-id", "store": "--store", "image": "--image", "max_draws": "--max-draws",
}  # how an error's message names each setting on the command line (errors.Worded)
EXIT_CODES = ((Refused, 2), (SettingsError, 2), (VocabularyError, 2), (InputError, 2), (CompareError, 2), (ImageError, 2), (BudgetReached, 3), (LogprobError, 1))

TimeoutOption = Annotated[float, typer.Option("--timeout", min=0.01, help="Seconds to wait for one answer before retrying.")]
RetriesOption = Annotated[int, typer.Option(
    "--retries", min=1, max=100,
    help="Tries per call (5xx, timeouts, cut connections, malformed answers) before its prompt fails; 429s are "
    "waited out and not counted.")]
ENDPOINT_OPTIONS = {
    "sim": SimOption, "model": ModelOption, "base_url": BaseUrlOption, "api_key": ApiKeyOption, "api": ApiOption,
    "system": SystemOption, "extra_body": ExtraBodyOption, "tokenizer": TokenizerOption, "post_bias": PostBiasOption,
    "rpm": RpmOption, "tpm": TpmOption, "timeout": TimeoutOption, "retries": RetriesOption, "max_draws": MaxDrawsOption,
}


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {redact(message)}", highlight=False)
    raise typer.Exit(code)


def exit_code(error: LogprobError) -> int:
    """The exit code of `error` on the command line: its first class in EXIT_CODES (2 for what is refused before
    any call, 3 at a budget cap, 1 for a run that failed)."""
    return next(code for kind, code in EXIT_CODES if isinstance(error, kind))


def flagged(text: str) -> str:
    """`text` (a message from below the CLI) with its settings named by their flags (errors.Worded)."""
    return reworded(text, FLAGS)


def cli_message(error: LogprobError) -> str:
    """`error`'s message with its settings named by their flags."""
    if isinstance(error, InputError):
        return f"{error.worded(FLAGS)}\nNothing was sent to the endpoint; fix the input and run again."
    return error.worded(FLAGS)


def cli_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Decorator of a command: the one edge where an error of the family (errors.py) becomes a message with
    flags and an exit code (exit_code), instead of a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except LogprobError as error:
            fail(cli_message(error), exit_code(error))

    return run


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


@dataclass(frozen=True)
class EndpointOptions:
    """A command's endpoint options as given on the command line (those it does not take keep these defaults)."""

    sim: tuple[str, ...] = ()
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)
    api: str = "chat"
    system: str | None = None
    extra_body: str | None = None
    tokenizer: str | None = None
    post_bias: bool = False
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 60.0
    retries: int = 8
    max_draws: int | None = None

    def settings(self) -> EndpointSettings:
        """These options as EndpointSettings (--sim switches and --extra-body JSON parsed); exits 2 on a switch
        or JSON that does not parse."""
        try:
            extra = json.loads(self.extra_body) if self.extra_body and self.model is not None else None
        except ValueError as error:
            fail(f"--extra-body is not valid JSON: {error}", 2)
        simulator = simulator_config(list(self.sim)) if self.sim else None
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("sim", "extra_body")}
        return EndpointSettings(**fields, extra_body=extra, simulator=simulator)


def with_served_model_named(options: EndpointOptions) -> EndpointOptions:
    """`options` with --model the one model a --base-url server serves where --model is not given (the factory's
    with_served_model, asked before a command reads --model), exiting with the message where it cannot be had."""
    try:
        model = with_served_model(options.settings()).model
    except LogprobError as error:
        fail(cli_message(error), exit_code(error))
    return options if model == options.model else dataclasses.replace(options, model=model)


def endpoint_options(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator of a command: its `options: EndpointOptions` parameter becomes the shared options `names` on the
    command line (declared once, in ENDPOINT_OPTIONS), handed back to the command as one EndpointOptions."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = signature_of(command, eval_str=True)
        defaults = EndpointOptions()
        parameters = []
        for parameter in signature.parameters.values():
            if parameter.name != "options":
                parameters.append(parameter)
                continue
            parameters.extend(
                Parameter(name, parameter.kind, annotation=ENDPOINT_OPTIONS[name],
                          default=[] if name == "sim" else getattr(defaults, name))
                for name in names
            )

        @functools.wraps(command)
        def run(**given: Any) -> None:
            chosen = {name: given.pop(name) for name in names}
            if "sim" in chosen:
                chosen["sim"] = tuple(chosen["sim"])
            if "api" in chosen:
                chosen["api"] = chosen["api"].value
            command(**given, options=with_served_model_named(EndpointOptions(**chosen)))

        run.__signature__ = signature.replace(parameters=parameters)
        return run

    return decorate


def describe(endpoint: Endpoint) -> str:
    return endpoint.describe().summary


@app.command(cls=PlainHelpCommand)
@endpoint_options(
    "sim", "model", "base_url", "api_key", "api", "system", "extra_body", "tokenizer", "post_bias", "rpm", "tpm",
    "timeout", "retries", "max_draws",
)
@cli_errors
def extract(
    input: InputArgument,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Parquet file to write, NAME.parquet (default: the input's name with .parquet). Its checkpoint (NAME.checkpoint.sqlite) sits beside it."),
    method: MethodOption = Method.auto,
    top_k: TopKOption = 20,
    eps: EpsOption = 1e-3,
    concurrency: ConcurrencyOption = 16,
    fresh: bool = typer.Option(False, "--fresh", help="Discard this output and its checkpoint and start over (only files logprobs wrote are deleted)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    options: EndpointOptions = EndpointOptions(),
    max_calls: Optional[int] = typer.Option(None, "--max-calls", min=0, help=MAX_CALLS_HELP),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", min=0.0, help="Stop cleanly before the checkpoint's spend passes this many US$ (see --price); a higher cap resumes."),
    price: PriceOption = None,
    shard: Optional[str] = typer.Option(None, "--shard", metavar="I/N", help=SHARD_HELP),
    target: TargetOption = [],
    target_id: TargetIdOption = [],
    store: StoreOption = "vector",
    store_vector: StoreVectorOption = False,
    image: ImageOption = None,
) -> None:
    """Extract one full next-token log-probability vector per prompt into Parquet (resumable), or the
    logprobs of chosen tokens (--target, or a "targets" key per line)."""
    if input == "-" and output is None:
        fail("reading prompts from stdin: name the output with -o/--output", 2)
    part = parse_shard(shard) if shard else None
    output = output if output is not None else default_output(input, part)
    batch = read_batch(input, output, part, options.api if options.model else None)  # the simulator takes both shapes
    journal_path = batch.checkpoint
    prompts, all_prompts = (targeted(p, target, target_id, input) for p in (batch.prompts, batch.all_prompts))
    if not prompts and not quiet:
        err.print(f"shard {shard} holds none of the {plural(len(all_prompts), 'prompt')}: its output has no rows", highlight=False)
    endpoint = build_endpoint(options.settings())
    run = RunConfig(
        method.value, top_k, eps, concurrency, run_price(price, options.model, endpoint.model, max_cost), max_calls, max_cost,
        store_vector, store, image_setting(image),
    )
    if fresh:
        discard(output, journal_path)

    console = Console(stderr=True)
    if not quiet:
        print_start(console, endpoint, len(prompts), len(all_prompts), part, output)
    announce = method_announcer(console, top_k, endpoint, quiet)
    progress = NoProgress() if quiet else RichProgress(console) if console.is_terminal else PlainProgress(console)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = extract_batch(prompts, output, endpoint, run, progress, announce, schema_prompts=all_prompts)
    except OSError as error:
        progress.stop()
        fail(f"{error}. The checkpoint {journal_path} keeps every answer so far: fix the problem and run again.")
    finally:
        progress.stop()
    report_run(summary, output, journal_path, quiet, console)


def print_start(
    console: Console, endpoint: Endpoint, prompts: int, all_prompts: int, part: tuple[int, int] | None, output: Path
) -> None:
    """extract's first lines: the endpoint, then how many prompts (of which shard of all) go to which file."""
    of_shard = f" (shard {part[0]}/{part[1]} of {all_prompts})" if part else ""
    console.print(
        f"endpoint: {describe(endpoint)}\n"
        f"{plural(prompts, 'prompt')}{of_shard} -> {output}",
        highlight=False,
    )


def method_announcer(
    console: Console, top_k: int, endpoint: Endpoint, quiet: bool
) -> Callable[[str, ProbeReport | None], None]:
    """What extract_batch calls once the method is known: a note where --top-k is above the endpoint's cap
    (the probe's where there is one; printed even when quiet), then the method and the probe's reasons."""

    def announce(chosen: str, report: ProbeReport | None) -> None:
        capped = top_k_capped(top_k, (report.limits() if report else endpoint.limits).top_logprobs)
        if capped:
            console.print(f"note: {capped}", highlight=False)
        if quiet:
            return
        why = f" (probe: {'; '.join(map(flagged, report.reasons))})" if report else ""
        console.print(f"method: {chosen}{why}", highlight=False)

    return announce


def targeted(prompts: list[Prompt], texts: list[str], ids: list[int], source: str) -> list[Prompt]:
    """The prompts, each asking for the --target texts then the --target-id ids (unchanged where none is given)."""
    return with_targets(prompts, [*texts, *ids], source) if texts or ids else prompts


def run_price(price: str | None, model: str | None, named_model: str, max_cost: float | None) -> Price | None:
    """--price parsed, else the built-in table's price of --model (run_config.price_of_calls); exits 2 when --price does
    not parse, or --max-cost has no price to count with."""
    return price_of_calls(model, named_model, parsed_price(price), max_cost)


def parsed_price(price: str | None) -> Price | None:
    """--price parsed (None when not given); exits 2 when it does not parse."""
    try:
        return parse_price(price) if price else None
    except ValueError as error:
        fail(flagged(message_of(error)), 2)


def report_run(summary: RunSummary, output: Path, journal_path: Path, quiet: bool, console: Console) -> None:
    """How the run ended, in the CLI's words: exit 130 interrupted, 3 at a budget cap, 1 when prompts failed."""
    if summary.interrupted:
        fail(
            f"interrupted: {summary.finished} of {plural(summary.total, 'prompt')} finished, saved in {output}; "
            "run the same command again to resume",
            130,
        )
    if summary.budget_reached:
        spent = summary.spent()
        cost = summary.cost()
        fail(
            f"budget reached: {flagged(summary.budget_reached)}. {summary.finished} of {plural(summary.total, 'prompt')} finished, saved "
            f"in {output}; the checkpoint has spent {plural(spent.calls, 'call')}"
            + (f" (${cost:,.4f})" if cost is not None else "")
            + ". Run the same command with a higher cap to resume.",
            3,
        )
    if not quiet:
        cost = summary.cost()
        spent = f", ${cost:,.4f} spent in all" if cost else ""
        console.print(
            f"wrote {plural(summary.rows_written, 'row')} to {output} ({plural(summary.calls, 'call')} this run{spent}; checkpoint {journal_path})",
            highlight=False,
        )
    if summary.failures:
        for prompt_id, message in summary.failures.items():
            err.print(f"[red]prompt {prompt_id!r} failed:[/] {redact(flagged(message))}", highlight=False)
        fail(failure_advice(len(summary.failures), len(summary.failures.keys() & summary.refused)))


def failure_advice(failed: int, refused: int) -> str:
    """The closing line for failed prompts: a rerun is advised only for failures a retry can fix."""
    advice = []
    if failed > refused:
        advice.append(f"{failed - refused} on faults a retry can fix (timeouts, 429s, server errors): run the same command again")
    if refused:
        advice.append(f"{refused} refused by the endpoint: a rerun sends the same requests, so fix what the message says first")
    return f"{plural(failed, 'prompt')} failed; " + "; ".join(advice)


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N) with 0 <= I < N; exits with a usage error otherwise."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        fail(f"--shard takes I/N with 0 <= I < N, e.g. 0/4 ... 3/4 (got {text!r})", 2)
    return i, n


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM does what Ctrl-C does at that moment (during a run: stop sending calls, journal the calls in
    flight, exit 130), rather than raising in the middle of whatever code is running."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def image_row(report: ProbeReport, image: Image | str | None) -> tuple[str, str] | None:
    """The report's line on the image methods: with `image` (--image), the method auto runs with it and its calls
    per prompt (image_method); without, that the image method of the recommended method needs --image; None
    where the recommended method has no image method (direct, listed, visible) and no image was given."""
    variant = f"{report.recommended}+image"
    if image is None:
        if variant not in SPECS:
            return None
        return "image method", f"{variant} reads through the model's image: give --image auto|PATH to see its calls"
    name, calls = image_method(report, image)
    if name == report.recommended:
        why = "it has none" if variant not in SPECS else f"{variant} is not cheaper for rank {image.rank:,}"
        return "with --image", f"{name} ({why})"
    if calls is None:
        base = name.removesuffix("+image")
        return "with --image", (f"[bold]{name}[/] once the run has learned the image from its first whole vectors "
                                f"(read by {base}); its calls per prompt depend on the rank learned")
    return "with --image", f"[bold]{name}[/] (~{calls:,} calls per prompt, image rank {image.rank:,})"


@app.command(cls=PlainHelpCommand, help=f"Measure what an endpoint reveals (about {PROBE_CALLS} calls) and recommend the method that fits.")
@endpoint_options("sim", "model", "base_url", "api_key", "api", "system", "extra_body", "tokenizer", "post_bias", "max_draws")
@cli_errors
def probe(
    prompt: str = typer.Option("The capital of France is", "--prompt", help="Prompt to probe with."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    options: EndpointOptions = EndpointOptions(),
    image: ImageOption = None,
) -> None:
    given = image_setting(image)  # a file it cannot read stops here, before a call
    endpoint = build_endpoint(options.settings())
    async def measure():
        try:
            return await run_probe(endpoint, Prompt(id=0, line=0, prompt=prompt))
        finally:
            await endpoint.aclose()

    report = asyncio.run(measure())
    if as_json:
        found = report.to_dict()
        if given is not None:
            found["image_method"], found["image_calls_per_prompt"] = image_method(report, given)
        print(json.dumps(found, indent=2))
        return
    table = Table(title=f"probe of {describe(endpoint)}", show_header=False, title_justify="left")
    imaged = image_row(report, given)
    for name, value in report.rows() + ([imaged] if imaged else []):
        table.add_row(name, value)
    Console().print(table)
    for reason in report.reasons:
        Console().print(f"- {flagged(reason)}", highlight=False)


@app.command(cls=PlainHelpCommand)
@endpoint_options("sim", "model", "base_url", "api_key", "api", "system", "tokenizer", "rpm", "tpm", "max_draws")
@cli_errors
def estimate(
    input: InputArgument,
    method: MethodOption = Method.auto,
    top_k: TopKOption = 20,
    eps: EpsOption = 1e-3,
    concurrency: ConcurrencyOption = 16,
    options: EndpointOptions = EndpointOptions(),
    latency: Optional[float] = typer.Option(None, "--latency", min=0.0, help="Assumed seconds per call; with --concurrency it sets the pace where no rate limit binds (default: 0.5; the built-in simulator's is timed on this machine)."),
    price: PriceOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON."),
    target: TargetOption = [],
    target_id: TargetIdOption = [],
    image: ImageOption = None,
) -> None:
    """Tell what `extract` would spend (calls, tokens, US$, time) before a call is spent.

    Sends no completion: the built-in simulator is probed offline for --method auto; for another
    endpoint auto shows each method the probe may pick. With --base-url, the server's GET /models
    (free) is asked, as extract does, to learn its vocabulary.
    """
    prompts = targeted(read_prompts(input, api=options.api if options.model else None), target, target_id, input)
    override = parsed_price(price)
    endpoint = build_endpoint(options.settings())
    prompts = with_completion_ids(endpoint, prompts)  # a completion's positions are priced by its token count
    unit_price = price_for(options.model, override)
    timed = endpoint.in_process and latency is None
    first_call = None
    if latency is None and endpoint.in_process and options.model is not None:  # a local model
        first_call, latency = in_process_latency(endpoint, prompts[0], top_k)
    elif latency is None:
        latency = simulator_latency(endpoint, prompts[0], top_k) if endpoint.in_process else 0.5
    setup = EstimateSetup(
        endpoint, method.value, top_k, eps, concurrency, latency, timed, options.rpm, options.tpm, options.model,
        unit_price, price_given=override is not None, image=image_setting(image),
        first_call=first_call,
    )
    rows, report = estimate_rows(prompts, setup)
    if as_json:
        print(json.dumps(estimate_json(setup, rows, report), indent=2))
        return
    console = Console()
    console.print(estimate_table(setup, rows))
    for note in estimate_notes(setup, rows, report):
        console.print(f"- {note}", highlight=False)


@dataclass(frozen=True)
class EstimateSetup:
    """What `estimate` was asked and assumes: the endpoint and method, the run's settings, seconds a call
    (`timed`: timed here on the in-process endpoint, not given), the rate limits, and the price (`price_given`:
    from --price, else the built-in table's for `model`, None when unknown), the image (--image: an Image, "auto"
    to learn it from the run, None: none given), and for a local model the seconds of a text's first call,
    its forward pass (None: not timed)."""

    endpoint: Endpoint
    method: str
    top_k: int
    eps: float
    concurrency: int
    latency: float
    timed: bool
    rpm: float | None
    tpm: float | None
    model: str | None
    unit_price: Price | None
    price_given: bool
    image: Image | str | None = None
    first_call: float | None = None


def estimate_rows(prompts: list[Prompt], setup: EstimateSetup) -> tuple[list[Estimate], ProbeReport | None]:
    """The estimate's rows, one a method, and for auto on the in-process simulator the probe that picks the
    method (offline, free); exits 1 on a setting the estimate refuses."""
    report = None
    try:
        if setup.method == "auto" and setup.endpoint.in_process:
            report = asyncio.run(run_probe(setup.endpoint, prompts[0]))
        rows = estimate_run(
            prompts, setup.endpoint, setup.method, top_k=setup.top_k, eps=setup.eps, concurrency=setup.concurrency,
            latency=setup.latency, rpm=setup.rpm, tpm=setup.tpm, price=setup.unit_price, report=report,
            image_rank=setup.image.rank if isinstance(setup.image, Image) else None, learn_image=setup.image == "auto",
        )
    except ValueError as error:
        fail(flagged(message_of(error)))
    if setup.first_call is not None:  # a local model: one forward pass a text besides its calls
        rows = [dataclasses.replace(row, seconds=row.seconds + len(prompts) * setup.first_call) for row in rows]
    return rows, report


def estimate_json(setup: EstimateSetup, rows: list[Estimate], report: ProbeReport | None) -> dict[str, Any]:
    """`estimate --json`: the endpoint, method, price, assumptions, probe report and rows."""
    concurrency = 1 if setup.endpoint.in_process else setup.concurrency
    return {
        "endpoint": describe(setup.endpoint),
        "method": setup.method,
        "price": None if setup.unit_price is None else dataclasses.asdict(setup.unit_price),
        "assumptions": {
            "latency": setup.latency, "concurrency": concurrency, "rpm": setup.rpm, "tpm": setup.tpm,
            "top_k": setup.top_k, "eps": setup.eps,
        },
        "probe": report.to_dict() if report else None,
        "rows": [row.to_dict() for row in rows],
    }


def estimate_table(setup: EstimateSetup, rows: list[Estimate]) -> Table:
    """The estimate's table: a row a method, its prompts, calls, tokens, US$ and time."""
    table = Table(
        title=f"estimate for {describe(setup.endpoint)}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
    )
    table.add_column("method", no_wrap=True, min_width=9)
    for column in ("prompts", "calls/\nprompt", "calls", "prompt\ntokens", "compl.\ntokens", "US$", "time"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.method, f"{row.prompts:,}", format_count(row.calls_per_prompt), format_count(row.calls),
            format_count(row.prompt_tokens), format_count(row.completion_tokens), format_dollars(row.cost),
            format_duration(row.seconds),
        )
    return table


def estimate_notes(setup: EstimateSetup, rows: list[Estimate], report: ProbeReport | None) -> list[str]:
    """The notes under the table: a capped top-k, the once-a-run calls, the price, what auto picks, approximate
    token counts, the trade of a method that draws several choices a call, and what the time assumes."""
    capped = top_k_capped(setup.top_k, (report.limits() if report else setup.endpoint.limits).top_logprobs)
    notes = [capped] if capped else []
    fewest, most = min(row.overhead_calls for row in rows), max(row.overhead_calls for row in rows)
    if most:
        once = str(most) if fewest == most else f"{fewest}-{most}"
        notes.append(f"calls include {once} once per run (token check on OpenAI-compatible endpoints, probe for auto)")
    notes.extend(price_notes(setup))
    notes.extend(learning_note(setup, row) for row in rows if setup.image == "auto" and row.method.endswith("+image"))
    if report:
        notes.append(f"auto: the probe (offline, free here) picks {report.recommended}: {'; '.join(map(flagged, report.reasons))}")
        if rows[0].method != report.recommended:
            notes.append(f"auto with --image runs {rows[0].method}, cheaper than {report.recommended}")
    elif len(rows) > 1:
        notes.append(f"auto: the probe picks one of these rows; `logprobs probe` tells which (about {PROBE_CALLS} calls), or give --method")
        notes.extend(f"{row.method} when {row.condition}" for row in rows)
    if not rows[0].tokens_counted:
        notes.append("prompt tokens are approximate (about 4 bytes a token): this vocabulary cannot encode text")
    drawing = [row.method for row in rows if row.completion_tokens > row.calls]
    if drawing:
        notes.append(f"{', '.join(drawing)} draws up to 128 choices a call (n) to find the chosen tokens in fewer calls, "
                     "each choice a billed completion token: --max-draws 1 calls greedily (more calls, fewer tokens)")
    notes.append(time_note(setup))
    return notes


def learning_note(setup: EstimateSetup, row: Estimate) -> str:
    """--image auto: how many prompts the image takes to learn and from which batch size it pays, or that the
    rank, hence the warm-up, is not known before the run."""
    base = row.method.removesuffix("+image")
    if row.learning_prompts is None:
        return (f"{row.method} with --image auto: priced as {base} for every prompt (the most it spends): this model's "
                f"rank is not known before the run; the image is learned after about d + 10 prompts (d: its hidden "
                f"size), then each prompt reads about d + 18 tokens with {base}")
    learned = row.learning_prompts
    return (f"{row.method} with --image auto: image learned after ~{learned:,} prompts, read whole by {base} as a plain "
            f"run reads them; it pays from {learned + 1:,} prompts on, each later prompt at the image method's calls")


def price_notes(setup: EstimateSetup) -> list[str]:
    """Where the estimate's price comes from (none when it is unknown)."""
    if setup.endpoint.in_process and not setup.price_given:
        return [f"price: the {'built-in simulator' if setup.model is None else 'local model'} is free"]
    if setup.unit_price is None:
        return []
    source = "--price" if setup.price_given else "built-in table; override with --price"
    unit = setup.unit_price
    return [f"price: US$ {unit.prompt:g} / {unit.completion:g} per 1M prompt / completion tokens ({source})"]


def time_note(setup: EstimateSetup) -> str:
    """What the estimate's time assumes: seconds a call, and how many in flight under which rate limits."""
    if setup.first_call is not None:
        return (f"time: the local model answers one call at a time, {setup.latency * 1e3:.2g} ms a call, plus a forward "
                f"pass a text of {setup.first_call:.2g} s (the first prompt's, timed here); a resumed run spends only what is left")
    if setup.endpoint.in_process:
        how = "timed here, with the runner's bookkeeping" if setup.timed else "--latency"
        return (f"time: the in-process simulator answers one call at a time, {setup.latency * 1e3:.2g} ms a call ({how}); "
                "a resumed run spends only what is left")
    limits = "".join(f", {value:g} {name}" for name, value in (("rpm", setup.rpm), ("tpm", setup.tpm)) if value)
    return (f"time assumes {setup.latency:g} s a call, {setup.concurrency} in flight{limits}; "
            "a resumed run spends only what is left")


@app.command(cls=PlainHelpCommand)
def serve(
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Port on 127.0.0.1."),
    sim: SimOption = [],
    model: str = typer.Option("simulator", "--model", help="Model name the server answers to."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require this API key (Bearer token)."),
    token_ids: bool = typer.Option(False, "--token-ids", help="llama.cpp dialect: every logprob entry carries its token id."),
    latency: float = typer.Option(0.0, "--latency", min=0.0, help="Seconds to wait per request, like a remote API."),
    log: bool = typer.Option(False, "--log", help="Log each request to stderr."),
    rpm: float = typer.Option(
        0.0, "--rpm", help="Requests per minute accepted, bursts of one second's worth; over it, 429 with "
        "retry-after and retry-after-ms, like OpenAI. 0: unlimited."),
    tpm: float = typer.Option(
        0.0, "--tpm", help="Tokens per minute accepted (a request costs its usage.total_tokens), bursts of one "
        "second's worth. 0: unlimited."),
    hide_limits: bool = typer.Option(
        False, "--hide-limits", help="Send no x-ratelimit-* headers: --rpm/--tpm show only as 429 + retry-after, "
        "as behind a gateway that does not tell its limits."),
    fault_rate: float = typer.Option(
        0.0, "--fault-rate", help="Share of completion requests (0 to 1) that get a fault instead of their answer."),
    faults: str = typer.Option(
        ",".join(ServerConfig().faults), "--faults", metavar="KINDS",
        help="Comma-separated fault kinds, drawn uniformly: 429 (asks to retry after 50 ms), 500 (server_error), "
        "timeout (no answer for --stall seconds, then the connection closes), cut (connection reset, no answer), "
        "malformed (200 with a truncated JSON body)."),
    fault_seed: int = typer.Option(0, "--fault-seed", help="Seed of the fault draws."),
    stall: float = typer.Option(5.0, "--stall", help="Seconds a timeout fault holds the request."),
    dialect: str = typer.Option(
        "openai", "--dialect", metavar="openai|vllm|llama-cpp-python",
        help="vllm: answer as vLLM's OpenAI-compatible server does (its top_logprobs cap and list order, "
        "\"token_id:N\" tokens, bias clamped to 100 with no entry cap, its error format). vLLM's default "
        "--logprobs-mode raw_logprobs is --sim logprobs_after_bias=false; processed_logprobs is the default true. "
        "llama-cpp-python: as its server does (tokens named by text only, so same-text tokens merge; no cap; "
        "pre-bias logprobs; /extras/tokenize)."),
    max_logprobs: int = typer.Option(
        20, "--max-logprobs", help="vllm dialect: vLLM's --max-logprobs, the most top_logprobs a request may ask "
        "for; -1 = the whole vocabulary (and top_logprobs -1 returns all of it)."),
    return_tokens_as_token_ids: bool = typer.Option(
        False, "--return-tokens-as-token-ids", help="vllm dialect: every token as \"token_id:N\" (a request's own "
        "return_tokens_as_token_ids field overrides it)."),
) -> None:
    """Serve the built-in simulator as an OpenAI-compatible HTTP API on 127.0.0.1 (Ctrl-C stops it)."""
    fault_kinds = tuple(kind.strip() for kind in faults.split(",") if kind.strip())
    try:
        config = ServerConfig(simulator_config(sim), model, api_key, token_ids, latency, log,
                              rpm=rpm, tpm=tpm, rate_headers=not hide_limits, fault_rate=fault_rate, faults=fault_kinds, fault_seed=fault_seed,
                              stall=stall, dialect=dialect, max_logprobs=max_logprobs,
                              return_tokens_as_token_ids=return_tokens_as_token_ids)
    except ValueError as error:
        fail(str(error), 2)
    try:
        server = SimulatorServer(config, port=port)
    except OSError as error:
        fail(f"cannot listen on 127.0.0.1:{port}: {error.strerror or error}")
    err.print(serving_banner(config, server.url), highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def serving_banner(config: ServerConfig, url: str) -> str:
    """What `serve` tells on start: the model and where it is served, its rate limits and faults, and an
    extract command that uses it."""
    limits = [f"{value:,.10g} {unit}" for value, unit in ((config.rpm, "requests"), (config.tpm, "tokens")) if value]
    announced = "" if config.rate_headers else " (not announced)"
    vocab_size = config.simulator.vocab_size
    return (
        f"serving the simulator ({vocab_size:,} tokens) as model {config.model!r} at {url}\n"
        + (f"rate limits: {' and '.join(limits)} per minute{announced}\n" if limits else "")
        + (f"faults: {config.fault_rate:.1%} of completions ({', '.join(config.faults)})\n" if config.fault_rate else "")
        + f"try: logprobs extract examples/prompts.jsonl --model {config.model} --base-url {url} "
        f"--tokenizer simulator:{vocab_size} --api-key any"
    )


@app.command(cls=PlainHelpCommand)
def inspect(
    path: Path = typer.Argument(..., metavar="PATH", help="A Parquet file written by `logprobs extract`."),
    top: int = typer.Option(5, "--top", "-n", min=1, max=50, help="Top tokens to show per prompt."),
) -> None:
    """Show each prompt's top tokens, entropy and diagnostics."""
    if not path.exists():
        fail(f"{path} does not exist", 2)
    try:
        render_inspect(path, Console(), top=top)
    except ValueError as error:
        fail(str(error))


@app.command(cls=PlainHelpCommand)
@cli_errors
def compare(
    a: Path = typer.Argument(..., metavar="A", help="A Parquet file written by `logprobs extract`."),
    b: Path = typer.Argument(..., metavar="B", help="Another, of the same prompts and vocabulary."),
    floor: float = typer.Option(
        1e-4, "--floor", min=0.0, max=1.0,
        help="max diff looks at tokens whose probability is above this in either file."),
    top: int = typer.Option(20, "--top", "-n", min=1, help="Prompts shown in the table, largest KL first."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole comparison (every prompt) as JSON."),
) -> None:
    """Compare two outputs prompt by prompt, joined by id: KL both ways, total variation, the largest logprob
    difference and top-1 agreement. Does this endpoint serve the weights it claims?"""
    comparison = compare_files(a, b, floor=floor)
    if as_json:
        print(json.dumps(comparison.to_dict(), indent=2, allow_nan=False))
        return
    render_comparison(comparison, Console(), top=top)
    if len(comparison.prompts) > top:
        print(f"--top {len(comparison.prompts)} shows every prompt")


if __name__ == "__main__":
    sys.exit(app())
