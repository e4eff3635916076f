"""The pre-flight check of prompts: whatever about a prompt would fail after calls are paid, found before any call.

A prompt that parses can still fail later: text that is not valid Unicode (a lone surrogate)
cannot be encoded for the HTTP body or the checkpoint key; NaN or Infinity is not JSON; an
integer id beyond 64 bits, an extra key named like one of the tool's columns, or any value
the Parquet writer refuses would crash the output after the whole run; chat `messages`
cannot go to the legacy completions API. `prompt_problems` finds them all, each with the
prompt it belongs to, by checking every value and by building the output schema and
converting every prompt's columns as the writer will, then writing them to Parquet in
memory and opening that (a dry run).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from logprob_cli.endpoints import Prompt
from logprob_cli.errors import Worded
from logprob_cli.io._parquet import colliding_column, output_schema, prompt_columns

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TARGETS = 1000  # chosen tokens per prompt
TOKEN_ID_LIMIT = 2**31  # the output stores token ids as int32
MAX_COMPLETION_TOKENS = 100_000  # a completion's tokens: each is a unit of work and an output row
CHAT_COMPLETION = (
    'a completion needs a plain "prompt": exact positions cannot be guaranteed through a chat template here, so '
    'give the prompt as text (with the completions API on a server)'
)
# what building the schema, converting a column or writing and reading it raises for a value it cannot hold
STORE_ERRORS = (pa.ArrowException, OSError, OverflowError, UnicodeError, TypeError, ValueError)


def prompt_problems(prompts: list[Prompt], api: str | None = None) -> list[tuple[Prompt, str]]:
    """Every problem of `prompts` that would surface only after calls, as (prompt, problem) in input order.

    `api` is the API the prompts will be sent to ("chat", "completions", or None when
    it does not matter, as on the built-in simulator).
    """
    problems: list[tuple[Prompt, str]] = []
    clean: list[Prompt] = []
    safe_keys: set[str] = set()
    for prompt in prompts:
        found = _value_problems(prompt) + _collisions(prompt, safe_keys)
        if prompt.targets:
            found += target_problems(prompt.targets)
        found += completion_problems(given_completion(prompt), prompt.messages is not None)
        if api == "completions" and prompt.messages is not None:
            found.append(Worded('"messages" needs the chat API: run with {api_chat} (legacy completions take "prompt" only)'))
        problems += [(prompt, problem) for problem in found]
        if not found:
            clean.append(prompt)
    return problems + _storage_problems(clean)


def target_problems(targets: Any, name: str = '"targets"', label: Callable[[int, Any], str] | None = None) -> list[str]:
    """What is wrong with a target list, one problem per bad item (empty: nothing).

    A target list is a non-empty array (list or tuple) of at most MAX_TARGETS items, each a non-empty token
    string (valid Unicode) or a token id (an integer from 0 below 2**31, not a boolean), none given twice.
    The list is named `name`, an item by `label(index, item)` (default `name[index]`). Whether a string is one
    token of the vocabulary and an id one of its ids is the run layer's check (it holds the vocabulary).
    """
    label = label or (lambda index, target: f"{name}[{index}]")
    if not isinstance(targets, (list, tuple)):
        return [f"{name} must be an array of token strings or token ids, got {_kind(targets)}"]
    if not targets:
        return [f"{name} is empty: give at least one token, or leave it out for the whole vector"]
    if len(targets) > MAX_TARGETS:
        return [f"{name} holds {len(targets):,} tokens; at most {MAX_TARGETS:,} are allowed"]
    problems = []
    first: dict[tuple[type, Any], int] = {}
    for index, target in enumerate(targets):
        problem = _target_problem(target)
        if problem is None and (type(target), target) in first:
            earlier = first[type(target), target]
            problem = f"is given twice (also {label(earlier, target)})"
        if problem is not None:
            problems.append(f"{label(index, target)} {problem}")
        else:
            first[type(target), target] = index
    return problems


def completion_problems(given: dict[str, Any], chat: bool) -> list[str]:
    """What is wrong with a prompt's completion (empty: nothing). `given` holds the keys the prompt gives of
    "completion" (a non-empty text, valid Unicode) and "completion_ids" (a non-empty array of at most
    MAX_COMPLETION_TOKENS token ids, each an integer from 0 below 2**31); one or the other, and with a plain
    prompt only (`chat`: the prompt is chat messages). Whether the ids lie in the vocabulary, and how the text
    splits into tokens, is the run layer's check (it holds the vocabulary)."""
    if not given:
        return []
    if len(given) > 1:
        return ['give either "completion" or "completion_ids", not both']
    problems = [CHAT_COMPLETION] if chat else []
    if "completion" in given:
        text = given["completion"]
        if not isinstance(text, str):
            return problems + [f'"completion" must be a string, got {_kind(text)}']
        if not text:
            return problems + ['"completion" is empty: give at least one character, or leave it out']
        if not _encodable(text):
            problems.append('"completion" is text that is not valid Unicode (a lone surrogate such as \\ud800)')
        return problems
    ids = given["completion_ids"]
    if not isinstance(ids, (list, tuple)):
        return problems + [f'"completion_ids" must be an array of token ids, got {_kind(ids)}']
    if not ids:
        return problems + ['"completion_ids" is empty: give at least one token id, or leave it out']
    if len(ids) > MAX_COMPLETION_TOKENS:
        return problems + [f'"completion_ids" holds {len(ids):,} tokens; at most {MAX_COMPLETION_TOKENS:,} are allowed']
    bad = next((index for index, i in enumerate(ids) if isinstance(i, bool) or not isinstance(i, int)
                or not 0 <= i < TOKEN_ID_LIMIT), None)
    if bad is not None:
        problems.append(f'"completion_ids"[{bad}] must be a token id (an integer from 0 to {TOKEN_ID_LIMIT - 1:,}), '
                        f"got {json.dumps(ids[bad]) if isinstance(ids[bad], (int, float, str)) else _kind(ids[bad])}")
    return problems


