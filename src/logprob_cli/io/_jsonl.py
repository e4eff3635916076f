"""Reading a batch's prompts from JSONL: one JSON object per line, every problem reported at once.

A line is `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [{"role": ..., "content": ...}, ...]}`;
optionally with `"targets": [" Yes", " No", 1734]` (token strings and/or ids: the tokens whose logprobs are
wanted; every line has them or none does), and with a plain prompt `"completion": "..."` or
`"completion_ids": [...]` (a text whose every position is wanted); any other keys are kept in `Prompt.extra`. Blank lines are
skipped but still count as lines.
Besides the shape of each line, the pre-flight check (`preflight.prompt_problems`) finds what
would fail only after calls are paid (text that is not valid Unicode, NaN, ids beyond 64 bits,
keys named like output columns, values Parquet cannot store, chat lines for legacy completions).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from logprob_cli.endpoints import Prompt
from logprob_cli.errors import LogprobError, Worded, prefixed, reworded
from logprob_cli.io._preflight import completion_problems, missing_targets, prompt_problems, target_problems, where

MAX_LISTED = 20
RESERVED = ("id", "prompt", "messages", "targets", "completion", "completion_ids")
KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a decimal number",
    type(None): "null",
}


class InputError(LogprobError):
    """The input cannot be used; `problems` lists everything wrong, line problems as "line N: ...". Raised before
    any call; the CLI exits 2."""

    def __init__(self, problems: list[str], source: str | None = None):
        super().__init__(problems, source)
        self.problems = list(problems)
        self.source = source

    def __str__(self) -> str:
        return self.worded({})

    def worded(self, names: Mapping[str, str]) -> str:
        """The problems (the first MAX_LISTED) under the source's name, their settings named by `names`."""
        listed = [reworded(problem, names) for problem in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            listed.append(f"... and {len(self.problems) - MAX_LISTED} more")
        if self.source is None:
            return "\n".join(listed)
        count = len(self.problems)
        head = f"{self.source}: {count} problem{'' if count == 1 else 's'}"
        return "\n".join([head, *(f"  {item}" for item in listed)])


def select_shard(prompts: list[Prompt], index: int, count: int) -> list[Prompt]:
    """Part `index` of `count` (0-based): the prompts whose id hashes to it, in input order.

    The hash (BLAKE2b of the id as JSON) depends on nothing but the id, so every machine
    running the same input agrees on the parts, the parts are disjoint and cover the input,
    and adding lines to the input moves no prompt to another part.
    """
    def part(prompt: Prompt) -> int:
        digest = hashlib.blake2b(json.dumps(prompt.id).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % count

    return [p for p in prompts if part(p) == index]


def read_prompts(source: str | os.PathLike, api: str | None = None) -> list[Prompt]:
    """Read and check every line of `source` ("-" is stdin); return its prompts in file order.

    Raises one InputError listing every problem in the file (nothing is returned then),
    or naming the one reason the file could not be read or held no prompts. `api` is the
    API the prompts go to ("chat", "completions"; None: either), for the pre-flight check.
    A line without "id" gets its line number, as a string if the file's ids are strings.
    """
    name = "<stdin>" if source == "-" else os.fspath(source)
    problems: list[tuple[int, str]] = []
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(_read_text(source, name).split("\n"), start=1):
        if not line.strip():
            continue
        record, line_problems = _parse_line(line)
        problems += [(number, problem) for problem in line_problems]
        if record is not None:
            records.append((number, record))
    if not records and not problems:
        raise InputError([f"no prompts in {name}"])
    ids, id_problems = _resolve_ids(records)
    problems += id_problems
    has_targets = ["targets" in record for _, record in records]
    problems += [
        (records[index][0], problem)
        for index, problem in missing_targets(has_targets, [f"line {number}" for number, _ in records])
    ]
    faulty = {number for number, _ in problems}
    prompts = [
        Prompt(
            id=ids[number],
            line=number,
            prompt=record.get("prompt"),
            messages=record.get("messages"),
            extra={key: value for key, value in record.items() if key not in RESERVED},
            targets=tuple(record.get("targets", ())),
            completion=record.get("completion"),
            completion_ids=tuple(record.get("completion_ids", ())),
        )
        for number, record in records
        if number not in faulty
    ]
    problems += [(prompt.line, problem) for prompt, problem in prompt_problems(prompts, api)]
    if problems:
        problems.sort(key=lambda item: item[0])
        raise InputError([prefixed(f"line {number}", problem) for number, problem in problems], name)
    return prompts


def check_prompts(prompts: list[Prompt], api: str | None = None) -> None:
    """The pre-flight check of prompts handed to `extract_batch`, however they were made: InputError lists every
    problem. `read_prompts` runs the same check as it reads a file, so a file's prompts are checked twice (about
    2 s per 100,000 lines), which buys one guard at the batch's entry for every caller."""
    problems = prompt_problems(prompts, api)
    missing = missing_targets([bool(p.targets) for p in prompts], [where(p) for p in prompts])
    problems += [(prompts[index], problem) for index, problem in missing]
    if problems:
        position = {id(prompt): index for index, prompt in enumerate(prompts)}
        problems.sort(key=lambda item: position[id(item[0])])
        raise InputError([prefixed(where(prompt), problem) for prompt, problem in problems], "prompts")


def with_targets(prompts: Sequence[Prompt], targets: Sequence[str | int], source: str = "prompts") -> list[Prompt]:
    """The prompts, each asking for the same `targets` (token strings and/or ids, in order): one target set for a
    whole batch. InputError (under `source`, e.g. the input file's name) lists what is wrong with `targets` and
    every prompt that has targets of its own; nothing is changed then."""
    problems = [
        Worded("{targets}: {problem}", problem=problem)
        for problem in target_problems(targets, "the list", lambda index, target: f"target {index + 1} ({_shown(target)})")
    ]
    problems += [
        Worded(
            '{where}: has its own "targets", and one target set is given for every prompt ({targets}): give one or '
            "the other", where=where(prompt),
        )
        for prompt in prompts
        if prompt.targets
    ]
    if problems:
        raise InputError(problems, source)
    return [dataclasses.replace(prompt, targets=tuple(targets)) for prompt in prompts]


def _read_text(source: str | os.PathLike, name: str) -> str:
    """The whole input as text (a leading UTF-8 byte-order mark is dropped)."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as error:
        raise InputError([f"cannot read {name}: {error.strerror or error}"]) from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        bad = data[error.start]
        raise InputError([f"{name} is not UTF-8 text (line {line} has the byte 0x{bad:02x})"]) from None


def _parse_line(line: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The line's JSON object (None if it is not one) and its problems, without line numbers."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, [f"invalid JSON: {error.msg} (column {error.colno})"]
    except RecursionError:
        return None, ["JSON nested too deeply to read: flatten the line"]
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {KINDS[type(record)]}"]
    targets = target_problems(record["targets"]) if "targets" in record else []
    given = {key: record[key] for key in ("completion", "completion_ids") if key in record}
    completion = completion_problems(given, "messages" in record)
    return record, _content_problems(record) + _id_problems(record) + targets + completion


def content_problems(record: dict[str, Any]) -> list[str]:
    """What is wrong with a record's "prompt" or "messages", worded as the input check words it (empty: nothing)."""
    return _content_problems(record)


def _content_problems(record: dict[str, Any]) -> list[str]:
    if "prompt" in record and "messages" in record:
        return ['give either "prompt" or "messages", not both']
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            return [f'"prompt" must be a string, got {KINDS[type(prompt)]}']
        return [] if prompt.strip() else ['"prompt" is empty']
    if "messages" in record:
        return _messages_problems(record["messages"])
    return ['missing prompt: give "prompt" or "messages"']


def _messages_problems(messages: Any) -> list[str]:
    if not isinstance(messages, list):
        return [f'"messages" must be an array of messages, got {KINDS[type(messages)]}']
    if not messages:
        return ['"messages" is empty']
    problems = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(f'{where} must be an object with "role" and "content", got {KINDS[type(message)]}')
            continue
        if "role" not in message:
            problems.append(f'{where}: "role" is missing')
        elif not isinstance(message["role"], str):
            problems.append(f'{where}: "role" must be a string, got {KINDS[type(message["role"])]}')
        content = message.get("content")
        if "content" not in message:
            problems.append(f'{where}: "content" is missing')
        elif not isinstance(content, (str, list)):
            problems.append(f'{where}: "content" must be a string or an array of content parts, got {KINDS[type(content)]}')
        elif not (content.strip() if isinstance(content, str) else content):
            problems.append(f'{where}: "content" is empty')
        elif isinstance(content, list):
            problems += [f"{where}.content[{index}]: {problem}" for index, problem in _parts_problems(content)]
    return problems


def _parts_problems(parts: list[Any]) -> list[tuple[int, str]]:
    """Content parts as the chat API takes them: objects with a "type"; a "text" part needs its "text" string."""
    problems = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict):
            problems.append((index, f'a content part must be an object with "type", got {KINDS[type(part)]}'))
        elif not isinstance(part.get("type"), str):
            problems.append((index, 'a content part needs a "type" string, e.g. {"type": "text", "text": "..."}'))
        elif part["type"] == "text" and not isinstance(part.get("text"), str):
            problems.append((index, 'a "text" part needs a "text" string'))
    return problems


def _valid_id(record: dict[str, Any]) -> bool:
    value = record.get("id")
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and bool(value.strip()))


