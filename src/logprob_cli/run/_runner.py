"""The batch runner: many prompts, many calls at once, every answer journaled, resumable.

Flow: each active prompt drives its method's plan; a batch of queries is first looked up
in the journal (a resumed run replays what it already paid for), the rest go to a pool
of `concurrency` workers that call the endpoint; the answers that arrive in one turn of
the event loop (at most `concurrency`, so a kill loses no more than the calls in flight)
are committed together before they are handed back. A finished prompt's result goes to the journal, and the Parquet output is rewritten
from the journal (atomically, in a thread) when a prompt finishes and enough time has
passed since the last write, and once more at the end, whatever ended the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from logprob_cli.version import __version__
from logprob_cli.run._budget import BudgetReached, MeteredEndpoint, Spend
from logprob_cli.run._estimate import calls_per_prompt
from logprob_cli.endpoints import (
    Answer, Endpoint, EndpointError, EndpointFatal, EndpointRejected, EndpointUnsuitable, Limits, Prompt, Query,
)
from logprob_cli.errors import Worded, message_of
from logprob_cli.io import check_prompts
from logprob_cli.run._journal import Journal, JournalError, prompt_key, reading_connection
from logprob_cli.methods import METHODS, Context, Image, MethodResult, cheapest, with_image
from logprob_cli.io import OutputRow, output_schema, write_parquet
from logprob_cli.run._outputs_guard import check_resumable, checkpoint_path
from logprob_cli.run._probe import ProbeReport, probe
from logprob_cli.run._targets import resolve_targets
from logprob_cli.run._positions import has_completions, require_token_context, resolve_completions, split_positions
from logprob_cli.run._progress import RunStart
from logprob_cli.run._config import RunConfig
from logprob_cli.run._learning import AUTO, LEARNED, LearnedImage, image_metadata

MIN_ACTIVE_PROMPTS = 4
ACTIVE_PROMPTS_PER_WORKER = 2  # at most this many prompts a worker (each may hold a whole answer)
DRAIN_SECONDS = 30.0
SAME_REFUSALS_FATAL = 3  # prompts refused with one message and none finished: every prompt would be refused
INTERRUPT_DRAIN_SECONDS = 1.0  # after Ctrl-C: a call not answered by then is cancelled (it was not paid for)


class Progress(Protocol):
    """What the runner reports as it goes (the CLI draws it, see logprob_cli/_display.py; the API ignores it)."""

    def start(self, run: RunStart) -> None:
        """The calls begin: what is expected of this run, and where to read spend and endpoint pressure."""

    def call(self) -> None:
        """One call was answered and journaled."""

    def prompt_done(self, extra_calls: int, failed: bool = False) -> None:
        """A prompt finished (or failed) after `extra_calls` more calls than expected (negative: fewer)."""


class NoProgress:
    """Reports nothing (the API, and the CLI's --quiet)."""

    def start(self, run: RunStart) -> None:
        pass

    def call(self) -> None:
        pass

    def prompt_done(self, extra_calls: int, failed: bool = False) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class RunSummary:
    total: int
    finished: int = 0
    calls: int = 0
    failures: dict[Any, str] = field(default_factory=dict)
    refused: set[Any] = field(default_factory=set)  # ids whose request the endpoint refused: a rerun cannot help
    interrupted: bool = False
    budget_reached: str | None = None
    rows_written: int = 0
    spent_before: Spend = field(default_factory=Spend)
    meter: MeteredEndpoint | None = None

    def spent(self) -> Spend:
        """What the checkpoint has spent in all, this run included."""
        return self.meter.spent if self.meter else self.spent_before

    def cost(self) -> float | None:
        return self.meter.cost() if self.meter else None


def run_settings(
    endpoint: Endpoint, method: str, top_k: int, eps: float, image: Image | str | None = None
) -> dict[str, Any]:
    """The settings a checkpoint is bound to: everything that changes which calls are made (with an image, where
    it came from and its rank; with --image auto, source "auto": the image learned is in the checkpoint)."""
    settings: dict[str, Any] = {"method": method, "top_k": top_k, "endpoint": endpoint.describe().to_dict()}
    if method == "bisection":
        settings["eps"] = eps
    if image == AUTO:
        settings["image"] = {"source": AUTO}
    elif isinstance(image, Image):
        settings["image"] = {"source": image.source, "rank": image.rank}
    return settings


class Runner:
    """Runs `prompts` through one method (see module docstring).

    Prompts start while the queue of unsent calls is shorter than `concurrency` (at least
    MIN_ACTIVE_PROMPTS and at most ACTIVE_PROMPTS_PER_WORKER * concurrency at once), so the
    workers stay busy whether a method asks one call at a time or thousands, and memory is
    bounded by the concurrency, whatever the number of prompts.
    However the run ends (done, budget reached, a fatal error), the workers finish the calls
    already in flight and journal them before it returns: nothing paid for is dropped.
    """

    def __init__(
        self,
        endpoint: MeteredEndpoint,
        prompts: list[Prompt],
        method: str,
        ctx: Context,
        journal: Journal,
        concurrency: int,
        progress: Progress,
        on_prompt_finished: Callable[[], None] = lambda: None,
        learning: LearnedImage | None = None,
    ):
        """`learning`: with --image auto, the image learned so far (run/_learning.py); `method` is then the image
        method, run once the image is ready, its base method before."""
        self.endpoint = endpoint
        self.method = method
        self.prompts = prompts
        self.plan = METHODS[method]
        self.ctx = ctx
        self.journal = journal
        self.concurrency = concurrency
        self.progress = progress
        self.on_prompt_finished = on_prompt_finished
        self.learning = learning
        self.summary = RunSummary(total=len(prompts))
        self._active = 0
        self._max_active = max(MIN_ACTIVE_PROMPTS, ACTIVE_PROMPTS_PER_WORKER * concurrency)
        self._room = asyncio.Event()
        self._stopping = False
        self._interrupted = False
        self._per_prompt: dict[int, int | None] = {}  # calls expected by target count (None: unknown)
        self._unsaved: list[tuple[str, int, bytes, Answer, asyncio.Future]] = []
        self._finished_here = 0
        self._refusals: dict[str, int] = {}

    async def run(self) -> RunSummary:
        finished = self.journal.finished()
        todo = [p for p in self.prompts if prompt_key(p) not in finished]
        self.summary.finished = len(self.prompts) - len(todo)
        self.progress.start(self._run_start(todo))
        queue: asyncio.Queue = asyncio.Queue()
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.concurrency)]
        try:
            async with asyncio.TaskGroup() as group:
                for prompt in todo:
                    await self._wait_for_room(queue)
                    self._active += 1
                    group.create_task(self._prompt(prompt, queue))
        except* BudgetReached as reached:
            self.summary.budget_reached = message_of(reached.exceptions[0])
        except* (EndpointUnsuitable, EndpointFatal, JournalError) as errors:  # run-level: stop with the first
            raise errors.exceptions[0] from None
        finally:
            await self._drain(queue, workers)
        return self.summary

    def _expected_calls(self, prompt: Prompt) -> int | None:
        """The calls the method's spec expects for `prompt` (its target count), None where it cannot tell."""
        targets = len(prompt.target_ids)
        if targets not in self._per_prompt:
            ctx = self.ctx
            try:
                self._per_prompt[targets] = calls_per_prompt(
                    self.method, ctx.vocab_size, ctx.top_k, ctx.eps, ctx.limits, targets, ctx.image and ctx.image.rank,
                    ctx.bias_observed is not None,
                )
            except (EndpointUnsuitable, ValueError):  # the method itself will say why it cannot run
                self._per_prompt[targets] = None
        return self._per_prompt[targets]

    def _run_start(self, todo: list[Prompt]) -> RunStart:
        """What the progress display is told at the start: the calls the unfinished prompts should still need
        (their method's count per prompt, less the answers the checkpoint already holds for them)."""
        meter = self.endpoint
        expected = [self._expected_calls(p) for p in todo]
        saved = self.journal.answer_counts()
        resumed = sum(saved.get(prompt_key(p), 0) for p in todo)
        return RunStart(
            prompts=len(self.prompts),
            prompts_done=self.summary.finished,
            calls_expected=None if None in expected else sum(expected) - resumed,
            exact=self.method != "bisection" and not resumed,  # bisection's count is a fit
            cost=meter.cost,
            calls_spent=lambda: meter.spent.calls,
            max_calls=meter.max_calls,
            max_cost=meter.max_cost,
            pressure=meter.pressure,
        )

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM (safe in a signal handler; `interrupts_stop` also cancels the run's task): send no
        more calls and compute no more plans at once, whatever the event loop is busy with; the calls in flight
        get INTERRUPT_DRAIN_SECONDS to be answered and journaled."""
        self._stopping = self._interrupted = True

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    async def _wait_for_room(self, queue: asyncio.Queue) -> None:
        """Until another prompt may start (class doc); with image="auto" before the image is learned, also until
        fewer whole vectors are in flight than the image still wants (LearnedImage.wanted): a prompt started then
        would be read whole for nothing, the image learned before it finished (until then every prompt in flight
        reads a whole vector)."""
        while self._active >= self._max_active or (
            self._active >= MIN_ACTIVE_PROMPTS and queue.qsize() >= self.concurrency
        ) or (self.learning is not None and self._active >= (self.learning.wanted() or math.inf)):
            self._room.clear()
            await self._room.wait()

    async def _drain(self, queue: asyncio.Queue, workers: list[asyncio.Task]) -> None:
        """Stop the workers once the calls in flight are answered and journaled (at most DRAIN_SECONDS)."""
        self._stopping = True
        for _ in workers:
            queue.put_nowait(None)
        try:
            await asyncio.wait(workers, timeout=INTERRUPT_DRAIN_SECONDS if self._interrupted else DRAIN_SECONDS)
        finally:
            for worker in workers:
                worker.cancel()
            self._save()

    async def _worker(self, queue: asyncio.Queue) -> None:
        while True:
            item = await queue.get()
            self._room.set()
            if item is None or self._interrupted:  # interrupted: the queue is left as it is, not skipped item by item
                return
            prompt, key, seq, query, future = item
            if future.done() or self._stopping:
                if not future.done():
                    future.cancel()
                continue
            try:
                answer = await self.endpoint.ask(prompt, query)
            except Exception as err:  # an endpoint failure fails the prompt, not the run
                if not future.done():
                    future.set_exception(err)
                continue
            self._unsaved.append((key, seq, query.key(), answer, future))
            if len(self._unsaved) >= self.concurrency:  # an endpoint that answers without yielding (the simulator)
                self._save()
            elif len(self._unsaved) == 1:
                asyncio.get_running_loop().call_soon(self._save)

    def _save(self) -> None:
        """Journal the answers that arrived in one turn of the loop in one commit, then hand them over."""
        unsaved, self._unsaved = self._unsaved, []
        if not unsaved:
            return
        try:
            self.journal.put_answers([(key, seq, query_key, answer) for key, seq, query_key, answer, _ in unsaved])
        except JournalError as failure:  # a full disk or a read-only directory: send nothing more
            self._stopping = True
            for *_, future in unsaved:
                if not future.done():
                    future.set_exception(failure)
            return
        for *_, answer, future in unsaved:
            self.summary.calls += answer.requests
            self.progress.call()
            if not future.done():
                future.set_result(answer)

    async def _prompt(self, prompt: Prompt, queue: asyncio.Queue) -> None:
        try:
            await self._run_prompt(prompt, queue)
        finally:
            self._active -= 1
            self._room.set()

    async def _run_prompt(self, prompt: Prompt, queue: asyncio.Queue) -> None:
        key = prompt_key(prompt)
        saved = self.journal.answers(key)
        plan, learns = self._plan_for(prompt, key, bool(saved))
        finished = await self._run_plan(prompt, key, saved, plan, queue)
        if learns and finished:
            self.learning.finished(key)

    async def _run_plan(self, prompt: Prompt, key: str, saved: dict, plan: Any, queue: asyncio.Queue) -> bool:
        """Drive the prompt's plan, its saved answers first; whether it finished (False: it failed)."""
        loop = asyncio.get_running_loop()
        seq = 0
        queries: list[Query] = next(plan)
        while True:
            futures = []
            for query in queries:
                future = loop.create_future()
                hit = saved.pop(seq, None)
                if hit is None:
                    queue.put_nowait((prompt, key, seq, query, future))
                elif hit[0] != query.key():
                    raise JournalError(Worded(
                        "the checkpoint {path} holds answers to other questions for prompt {id!r} (made by another "
                        "version of logprobs?); add {fresh} to start over", path=self.journal.path, id=prompt.id,
                    ))
                else:
                    future.set_result(hit[1])
                futures.append(future)
                seq += 1
            try:
                answers = await asyncio.gather(*futures)
            except (EndpointError, OSError, ValueError) as err:
                for future in futures:
                    future.cancel()
                if isinstance(err, EndpointFatal):
                    raise
                self._fail(prompt, key, err)
                unanswered = sum(1 for f in futures if f.cancelled() or f.exception() is not None)
                self.progress.prompt_done(seq - unanswered - (self._expected_calls(prompt) or 0), failed=True)
                return False
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            if self._interrupted:  # the next plan step may take a while: leave it to the resumed run
                raise asyncio.CancelledError
            try:
                queries = plan.send(answers)
            except StopIteration as stop:
                self.journal.put_result(key, self.journal.requests_of(key), stop.value)
                break
        self.summary.finished += 1
        self._finished_here += 1
        self.progress.prompt_done(seq - (self._expected_calls(prompt) or 0))
        self.on_prompt_finished()
        return True

    def _plan_for(self, prompt: Prompt, key: str, has_answers: bool) -> tuple[Any, bool]:
        """The prompt's plan, and whether its vector teaches --image auto's image (the base method's whole vector
        while the image is not ready: its targets aside)."""
        ctx = dataclasses.replace(self.ctx, targets=prompt.target_ids) if prompt.target_ids else self.ctx
        if self.learning is None:
            return self.plan(ctx), False
        image = self.learning.image_for(key, has_answers)
        if image is not None:
            return self.plan(dataclasses.replace(ctx, image=image, whole_fallback=True)), False
        return METHODS[self.method.removesuffix("+image")](dataclasses.replace(ctx, targets=())), True

    def _fail(self, prompt: Prompt, key: str, err: Exception) -> None:
        """Record the prompt's failure; raise EndpointFatal when the endpoint refuses the same request of
        SAME_REFUSALS_FATAL prompts before any prompt finished (every prompt would be refused: stop spending)."""
        message = message_of(err)
        self.summary.failures[prompt.id] = message
        self.journal.put_failure(key, message)
        if not isinstance(err, EndpointRejected):
            return
        self.summary.refused.add(prompt.id)
        same = self._refusals[message] = self._refusals.get(message, 0) + 1
        if same >= SAME_REFUSALS_FATAL and self._finished_here == 0:
            raise EndpointFatal(
                f"the endpoint refused the requests of {same} prompts the same way and none has succeeded, so every "
                f"prompt would be refused: {message}"
            )


def output_metadata(
    endpoint: Endpoint,
    settings: dict[str, Any],
    behaviour: dict[str, Any],
    probe: dict[str, Any] | None,
    token_mapping: str | None,
    method: str,
    image: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's description stored in the Parquet file. `method` is the method that ran; `method_chosen_by`
    says whether the settings named it or auto picked it from the probe (`probe`), see `_chosen_by`. `image`:
    where the image methods' image came from and its rank (run/_learning.py's image_metadata; None: none); each
    row's `method` says whether the image produced it."""
    description = endpoint.describe()
    return {
        "method": method,
        "method_chosen_by": _chosen_by(settings.get("method"), method),
        "probe": probe,
        "token_mapping": token_mapping,
        "tool_version": __version__,
        "vocabulary": {"name": description.vocabulary or endpoint.model, "size": endpoint.vocab_size},
        "model": endpoint.model,
        "endpoint": description.to_dict(),
        "behaviour": behaviour,
        "settings": settings,
        "image": image,
    }


def _chosen_by(asked: str | None, ran: str) -> str:
    """How the method that ran was chosen: named in the settings, or picked by auto's probe (an auto run of
    no prompt, an empty shard, picks none)."""
    if asked != "auto":
        return "settings"
    return "auto (probe)" if ran != "auto" else "none: no prompt to run"


class OutputWriter:
    """Rewrites the Parquet file from the journal: finished prompts, in input order. With chosen tokens, each
    row carries its targets' ids and texts, and the vector only where `store_vector`. `store_top` N writes each row's
    N most likely tokens and the rest mass instead of the vector (io/_parquet.py)."""

    def __init__(
        self,
        path: Path,
        journal_path: Path,
        prompts: list[Prompt],
        endpoint: Endpoint,
        settings: dict,
        method: str,
        probe: dict[str, Any] | None,
        schema_prompts: list[Prompt] | None = None,
        store_vector: bool = False,
        store_top: int | None = None,
    ):
        self.path = path
        self.method = method
        self.probe = probe
        self.journal_path = journal_path
        self.by_key = {prompt_key(p): p for p in prompts}
        self.endpoint = endpoint
        self.settings = settings
        self.schema = output_schema(
            schema_prompts or prompts, endpoint.vocab_size, store_vector=store_vector, top_k=settings["top_k"],
            store_top=store_top,
        )
        self.texts = {i: endpoint.token_text(i) for p in prompts for i in p.target_ids}
        self._last_write = time.monotonic()
        self._last_duration = 0.0
        self._writing: asyncio.Task | None = None

    def write(self) -> int:
        started = time.monotonic()
        reader = reading_connection(self.journal_path)
        try:
            saved = reader.results(list(self.by_key))
            first = next(saved, None)
            behaviour = first[1].result.behaviour if first else {}
            rows = (
                self._row(self.by_key[key], item.calls, item.result)
                for key, item in itertools.chain([first] if first else [], saved)
            )
            mapping = reader.get_meta("token_mapping")
            image = image_metadata(self.settings, reader.get_meta(LEARNED))
            metadata = output_metadata(self.endpoint, self.settings, behaviour, self.probe, mapping, self.method, image)
            written = write_parquet(self.path, self.schema, rows, metadata)
        finally:
            reader.close()
        self._last_duration = time.monotonic() - started
        self._last_write = time.monotonic()
        return written

    def _row(self, prompt: Prompt, calls: int, result: MethodResult) -> OutputRow:
        """The prompt's row; its method is the image method only where the image produced the vector (its
        behaviour names the image), else the base method that read it (the image did not fit; --image auto's
        warm-up)."""
        targets = tuple((i, self.texts[i]) for i in prompt.target_ids)
        method = self.method
        if method.endswith("+image") and "image_source" not in result.behaviour:
            method = method.removesuffix("+image")
        return OutputRow(prompt, self.endpoint.model, method, calls, result, targets)

    def maybe_write_soon(self) -> None:
        """After a prompt finishes: rewrite in a thread unless one is running or the last was too recent."""
        due = time.monotonic() - self._last_write >= max(2.0, 10 * self._last_duration)
        if due and (self._writing is None or self._writing.done()):
            self._writing = asyncio.get_running_loop().create_task(asyncio.to_thread(self.write))

    async def settle(self) -> None:
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)


