"""Chosen tokens: each prompt's `targets` (token texts or ids, as the user gave them) resolved to the
model's token ids, before a call is spent.

A text must be exactly one token of the endpoint's vocabulary, matched by its bytes (the endpoint's
`split_text`); an id must lie in the vocabulary; no token may be asked for twice on one line. Every
problem is reported at once with its line, and a text that is several tokens shows how it splits,
so that "Yes" against " Yes" is plain to see.
"""

from __future__ import annotations

import dataclasses

from logprob_cli.endpoints import Endpoint, Prompt
from logprob_cli.io import InputError


async def resolve_targets(endpoint: Endpoint, prompts: list[Prompt]) -> list[Prompt]:
    """`prompts` with `target_ids` filled from their `targets`; raises InputError listing every problem.
    Each distinct text is split once (a server's tokenizer is asked once per text, not per line)."""
    texts = sorted({t for p in prompts for t in p.targets if isinstance(t, str)})
    splits = {text: await endpoint.split_text(text) for text in texts}
    problems: list[str] = []
    resolved = []
    for prompt in prompts:
        ids, line_problems = _ids(endpoint, prompt, splits)
        problems += [f"line {prompt.line}: {problem}" for problem in line_problems]
        resolved.append(dataclasses.replace(prompt, target_ids=tuple(ids)))
    if problems:
        raise InputError(problems)
    return resolved


def _ids(endpoint: Endpoint, prompt: Prompt, splits: dict[str, tuple[int, ...]]) -> tuple[list[int], list[str]]:
    """One prompt's target ids and what is wrong with its targets."""
    ids: list[int] = []
    problems: list[str] = []
    given: dict[int, str | int] = {}
    for target in prompt.targets:
        if isinstance(target, str):
            split = splits[target]
            if len(split) != 1:
                problems.append(f"target {target!r} is {_split_shown(endpoint, split)} in {endpoint.model}'s vocabulary, "
                                "not one token: give a single token (its text or its id)")
                continue
            token = split[0]
        elif not 0 <= target < endpoint.vocab_size:
            problems.append(f"target id {target} is outside the vocabulary (ids 0 to {endpoint.vocab_size - 1:,})")
            continue
        else:
            token = target
        if token in given:
            problems.append(f"targets {given[token]!r} and {target!r} are the same token (id {token})")
            continue
        given[token] = target
        ids.append(token)
    return ids, problems


def _split_shown(endpoint: Endpoint, split: tuple[int, ...]) -> str:
    """'2 tokens: " May" (6622) + "be" (1395)', or 'no token' for an empty split."""
    if not split:
        return "no token"
    pieces = " + ".join(f"{endpoint.token_text(i)!r} ({i})" for i in split)
    return f"{len(split)} tokens: {pieces}"
