"""Every position of a completion: each prompt's `completion` resolved to token ids, then the prompt split into
units of work, one a position, before a call is spent.

For a completion of n tokens t1..tn the distributions wanted are the n + 1 after the prompt followed by t1..tk,
k = 0..n (position k; position n is the one after the whole completion). Each is a `Prompt` of its own (same id,
`position` k, `context_ids` t1..tk) with a journal key of its own (`prompt_key`), so a resumed run asks again
only for the positions it has not finished. The endpoint appends the context as token ids
(`Endpoint.token_context`), so a position's context is exactly those tokens whatever their bytes would
re-tokenize into. A completion given as text is split by the endpoint's `split_text` (its bytes, tokenized on
their own: no special token added and nothing shared with the prompt's last tokens).

With chosen tokens, a unit asks for its prompt's targets and, where it is not one of them, the completion's next
token (so its logprob is read at every position, `next_token_logprob`).
"""

from __future__ import annotations

import asyncio
import dataclasses

from logprob_cli.endpoints import Endpoint, EndpointUnsuitable, Prompt
from logprob_cli.errors import Worded
from logprob_cli.io import InputError


def has_completions(prompts: list[Prompt]) -> bool:
    """Whether any prompt asks for the positions of a completion (as given or resolved)."""
    return any(p.completion is not None or p.completion_ids or p.position is not None for p in prompts)


def require_token_context(endpoint: Endpoint) -> None:
    """EndpointUnsuitable, saying what would work, where `endpoint` cannot append token ids to a prompt exactly."""
    if endpoint.token_context:
        return
    raise EndpointUnsuitable(Worded(
        "every position of a completion needs an endpoint that takes a prompt followed by exact token ids, and "
        "{name} cannot ({why}): use llama-server or vLLM with {api_completions}, or the built-in simulator. Nothing was sent",
        name=endpoint.model, why=_why_not(endpoint),
    ))


def _why_not(endpoint: Endpoint) -> str:
    if endpoint.api == "chat":
        return "a chat API re-tokenizes text through the chat template"
    return "its completions API is not known to take a text followed by token ids"


async def resolve_completions(endpoint: Endpoint, prompts: list[Prompt]) -> list[Prompt]:
    """`prompts` with `completion_ids` filled from their `completion` text (each distinct text split once through
    `split_text`), every id checked against the vocabulary; raises InputError listing every problem with its
    line."""
    texts = sorted({p.completion for p in prompts if p.completion is not None and not p.completion_ids})
    splits = {text: await endpoint.split_text(text) for text in texts}
    problems: list[str] = []
    resolved = []
    for prompt in prompts:
        ids = prompt.completion_ids or splits.get(prompt.completion or "", ())
        outside = [i for i in ids if not 0 <= i < endpoint.vocab_size]
        if outside:
            problems.append(
                f"line {prompt.line}: completion id {outside[0]} is outside the vocabulary "
                f"(ids 0 to {endpoint.vocab_size - 1:,})"
            )
        resolved.append(dataclasses.replace(prompt, completion_ids=tuple(ids)))
    if problems:
        raise InputError(problems)
    return resolved


def with_completion_ids(endpoint: Endpoint, prompts: list[Prompt]) -> list[Prompt]:
    """`prompts` ready to be split into positions, on an event loop of its own: EndpointUnsuitable where the
    endpoint cannot take a position's context (`require_token_context`), InputError for a completion it cannot
    take (`resolve_completions`); unchanged where no prompt has a completion."""
    if not has_completions(prompts):
        return prompts
    require_token_context(endpoint)

    async def resolve() -> list[Prompt]:
        try:
            return await resolve_completions(endpoint, prompts)
        finally:
            await endpoint.aclose()

    return asyncio.run(resolve())


def positions(prompt: Prompt) -> list[Prompt]:
    """The units of work of one prompt whose completion is resolved: n + 1 for n completion tokens (a prompt
    without a completion is one unit, position 0). A unit with targets also asks for its next token."""
    ids = prompt.completion_ids
    units = []
    for k in range(len(ids) + 1):
        targets = prompt.target_ids
        if targets and k < len(ids) and ids[k] not in targets:
            targets = (*targets, ids[k])
        units.append(dataclasses.replace(prompt, position=k, context_ids=ids[:k], target_ids=targets))
    return units


def expand_positions(prompts: list[Prompt]) -> list[Prompt]:
    """`split_positions` where a prompt has a completion; the prompts unchanged otherwise."""
    return split_positions(prompts) if has_completions(prompts) else prompts


def split_positions(prompts: list[Prompt]) -> list[Prompt]:
    """Every prompt's units in input order, positions ascending (a prompt without a completion is its position 0).
    Raises ValueError for a completion not resolved to ids yet (`with_completion_ids`)."""
    unresolved = next((p for p in prompts if p.completion is not None and not p.completion_ids), None)
    if unresolved is not None:
        raise ValueError(f"prompt {unresolved.id!r}: resolve its completion to token ids before splitting it")
    return [unit for prompt in prompts for unit in positions(prompt)]
