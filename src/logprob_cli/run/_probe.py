"""`probe`: a handful of calls that measure what an endpoint reveals, and the method that fits.

Measured, in this order, on one prompt:
  1. the top_logprobs cap it honours: ask for the whole vocabulary; while asks are rejected,
     ask for the cap the endpoint names in its refusal ("top_logprobs must be <= 3"; once
     answered, one more must be refused), else for 20, 10, 5, 2, 1, and once one is answered,
     search between it and the smallest refused ask (rejected asks are not billed: they cost
     time only). An answer with fewer entries than asked names the cap too. Every later ask
     stays within the cap: k = min(cap, 20);
  2. determinism: the answered ask again, identical; and whether a call sent alongside others
     (4 at once, then 1 alone: a server that batches them) answers as it does alone;
  3. what the bias does. With k >= 2: the last visible token t, biased to beat the top by
     2 nats: whether the bias steers sampling (t is generated) and whether the returned
     logprobs are after the bias (lp'_t - lp'_top moved by it); then a token outside the
     top-k forced with the largest bias: is its own logprob reported (below the top-k, so
     unbiased), withheld (-9999), or wrong. With k = 1, one call does both: the top pushed
     down by -100 (the runner-up must be generated; pre-bias logprobs keep listing the old
     top unchanged) and the runner-up's own logprob, which must lie below the top's;
  4. whether a bias above 100 and more than 300 bias entries are rejected;
  5. returned precision (bfloat16 grid or float32) and how tokens are identified, and how many tokens
     the answers can never name (`Endpoint.unnamed_tokens`: llama-cpp-python names tokens by text, and
     distinct tokens share texts): an answer listing every other token counts as the whole vocabulary;
  6. where the endpoint declares that a request may list token ids (vLLM's logprob_token_ids,
     `Limits.token_ids`): one call listing a token outside the top-k, which must come back with
     a logprob below the top-k's last (`chosen_ids`; a refusal or a missing id: not observed);
  7. where the endpoint declares that one request answers several positions of a completion
     (vLLM's prompt_logprobs, `Endpoint.positions_per_call`) and the whole vocabulary came back:
     one call for the position after the prompt and its greedy token, whose rows also hold the
     position after the prompt alone, which must equal the first answer to 1e-3 nats
     (`positions_per_call`; else 1, and `unknown` says why);
  8. where the endpoint declares that a request may draw several choices at a temperature (OpenAI's `n`,
     `Limits.draws`): one call for 2 choices at temperature 1, which must come back with 2 tokens (`draws`:
     the declared number; else 1, and `unknown` says why).
Calls: `expected_calls` gives what the probe gets answered (billed) on an endpoint that behaves
as a report says; PROBE_CALLS is that on OpenAI's API, which rejects the two limit tests (the
built-in simulator clips a bias above 100 instead, one call more). A test holds the two to the
simulator's own count.

A refused or failed request is not an answer. Each property is observed or unknown: booleans
are None and string properties "unknown" when the probe could not tell, and `unknown` says why
for each (the request was rejected, failed after its retries, or its answer was withheld). The
method is the cheapest one whose requirements were observed, by each method's spec (its needs and
its calls per prompt at the default eps: methods.cheapest): the whole vocabulary in one call
(`direct`); k-1 new values per call where logprobs are post-bias and k >= 2 (`topk`); one call
per token where a forced token reports its own pre-bias logprob (`forced`); argmax search where
the bias steers sampling (`bisection`); else only the top-k (`visible`), and `reasons` say when an
unknown kept a better method out. If no request for top logprobs is answered at all, nothing
can be told: `probe` raises EndpointUnsuitable, naming the method setting to choose by hand.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from logprob_cli.endpoints import Answer, Endpoint, EndpointError, EndpointFatal, EndpointRejected, EndpointUnsuitable, Limits, Prompt, Query
from logprob_cli.errors import Worded
from logprob_cli.methods import DEFAULT_EPS, SPECS, Image, cheapest, with_image
from logprob_cli.methods import BFLOAT16_ROUNDOFF, bias_response, lowered_top_response, probe_ranks, roundoff

MAX_TOP_K = 20  # the most logprobs a measurement asks for (OpenAI's cap)
CAP_STEPS = (20, 10, 5, 2, 1)  # asks after the whole vocabulary, where a refusal names no cap
TOGETHER = 4  # calls sent at once to see whether a batching server answers them as it does one alone
BIG_BIAS = 100.0  # OpenAI's bias limit: the bias of the forcing tests


@dataclass
class ProbeReport:
    """What the probe found (module docstring). None / "unknown": could not tell, `unknown` says why.

    calls: requests answered (billed); rejected_calls: requests the endpoint refused (not billed).
    """

    top_logprobs_cap: int = 0
    whole_vocabulary: bool = False
    bias_steers_sampling: bool | None = None
    logprobs_after_bias: bool | None = None
    forced_logprob: str = "untested"  # reported | sentinel | wrong | untested (not needed) | unknown
    chosen_ids: bool = False  # a listed id came back with its logprob (only tested where the endpoint declares it)
    positions_per_call: int = 1  # positions of a completion one whole-vocabulary request answers (7. above)
    token_ids_cap: int = 0  # the ids a request may list, as the endpoint declares (0: none)
    top_with_token_ids: bool = True  # the top-k comes back beside listed ids (vLLM: in their place)
    bias_max: float = 100.0  # the bias range and entry cap the endpoint declares (OpenAI's documented ones by
    bias_entries: int = 300  # default): a plan must not count on a bias the endpoint clips
    draws: int = 1  # choices a request may draw at a temperature, as the endpoint declares (OpenAI's `n`) and a draw
    # of 2 confirmed; the bisection plan proves whatever its draws suggest with greedy calls, and stops drawing where
    # none come back
    draws_tested: bool = False  # whether the endpoint declared draws, so the probe asked for 2 (one call either way)
    bias_above_100: str = "untested"  # rejected | accepted | unknown
    bias_entries_over_300: str = "untested"  # rejected | accepted | unknown
    precision: str = "float32"
    deterministic: bool | None = None
    concurrent_agree: bool | None = None
    identity: list[str] = field(default_factory=list)
    vocab_size: int = 0
    unnamed_tokens: int = 0  # tokens no answer can name (their text is shared): never given a value
    calls: int = 0
    rejected_calls: int = 0
    recommended: str = "visible"
    estimated_calls: int = 1
    unknown: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "ProbeReport":
        """A report saved by this or an earlier version (checkpoints keep it); keys it does not know are dropped."""
        names = {f.name for f in dataclasses.fields(ProbeReport)}
        return ProbeReport(**{key: value for key, value in data.items() if key in names})

    def limits(self) -> Limits:
        """The request limits the probe found: its top_logprobs cap and listed ids, and the bias range and entry cap
        the endpoint declares (a plan must not count on a bias the endpoint clips)."""
        listed = self.token_ids_cap if self.chosen_ids else 0
        return Limits(
            top_logprobs=self.top_logprobs_cap, bias_max=self.bias_max, bias_entries=self.bias_entries, token_ids=listed,
            top_with_token_ids=self.top_with_token_ids, draws=self.draws,
        )

    def bias_observed(self) -> tuple[bool, bool] | None:
        """(the bias steers sampling, logprobs are post-bias) where the probe observed both (Context.bias_observed:
        the plans then skip their own check's second call), else None."""
        steers, moved = self.bias_steers_sampling, self.logprobs_after_bias
        return (steers, moved) if isinstance(steers, bool) and isinstance(moved, bool) else None

    def rows(self) -> list[tuple[str, str]]:
        """The report as (property, value) lines for a table; unknowns read "could not tell (why)"."""

        def shown(name: str, value: Any, yes: str = "yes", no: str = "no") -> str:
            if value is None or value == "unknown":
                return f"could not tell ({self.unknown.get(name, 'not measured')})"
            if value == "untested":
                return "not tested (no method here needs it)"
            return yes if value is True else no if value is False else str(value)

        cap = f"{self.top_logprobs_cap:,}" + (" (whole vocabulary)" if self.whole_vocabulary else "")
        spent = f"{self.calls} answered" + (f", {self.rejected_calls} rejected (not billed)" if self.rejected_calls else "")
        return [
            ("top_logprobs honoured", cap),
            ("bias steers sampling", shown("bias_steers_sampling", self.bias_steers_sampling)),
            ("logprobs reflect the bias", shown("logprobs_after_bias", self.logprobs_after_bias, "yes (post-bias)", "no (pre-bias)")),
            ("forced token's own logprob", shown("forced_logprob", self.forced_logprob)),
            ("logprobs of listed token ids", self._listed_row()),
            ("positions of a text a call", self._positions_row()),
            *([("choices drawn a call (n)", self._draws_row())] if self.draws_tested else []),
            ("bias above 100", shown("bias_above_100", self.bias_above_100)),
            ("more than 300 bias entries", shown("bias_entries_over_300", self.bias_entries_over_300)),
            ("returned precision", self.precision),
            ("identical calls agree", shown("deterministic", self.deterministic)),
            ("concurrent calls agree", shown("concurrent_agree", self.concurrent_agree)),
            ("tokens identified by", ", ".join(self.identity)),
            *([("tokens it cannot name", self._unnamed_row())] if self.unnamed_tokens else []),
            ("calls spent probing", spent),
            ("recommended method", f"[bold]{self.recommended}[/] (~{self.estimated_calls:,} calls per prompt)"),
        ]


    def _unnamed_row(self) -> str:
        return (
            f"{self.unnamed_tokens:,} of {self.vocab_size:,} (they render as a text another token shares, or as none; "
            "no value is given to them)"
        )

    def _positions_row(self) -> str:
        if self.positions_per_call > 1:
            return f"up to {self.positions_per_call} (the prompt's logprobs: every position of a text in one call)"
        return self.unknown.get("positions_per_call", "1")

    def _draws_row(self) -> str:
        return f"up to {self.draws} at a temperature" if self.draws > 1 else self.unknown.get("draws", "1")

    def _listed_row(self) -> str:
        if self.chosen_ids:
            return f"yes (up to {self.token_ids_cap:,} ids a call)"
        return self.unknown.get("chosen_ids", "no (the endpoint takes no list)") if self.token_ids_cap else "not offered"


class _Asker:
    """Sends the probe's queries on one prompt, counting answered and rejected ones in the report."""

    def __init__(self, endpoint: Endpoint, prompt: Prompt, report: ProbeReport):
        self.endpoint, self.prompt, self.report = endpoint, prompt, report

    async def __call__(self, query: Query) -> Answer | EndpointError:
        """The answer, or the error of a request rejected or failed after its retries (EndpointFatal is raised)."""
        return await self.on(self.prompt, query)

    async def on(self, prompt: Prompt, query: Query) -> Answer | EndpointError:
        """`__call__` on another prompt; an answer read from an earlier request's rows is not counted."""
        try:
            answer = await self.endpoint.ask(prompt, query)
        except EndpointFatal:
            raise
        except EndpointRejected as rejected:
            self.report.rejected_calls += 1
            return rejected
        except EndpointError as failed:
            return failed
        self.report.calls += answer.requests
        return answer


def _why(error: EndpointError) -> str:
    if isinstance(error, EndpointRejected):
        return f"the request was rejected: {error.reason}"
    return f"the request failed: {error}"


async def probe(endpoint: Endpoint, prompt: Prompt) -> ProbeReport:
    """Measure the endpoint on one prompt (see module docstring).

    Raises EndpointFatal if it cannot be used at all, EndpointUnsuitable if no request for top
    logprobs was answered, EndpointError if such requests kept failing.
    """
    prompt = dataclasses.replace(prompt, completion_ids=())  # a position's context as plain ids: never from rows
    declared = endpoint.limits
    report = ProbeReport(vocab_size=endpoint.vocab_size, bias_max=declared.bias_max, bias_entries=declared.bias_entries)
    report.unnamed_tokens = len(endpoint.unnamed_tokens())
    ask = _Asker(endpoint, prompt, report)
    first, asked = await _find_cap(ask, report, endpoint.vocab_size)
    k = min(report.top_logprobs_cap, MAX_TOP_K)
    head = dataclasses.replace(first, top_ids=first.top_ids[:k], top_logprobs=first.top_logprobs[:k])
    if roundoff(list(head.top_logprobs)) == BFLOAT16_ROUNDOFF:
        report.precision = "bfloat16"
    held = await endpoint.withheld_tokens()  # their answers come back empty: never probe with them
    await _agreement(ask, report, first, asked, head, k, held)
    if k >= 2:
        await _lift_and_force(ask, report, head, k, held)
    else:
        await _push_top_down(ask, report, head)
    for name, bias in (("bias_above_100", {head.top_ids[-1]: 101.0}), ("bias_entries_over_300", {i: 1e-3 for i in range(301)})):
        outcome = await ask(Query.make(bias, top_logprobs=1))
        if isinstance(outcome, Answer):
            setattr(report, name, "accepted")
        elif isinstance(outcome, EndpointRejected):
            setattr(report, name, "rejected")
        else:
            setattr(report, name, "unknown")
            report.unknown[name] = _why(outcome)
    if endpoint.limits.token_ids:
        await _listed_ids(ask, report, endpoint.limits, head, held)
    if endpoint.positions_per_call > 1 and report.whole_vocabulary and prompt.prompt is not None and not prompt.context_ids:
        await _positions(ask, report, endpoint.positions_per_call, prompt, first)
    if declared.draws > 1:
        await _draws(ask, report, declared.draws)
    report.identity = sorted(endpoint.identity)
    _recommend(report, endpoint.vocab_size)
    return report


async def _find_cap(ask: _Asker, report: ProbeReport, vocab: int) -> tuple[Answer, int]:
    """The answer to the largest top_logprobs ask the endpoint honours, and that ask (module docstring, 1)."""
    n, answered, refused = vocab, None, None  # next ask; largest answered (answer, ask); smallest refused
    said = ""
    while n:
        outcome = await ask(Query.make(top_logprobs=n))
        if isinstance(outcome, Answer):
            if not outcome.top_ids:  # an answer naming no generated token but listing logprobs still counts
                raise EndpointUnsuitable(Worded(
                    "the endpoint answered a request for {n} top logprobs with none{withheld}, so the probe could not "
                    "tell what it reveals: choose a method by hand with {method}",
                    n=n, withheld=" (it withheld the whole answer)" if outcome.withheld else "",
                ))
            answered = (outcome, n)
            if _returned(outcome, n, report) < n:  # it returns fewer than asked: that is its cap
                break
        elif isinstance(outcome, EndpointRejected):
            refused, said = n, outcome.reason
        elif answered:  # a cap at least this large was observed; whether more is allowed cannot be told
            report.reasons.append(f"could not tell whether more than {answered[1]} top logprobs are allowed: {_why(outcome)}")
            break
        else:
            raise EndpointError(f"the probe's request for {n} top logprobs failed, so nothing could be measured: {outcome}")
        n = _next_ask(answered[1] if answered else 0, refused, said)
    if answered is None:
        raise EndpointUnsuitable(Worded(
            "the endpoint rejected every request for top logprobs (down to 1; it said: {said}), so the probe could "
            "not tell what it reveals. Check that the model returns logprobs (and {extra_body}), or choose a method "
            "by hand with {method}", said=said,
        ))
    first, asked = answered
    report.top_logprobs_cap = _returned(first, asked, report)
    report.whole_vocabulary = report.top_logprobs_cap >= vocab
    if refused is not None and report.top_logprobs_cap < MAX_TOP_K:
        n = report.top_logprobs_cap
        report.reasons.append(f"the endpoint returns at most {n} logprob{'s' * (n != 1)} a call (it said: {said})")
    return first, asked


def _returned(answer: Answer, asked: int, report: ProbeReport) -> int:
    """How many logprobs the answer to an ask for `asked` returned: its entries, or the whole vocabulary where the
    ask was for it and only the tokens no answer can name are missing."""
    whole = asked >= report.vocab_size and len(answer.top_ids) >= report.vocab_size - report.unnamed_tokens
    return report.vocab_size if whole else len(answer.top_ids)


def _next_ask(answered: int, refused: int | None, said: str) -> int:
    """The next top_logprobs to ask for, strictly between the largest answered ask and the smallest refused
    one, or 0 when there is none: the largest number the last refusal names there (its cap, as a rule);
    one above an answered ask it named (so a cap read from a message is confirmed by a refusal, which
    is free); the next of CAP_STEPS while none is answered; else the midpoint."""
    if refused is None:
        return 0
    numbers = {int(number) for number in re.findall(r"\d+", said)}
    named = [number for number in numbers if answered < number < refused]
    if named:
        return max(named)
    if answered in numbers and answered + 1 < refused:
        return answered + 1
    if not answered:
        return next((step for step in CAP_STEPS if step < refused), 0)
    middle = (answered + refused) // 2
    return middle if middle > answered else 0


async def _agreement(ask: _Asker, report: ProbeReport, first: Answer, asked: int, head: Answer, k: int, held) -> None:
    """Whether identical calls agree, and whether calls sent together answer as one sent alone (module doc, 2)."""
    again = await ask(Query.make(top_logprobs=asked))
    if isinstance(again, Answer):
        report.deterministic = again == first
    else:
        report.unknown["deterministic"] = _why(again)
    others = (i for i in range(report.vocab_size) if i not in set(head.top_ids) and i not in held)
    ids = [*head.top_ids[:TOGETHER], *(next(others) for _ in range(TOGETHER - min(k, TOGETHER)))]
    together = await asyncio.gather(*(ask(Query.make({i: 1.0}, top_logprobs=k)) for i in ids))
    alone = await ask(Query.make({ids[0]: 1.0}, top_logprobs=k))
    if isinstance(together[0], Answer) and isinstance(alone, Answer):
        report.concurrent_agree = together[0] == alone
    else:
        report.unknown["concurrent_agree"] = _why(alone if not isinstance(alone, Answer) else together[0])


async def _lift_and_force(ask: _Asker, report: ProbeReport, head: Answer, k: int, held) -> None:
    """What the bias does, with k >= 2 (module docstring, 3): one lifted token, then one forced."""
    target = head.top_ids[probe_ranks(head, held)[0]]
    b = min(BIG_BIAS, head.top_logprobs[0] - head.top()[target] + 2.0)
    moved = await ask(Query.make({target: b}, top_logprobs=k))
    if not isinstance(moved, Answer) or moved.withheld:
        why = "the endpoint withheld its answer" if isinstance(moved, Answer) else _why(moved)
        report.unknown.update(bias_steers_sampling=why, logprobs_after_bias=why)
        report.forced_logprob, report.unknown["forced_logprob"] = "unknown", why
        return
    report.bias_steers_sampling, report.logprobs_after_bias = bias_response(head, moved, target, b)
    if not report.bias_steers_sampling:
        return
    outside = next(i for i in range(report.vocab_size) if i not in set(head.top_ids) and i not in held)
    forced = await ask(Query.make({outside: BIG_BIAS}, top_logprobs=k))
    if not isinstance(forced, Answer) or forced.sampled != outside:
        report.forced_logprob = "unknown"
        report.unknown["forced_logprob"] = (
            _why(forced) if not isinstance(forced, Answer)
            else f"token {outside} biased by {BIG_BIAS:g} was not generated" + (" (answer withheld)" if forced.withheld else "")
        )
    else:
        report.forced_logprob = _forced_kind(report, forced.sampled_logprob, head.top_logprobs[-1])


async def _push_top_down(ask: _Asker, report: ProbeReport, head: Answer) -> None:
    """What the bias does, with k = 1 (module docstring, 3): the top pushed down by -100, one call."""
    pushed = await ask(Query.make({head.top_ids[0]: -BIG_BIAS}, top_logprobs=1))
    if not isinstance(pushed, Answer) or pushed.withheld:
        why = "the endpoint withheld its answer" if isinstance(pushed, Answer) else _why(pushed)
        report.unknown.update(bias_steers_sampling=why, logprobs_after_bias=why)
        report.forced_logprob, report.unknown["forced_logprob"] = "unknown", why
        return
    report.bias_steers_sampling, report.logprobs_after_bias = lowered_top_response(head, pushed)
    if report.bias_steers_sampling:
        report.forced_logprob = _forced_kind(report, pushed.sampled_logprob, head.top_logprobs[0])


def _forced_kind(report: ProbeReport, value: float | None, ceiling: float) -> str:
    """A forced token outside the returned top-k reported `value`: its own unbiased logprob lies below `ceiling`."""
    if value is None:
        return "sentinel"
    return "wrong" if report.logprobs_after_bias or value > ceiling + 1e-3 else "reported"


async def _listed_ids(ask: _Asker, report: ProbeReport, limits: Limits, head: Answer, held: frozenset[int]) -> None:
    """Module docstring, 6: list one token outside the top-k (and not held); it must come back below the top-k."""
    report.token_ids_cap, report.top_with_token_ids = limits.token_ids, limits.top_with_token_ids
    shown = set(head.top_ids) | held
    listed = next(i for i in range(report.vocab_size - 1, -1, -1) if i not in shown)
    k = len(head.top_ids) if limits.top_with_token_ids else 0
    outcome = await ask(Query.make(top_logprobs=k, token_ids=[listed]))
    if not isinstance(outcome, Answer):
        report.unknown["chosen_ids"] = f"no: a request listing token {listed} {_why(outcome)}"
        return
    value = outcome.top().get(listed)
    if value is None or value > head.top_logprobs[-1] + 1e-3:
        report.unknown["chosen_ids"] = (
            f"no: a request listing token {listed} came back " + ("without it" if value is None else f"with {value:.4f}, above the top-k")
        )
        return
    report.chosen_ids = True


async def _draws(ask: _Asker, report: ProbeReport, declared: int) -> None:
    """Module docstring, 8: two choices drawn at temperature 1 must come back as two tokens."""
    report.draws_tested = True
    outcome = await ask(Query.make(draws=2, temperature=1.0))
    if not isinstance(outcome, Answer):
        report.unknown["draws"] = f"no: a request drawing 2 choices {_why(outcome)}"
    elif len(outcome.drawn) < 2:
        report.unknown["draws"] = "no: a request drawing 2 choices came back with one (the endpoint ignores or refuses `n`)"
    else:
        report.draws = declared


async def _positions(ask: _Asker, report: ProbeReport, per_call: int, prompt: Prompt, first: Answer) -> None:
    """Module docstring, 7: the position after the prompt and its greedy token, asked as a completion's; the same
    request's rows must give back `first` (the whole vocabulary after the prompt alone) to 1e-3 nats."""
    greedy = first.top_ids[0]
    unit = dataclasses.replace(prompt, completion_ids=(greedy,), position=1, context_ids=(greedy,))
    query = Query.make(top_logprobs=report.vocab_size)
    after = await ask.on(unit, query)
    if not isinstance(after, Answer):
        report.unknown["positions_per_call"] = f"1: a request for the position after {greedy} {_why(after)}"
        return
    before = await ask.on(dataclasses.replace(unit, position=0, context_ids=()), query)
    if not isinstance(before, Answer) or before.requests:
        report.unknown["positions_per_call"] = "1: the position after the prompt was not answered from the same request"
        return
    expected, got = first.top(), before.top()
    if got.keys() != expected.keys() or max(abs(got[i] - lp) for i, lp in expected.items()) > 1e-3:
        report.unknown["positions_per_call"] = "1: the prompt's logprobs differ from the logprobs after it"
        return
    report.positions_per_call = per_call


def _recommend(report: ProbeReport, vocab: int) -> None:
    """The cheapest method whose requirements were observed (methods.cheapest, over the methods' specs),
    its calls per prompt by its spec at the default eps, and the reasons (module docstring)."""
    k, limits = min(report.top_logprobs_cap, MAX_TOP_K), report.limits()
    spec = cheapest(report, vocab, k, limits)
    observed = spec.calls_observed if report.bias_observed() else spec.calls
    report.recommended, report.estimated_calls = spec.name, observed(vocab, k, DEFAULT_EPS, limits)
    report.reasons.append(_why_picked(report))
    for name, why in report.unknown.items():
        report.reasons.append(f"could not tell {name.replace('_', ' ')}: {why}")
    if report.deterministic is False:
        report.reasons.append("identical calls gave different answers: expect near-tie noise")
    elif report.concurrent_agree is False:
        report.reasons.append(
            "a call answered alongside others differs from the same call alone (the server batches requests): "
            "auto runs one call at a time"
        )
    if "strings" in report.identity:
        report.reasons.append("tokens come back as strings only: distinct tokens with the same string merge")
    if report.unnamed_tokens:
        report.reasons.append(
            f"{report.unnamed_tokens:,} of {vocab:,} tokens share their text with another token (or render as none): "
            "no method can give them a value, so they stay unrecovered"
        )


def image_method(report: ProbeReport, image: Image | str) -> tuple[str, int | None]:
    """The method `auto` runs on an endpoint as `report` found it with `image` (an Image, or "auto": learned by the
    run), picked as extract and estimate pick it (methods.with_image, no chosen tokens), and its calls per prompt
    at the default eps: None for an image method with "auto", whose image's rank is not known before the run."""
    k, limits, vocab = min(report.top_logprobs_cap, MAX_TOP_K), report.limits(), report.vocab_size
    rank = image.rank if isinstance(image, Image) else None
    name = with_image(report.recommended, vocab, k, limits, DEFAULT_EPS, 0, rank)
    if name == report.recommended:
        return name, report.estimated_calls
    return name, None if rank is None else SPECS[name].calls(vocab, k, DEFAULT_EPS, limits, 0, rank=rank)


def _why_picked(report: ProbeReport) -> str:
    """Why the probe's observations led to `report.recommended`."""
    steers, post_bias, name = report.bias_steers_sampling, report.logprobs_after_bias, report.recommended
    if name == "listed":
        return "a request may list token ids whose logprobs come back"
    if name == "direct":
        return "the whole vocabulary comes back in one call"
    if name == "topk":
        return "returned logprobs move with the bias"
    if name == "forced":
        return "a forced token reports its own unbiased logprob"
    if name == "bisection" and post_bias:
        return "the bias steers sampling; logprobs move with it, but one a call is too few for topk"
    if name == "bisection":
        why = {"sentinel": "withheld (-9999)", "wrong": "not its unbiased value", "unknown": "unknown"}
        shown = why.get(report.forced_logprob, "not reported")
        return f"the bias steers sampling but logprobs are pre-bias and a forced token's own is {shown}"
    if steers is None:
        return Worded(
            "could not tell what the bias does, so visible is the best method whose requirements were observed: "
            "run `logprobs probe` again, or choose {method} by hand"
        )
    if post_bias:
        return "the bias moves the one logprob returned but not the generated token: no method reads past it"
    return "the bias changes nothing: only the top-k can be learned, the rest is bounded"


def expected_calls(report: ProbeReport) -> int:
    """The calls `probe` gets answered (billed) on an endpoint that behaves as `report` says, its cap found
    by the first answered ask (the whole vocabulary, a cap the refusal names, or one of CAP_STEPS): that
    ask and its twin, TOGETHER at once and 1 alone, the bias test, the forced token where k >= 2 and the
    bias steers sampling (with k = 1 the bias test forces one), each limit test the endpoint accepts, and
    the listed-ids test where it passed, the positions test where it passed, and the draws test where the endpoint
    declares draws (answered either way: OpenAIEndpoint asks a server refusing `n` again without it)."""
    k = min(report.top_logprobs_cap, MAX_TOP_K)
    forced = int(k >= 2 and bool(report.bias_steers_sampling))
    accepted = sum(test == "accepted" for test in (report.bias_above_100, report.bias_entries_over_300))
    return 2 + TOGETHER + 1 + 1 + forced + accepted + int(report.chosen_ids) + int(report.positions_per_call > 1) + int(report.draws_tested)


# OpenAI's API: cap 20, the bias steers sampling, both limit tests rejected, draws declared (`n`).
PROBE_CALLS = expected_calls(ProbeReport(
    top_logprobs_cap=MAX_TOP_K, bias_steers_sampling=True, bias_above_100="rejected", bias_entries_over_300="rejected",
    draws_tested=True,
))