def given_completion(prompt: Prompt) -> dict[str, Any]:
    """The completion keys a Prompt gives, as `completion_problems` takes them."""
    given: dict[str, Any] = {} if prompt.completion is None else {"completion": prompt.completion}
    return given | ({"completion_ids": prompt.completion_ids} if prompt.completion_ids else {})


def _target_problem(target: Any) -> str | None:
    """Why one target is neither a token string nor a token id, or None."""
    if isinstance(target, str):
        if not target:
            return "is an empty string: a token has at least one character"
        return None if _encodable(target) else "is text that is not valid Unicode (a lone surrogate such as \\ud800)"
    if isinstance(target, int) and not isinstance(target, bool):
        if 0 <= target < TOKEN_ID_LIMIT:
            return None
        return f"is {target}: token ids are integers from 0 to {TOKEN_ID_LIMIT - 1:,}"
    return f"must be a token string or a token id (an integer from 0), got {_kind(target)}"


def missing_targets(has_targets: list[bool], names: list[str]) -> list[tuple[int, str]]:
    """(index, problem) for each item without targets when another has them: one input asks for targets on
    every prompt or on none. `names[i]` names item i ("line 3", "prompt 'a'")."""
    first = next((index for index, has in enumerate(has_targets) if has), None)
    if first is None:
        return []
    problem = Worded(
        "no targets, but {other} has them: give targets on every line, or one target set for every prompt "
        "({targets})", other=names[first],
    )
    return [(index, problem) for index, has in enumerate(has_targets) if not has]


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", tuple: "an array", str: "a string", bool: "a boolean",
             int: "an integer", float: "a decimal number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def where(prompt: Prompt) -> str:
    """How a problem names its prompt: its line, or its id for prompts not read from a file."""
    return f"line {prompt.line}" if prompt.line else f"prompt {prompt.id!r}"


def _fields(prompt: Prompt) -> Iterator[tuple[str, Any]]:
    """(how a problem names the field, its value) for the id, the content and every extra key."""
    yield '"id"', prompt.id
    if prompt.prompt is not None:
        yield '"prompt"', prompt.prompt
    if prompt.messages is not None:
        yield '"messages"', prompt.messages
    for key, value in prompt.extra.items():
        yield json.dumps(key), value  # ASCII-escaped: a key that is not valid Unicode still prints