@contextmanager
def interrupts_stop(runner: Runner):
    """While the block runs (in the task that runs `runner`), Ctrl-C (SIGINT) stops the runner at once
    (`Runner.interrupt`) and cancels that task; a second Ctrl-C raises KeyboardInterrupt where the code is.
    Only in the main thread, and only where SIGINT is handled by Python (not where it is ignored)."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield
        return
    task, loop = asyncio.current_task(), asyncio.get_running_loop()

    def on_interrupt(signum: int, frame: Any) -> None:
        if runner.interrupted:
            raise KeyboardInterrupt
        runner.interrupt()
        loop.call_soon_threadsafe(task.cancel)

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def extract_batch(
    prompts: list[Prompt],
    output: Path,
    endpoint: Endpoint,
    run: RunConfig | str = RunConfig(),
    progress: Progress | None = None,
    announce: Callable[[str, ProbeReport | None], None] = lambda method, report: None,
    *,
    schema_prompts: list[Prompt] | None = None,
    **settings: Any,
) -> RunSummary:
    """Run a method over prompts into `output`, resuming from (and keeping) its checkpoint.

    `run` is the RunConfig, or a method name with the RunConfig's other fields as keywords
    (`settings`, which also override a given RunConfig's). method "auto" probes the endpoint once
    per run (the report is kept in the checkpoint and the output metadata) and runs the method it
    recommends. `max_calls` / `max_cost` (US$, at `price`) cap what the checkpoint spends in all:
    at the cap the run stops cleanly and the summary says so. `schema_prompts` (default: `prompts`)
    fix the output's columns, so every shard of a batch writes the same schema; with no prompts (an
    empty shard) the output has those columns and no rows, and no call is made.
    Before any call: raises ValueError (a setting out of range; SettingsError for a `store` the vocabulary cannot
    hold), InputError (the pre-flight check of the prompts,
    inputs.check_prompts, found problems), Refused when the output or checkpoint may not be
    used (see outputs_guard: an output that is not .parquet or not the tool's, rows this run
    would replace, a damaged checkpoint), JournalError (checkpoint in use / other settings).
    Later: EndpointUnsuitable (the endpoint cannot support the method), EndpointFatal (it
    cannot be used at all). Ctrl-C stops the run: the summary says so, and the output holds
    every prompt finished so far.
    """
    config = dataclasses.replace(RunConfig(method=run) if isinstance(run, str) else run, **settings)
    config.check_store(endpoint.vocab_size)
    check_prompts(schema_prompts or prompts, endpoint.api)
    prompts, schema_prompts = _resolved(endpoint, prompts, schema_prompts)
    settings = run_settings(endpoint, config.method, config.top_k, config.eps, config.image)
    journal_path = checkpoint_path(output)
    resumable = functools.partial(check_resumable, output, journal_path, prompts)
    with Journal.open(journal_path, settings, resumable) as journal:
        writer_for = functools.partial(
            OutputWriter, output, journal_path, prompts, endpoint, settings, schema_prompts=schema_prompts,
            store_vector=config.store_vector, store_top=config.store_top,
        )
        return _run_in_checkpoint(prompts, endpoint, journal, config, writer_for, progress or NoProgress(), announce)


def _resolved(
    endpoint: Endpoint, prompts: list[Prompt], schema_prompts: list[Prompt] | None
) -> tuple[list[Prompt], list[Prompt] | None]:
    """The prompts (and the schema's) with their chosen tokens (run/_targets.py) and completions
    (run/_positions.py) resolved to ids, this run's prompts split into their positions (the schema's are
    resolved, not split); on one event loop of its own, before the checkpoint opens (its keys hold the ids and
    positions) and before any call. Unchanged without either. Raises InputError listing every target or
    completion the vocabulary cannot take, EndpointUnsuitable where the endpoint cannot take a position's
    context."""
    every = schema_prompts or prompts
    targets, completions = any(p.targets for p in every), has_completions(every)
    if not (targets or completions):
        return prompts, schema_prompts

    async def resolve() -> list[Prompt]:
        try:
            found = await resolve_targets(endpoint, every) if targets else every
            if completions:
                require_token_context(endpoint)
                found = await resolve_completions(endpoint, found)
            return found
        finally:
            await endpoint.aclose()

    resolved = asyncio.run(resolve())
    by_id = {p.id: p for p in resolved}  # ids are unique (check_prompts)
    mine = [by_id[p.id] for p in prompts]
    return split_positions(mine) if completions else mine, None if schema_prompts is None else resolved


def _run_in_checkpoint(
    prompts: list[Prompt],
    endpoint: Endpoint,
    journal: Journal,
    config: RunConfig,
    writer_for: Callable[[str, dict[str, Any] | None], OutputWriter],
    progress: Progress,
    announce: Callable[[str, ProbeReport | None], None],
) -> RunSummary:
    """extract_batch inside its open checkpoint: the calls before the run, then the run, on an event loop of their
    own; then, however they ended (done, at a budget cap, Ctrl-C), the output written by the method's writer
    (`writer_for(method, probe report)`) and the summary of what the checkpoint holds for these prompts."""
    summary = RunSummary(total=len(prompts))
    before = journal.spent()
    metered = MeteredEndpoint(endpoint, journal.spent(), config.price, config.max_calls, config.max_cost)
    summary.spent_before = before
    summary.meter = metered
    writer: OutputWriter | None = None

    async def main() -> None:
        nonlocal writer
        try:
            if not prompts:  # an empty shard: every part of a batch has a file
                writer = writer_for(config.method, None)
                return
            targets = max(len(p.target_ids) for p in prompts)
            chosen, limits, report = await _choose_method(metered, journal, prompts[0], config, targets)
            journal.add_setup_spend(metered.spent.minus(before))
            announce(chosen, report)
            ctx = Context(
                endpoint.vocab_size, limits, top_k=min(config.top_k, limits.top_logprobs), eps=config.eps,
                withheld=await endpoint.withheld_tokens(), image=config.image if isinstance(config.image, Image) else None,
                unnamed=endpoint.unnamed_tokens(), bias_observed=report.bias_observed() if report else None,
            )
            writer = writer_for(chosen, report.to_dict() if report else None)
            learning = None
            if config.image == AUTO:
                finished = journal.finished()
                learning = LearnedImage(journal, endpoint.vocab_size, [k for k in map(prompt_key, prompts) if k in finished])
            runner = Runner(
                metered, prompts, chosen, ctx, journal, config.concurrency, progress, writer.maybe_write_soon, learning
            )
            runner.summary = summary
            await _run_and_settle(runner, writer)
        finally:
            await endpoint.aclose()

    try:
        asyncio.run(main())
    except BudgetReached as reached:  # during the probe or token check
        journal.add_setup_spend(metered.spent.minus(before))
        summary.budget_reached = message_of(reached)
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C (during the run, it cancels the run's task)
        summary.interrupted = True
    finally:
        summary.finished = len(journal.finished() & {prompt_key(p) for p in prompts})
        if writer is not None:
            summary.rows_written = writer.write()
    keys = {prompt_key(p): p.id for p in prompts}
    summary.failures = {keys[k]: msg for k, msg in journal.failures().items() if k in keys}
    return summary


async def _choose_method(
    metered: MeteredEndpoint, journal: Journal, first: Prompt, config: RunConfig, targets: int
) -> tuple[str, Limits, ProbeReport | None]:
    """The calls made once per checkpoint before the run, their outcome kept in it: the token-mapping check and,
    for "auto", the probe (on the first prompt). Returns the method to run (for "auto", the cheapest for the
    whole vocabulary, or for `targets` chosen tokens a prompt; with an image, its image method where that is
    cheaper, methods.with_image), the limits its plan works within, and the
    probe's report (None unless auto)."""
    method = config.method
    if journal.get_meta("token_mapping") is None:
        mapping = await metered.verify_mapping(first)
        if mapping is not None:
            journal.set_meta("token_mapping", mapping)
    if method != "auto":
        return method, metered.limits, None
    saved = journal.get_meta("probe")
    report = ProbeReport.from_dict(saved) if saved else await probe(metered, first)
    journal.set_meta("probe", report.to_dict())
    k = min(config.top_k, report.limits().top_logprobs)
    picked = cheapest(report, metered.vocab_size, k, report.limits(), config.eps, targets).name if targets else report.recommended
    if config.image is not None:
        rank = config.image.rank if isinstance(config.image, Image) else None
        picked = with_image(picked, metered.vocab_size, k, report.limits(), config.eps, targets, rank)
    return picked, report.limits(), report


async def _run_and_settle(runner: Runner, writer: OutputWriter) -> None:
    """Run the prompts (Ctrl-C stops the run), then wait for the output rewrite in flight, however the run ended."""
    try:
        with interrupts_stop(runner):
            await runner.run()
    finally:
        await writer.settle()