def _id_problems(record: dict[str, Any]) -> list[str]:
    if "id" not in record or _valid_id(record):
        return []
    value = record["id"]
    if isinstance(value, str):
        return ['"id" is empty']
    return [f'"id" must be an integer or a non-empty string, got {KINDS[type(value)]}']


def _resolve_ids(records: list[tuple[int, dict[str, Any]]]) -> tuple[dict[int, Any], list[tuple[int, str]]]:
    """Each line's id (given, or its line number) and the type-mixing and duplicate problems.

    Lines whose "id" is invalid get no id here (their problem is already reported).
    """
    given = [(number, record["id"]) for number, record in records if _valid_id(record)]
    id_type = type(given[0][1]) if given else int
    problems = []
    mixed = next(((number, value) for number, value in given if type(value) is not id_type), None)
    if mixed:
        number, value = mixed
        text = f"id {_show(value)} is {KINDS[type(value)]} but the id on line {given[0][0]} is {KINDS[id_type]}"
        problems.append((number, f"{text}; give all ids the same type"))
    ids: dict[int, Any] = dict(given)
    defaulted = {number for number, record in records if "id" not in record}
    ids.update((number, id_type(number)) for number in defaulted)
    first_line: dict[Any, int] = {}
    for number in sorted(ids):
        value = ids[number]
        if value not in first_line:
            first_line[value] = number
            continue
        other = first_line[value]
        hint = '; a line without "id" gets its line number' if {number, other} & defaulted else ""
        problems.append((number, f"duplicate id {_show(value)} (already used on line {other}{hint})"))
    return ids, problems


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _shown(value: Any) -> str:
    """A value as JSON where it is JSON, else as Python shows it."""
    try:
        return _show(value)
    except (TypeError, ValueError):
        return repr(value)