def _value_problems(prompt: Prompt) -> list[str]:
    """Text that is not valid Unicode, NaN/Infinity or other values JSON cannot hold (at most one problem a
    field), an id beyond 64 bits. One C-speed encoding of the whole prompt clears the usual, clean case."""
    problems = []
    error = _json_error(prompt)
    if error is not None:
        problems += [
            f"the key {json.dumps(key)} is text that is not valid Unicode (a lone surrogate such as \\ud800)"
            for key in prompt.extra
            if not _encodable(key)
        ]
        problems += [f"{name} {problem}" for name, value in _fields(prompt) if (problem := _first_bad_value(value))]
        problems = problems or [f"a value cannot be written as JSON ({error})"]
    if isinstance(prompt.id, int) and not isinstance(prompt.id, bool) and not INT64_MIN <= prompt.id <= INT64_MAX:
        problems.append(f'"id" {prompt.id} does not fit in a 64-bit integer: give ids as strings')
    return problems


def _json_error(prompt: Prompt) -> str | None:
    """Why the prompt cannot be encoded as strict JSON in UTF-8 (as requests and checkpoint keys are), or None."""
    try:
        json.dumps([prompt.id, prompt.prompt, prompt.messages, prompt.extra], ensure_ascii=False, allow_nan=False).encode()
    except RecursionError:
        return "a value is nested too deeply"
    except (ValueError, TypeError) as error:  # UnicodeEncodeError is a ValueError
        return f"{type(error).__name__}: {error}"
    return None


def _first_bad_value(value: Any) -> str | None:
    """What is wrong with the first bad value inside `value` (walked without recursion), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and not _encodable(item):
            return "holds text that is not valid Unicode (a lone surrogate such as \\ud800): it can be neither sent nor stored"
        if isinstance(item, float) and not math.isfinite(item):
            return f"holds {json.dumps(item)}, which JSON does not allow: write null or a string"
        if isinstance(item, dict):
            bad_key = next((key for key in item if not isinstance(key, str) or not _encodable(key)), None)
            if bad_key is not None:
                return f"has the key {bad_key!r}, which is not valid Unicode text"
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _collisions(prompt: Prompt, safe_keys: set[str]) -> list[str]:
    """The prompt's extra keys named like an output column; `safe_keys` caches the keys found not to be."""
    problems = []
    for key in prompt.extra:
        if key in safe_keys:
            continue
        column = colliding_column(key)
        if column is None:
            safe_keys.add(key)
        else:
            problems.append(
                f'the key "{key}" collides with the output column "{column}" (names compared ignoring case, as in '
                "DuckDB): rename it"
            )
    return problems


def _storage_problems(prompts: list[Prompt]) -> list[tuple[Prompt, str]]:
    """A dry run of the Parquet writer's conversion of the prompts' own columns; on failure, each prompt alone."""
    if not prompts or _store_error(prompts) is None:
        return []
    try:
        schema: pa.Schema | None = output_schema(prompts, 1)
    except (*STORE_ERRORS, RecursionError):
        schema = None
    problems = [
        (prompt, f"cannot be stored in the Parquet output ({error})")
        for prompt in prompts
        if (error := _store_error([prompt], schema)) is not None
    ]
    if not problems:  # only the prompts together fail: name the first and say so
        problems = [(prompts[0], f"the prompts' columns cannot be stored together in Parquet ({_store_error(prompts)})")]
    return problems


def _store_error(prompts: list[Prompt], schema: pa.Schema | None = None) -> str | None:
    """Why the prompts' own columns cannot be written to Parquet and read back (in memory), or None."""
    try:
        table = pa.table(prompt_columns(schema or output_schema(prompts, 1), prompts))
        sink = io.BytesIO()
        pq.write_table(table, sink)
        pq.ParquetFile(io.BytesIO(sink.getvalue())).schema_arrow
    except RecursionError:
        return "a value is nested too deeply: flatten it"
    except STORE_ERRORS as error:
        return f"{type(error).__name__}: {error}"
    return None
