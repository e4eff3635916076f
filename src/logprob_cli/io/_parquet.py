"""The Parquet output: one row per prompt (or per position of a completion) with its full next-token
log-probability vector, or its chosen tokens.

`output_schema` fixes the columns from the prompts, `write_parquet` streams rows into a
file that is replaced atomically, and `render_inspect` summarises a file for humans.
The run's description (model, vocabulary, endpoint, settings) is stored as JSON under
the file-level key b"logprob_cli".

When the prompts have targets (chosen tokens), a row holds a `targets` list (one struct per target, in the
order given: token_id, token, logprob or NULL, the proven upper bound where NULL, the precision where recovered) and
the visible top-k by-product (`top_ids`, `top_logprobs`); the full vector and its whole-vector diagnostics
only when asked for (`store_vector`). A target file reads with one line in each of:

    pandas.read_parquet("out.parquet").explode("targets")        # a row per target, each a dict
    polars.read_parquet("out.parquet").explode("targets").unnest("targets")
    duckdb.sql("select id, unnest(targets, recursive := true) from 'out.parquet'")

(the struct's `token_id` is named apart from the prompt's `id`, so flattening needs no prefix).

The compact form (`store_top` N, for distillation-sized jobs): instead of the vector, `top_ids` / `top_logprobs`
hold the N most likely recovered tokens, best first, and `rest_mass` = max(0, 1 - sum of their probabilities),
beside the scalar diagnostics (probability_sum, unrecovered_count, unrecovered_mass_bound) but not the lists of
unrecovered ids and bounds, which can be as long as the vector. With targets, N is how many top entries a row
keeps (instead of the calls' top-k) and `rest_mass` is added. `store_vector` keeps the whole vector beside either.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from rich import box
from rich.text import Text

from logprob_cli.endpoints import Prompt
from logprob_cli.methods import MethodResult
from logprob_cli.endpoints import Vocabulary, VocabularyError, load_vocabulary
from logprob_cli.wording import plural

METADATA_KEY = b"logprob_cli"
ROW_GROUP_ROWS = 32
JSON_FIELD = {b"encoding": b"json"}  # field metadata of an extra column holding JSON text
# deeper values are stored as JSON text: Parquet readers refuse schemas nested about 50 lists deep
MAX_TYPED_NESTING = 16

_HEAD = ("id", "prompt", "messages")
_TAIL = (
    "model",
    "method",
    "logprobs",
    "calls",
    "probability_sum",
    "unrecovered_count",
    "unrecovered_mass_bound",
    "unrecovered_ids",
    "unrecovered_upper_bounds",
    "precision_nats",
    "notes",
)
_TARGET_COLUMNS = ("targets", "top_ids", "top_logprobs", "rest_mass")
_POSITION_COLUMNS = ("position", "context_tokens", "next_token_id", "next_token_logprob")
_VECTOR_COLUMNS = ("logprobs", "unrecovered_ids", "unrecovered_upper_bounds")  # as long as the vector at worst
_VECTOR_SCALARS = ("probability_sum", "unrecovered_count", "unrecovered_mass_bound")  # with targets: only beside it
_COLUMNS = {name.lower(): name for name in _HEAD + _TAIL + _TARGET_COLUMNS + _POSITION_COLUMNS}
TARGET_TYPE = pa.struct([
    pa.field("token_id", pa.int32()),
    pa.field("token", pa.string()),
    pa.field("logprob", pa.float64()),
    pa.field("upper_bound", pa.float64()),
    pa.field("precision", pa.float64()),
])
POSITION_FIELDS = [
    pa.field("position", pa.int32()),
    pa.field("context_tokens", pa.list_(pa.int32())),
    pa.field("next_token_id", pa.int32()),
    pa.field("next_token_logprob", pa.float64()),
]
_DIAGNOSTIC_FIELDS = (  # after the vector, in this order
    pa.field("calls", pa.int64()),
    pa.field("probability_sum", pa.float64()),
    pa.field("unrecovered_count", pa.int64()),
    pa.field("unrecovered_mass_bound", pa.float64()),
    pa.field("unrecovered_ids", pa.list_(pa.int32())),
    pa.field("unrecovered_upper_bounds", pa.list_(pa.float32())),
    pa.field("precision_nats", pa.float64()),
    pa.field("notes", pa.list_(pa.string())),
)
DEFAULT_TOP_K = 20
MAX_TARGETS_SHOWN = 20  # per prompt, by `inspect`


@dataclass
class OutputRow:
    """One finished prompt: what was asked, by which model and method, at what cost, and the result.

    targets: (token id, token text) of each target, in the order given: its ids are `prompt.target_ids`
    (empty without targets). Their values come from `result` (its vector and upper_bounds).
    """

    prompt: Prompt
    model: str
    method: str
    calls: int
    result: MethodResult
    targets: tuple[tuple[int, str], ...] = ()


def output_schema(
    prompts: list[Prompt],
    vocab_size: int,
    store_vector: bool = False,
    top_k: int = DEFAULT_TOP_K,
    store_top: int | None = None,
) -> pa.Schema:
    """The file's columns: id, prompt, messages, the prompts' extra keys, then model, method, the vector and diagnostics.

    When the prompts have targets (`Prompt.targets` or `target_ids`), `targets` (list of TARGET_TYPE), `top_ids`
    and `top_logprobs` (the at most `store_top`, else `top_k`, largest recovered entries, best first) follow the
    method, and the vector and its whole-vector diagnostics are columns only when `store_vector`; `calls`,
    `precision_nats` and `notes` always are. Without targets, `store_top` N (1 or more) puts `top_ids`,
    `top_logprobs` and `rest_mass` in the vector's place (the vector too when `store_vector`), keeping the scalar
    diagnostics; with targets it adds `rest_mass`. Without targets and `store_top`, `store_vector` and `top_k`
    change nothing.
    When a prompt has a completion (every position of a text), a row is one position of one prompt:
    `position` (0: right after the prompt), `context_tokens` (the completion's token ids before it: the
    prompt's own tokens are not listed), `next_token_id` (the completion's token at this position, NULL after the
    last) and `next_token_logprob` (its logprob where the row recovered it, else NULL) follow the extra keys.
    Extra keys are the union over all prompts in first-seen order; each column's type is
    inferred from all values (NULL where absent), falling back to JSON text (field
    metadata {"encoding": "json"}) when no Parquet-storable type fits or the type nests
    deeper than MAX_TYPED_NESTING. Raises ValueError
    when an extra key collides with a column of the tool (`colliding_column`); the
    pre-flight check (preflight.prompt_problems) reports such keys before any call.
    """
    keys: dict[str, None] = {}  # an ordered set
    for prompt in prompts:
        for key in prompt.extra:
            column = colliding_column(key)
            if column is not None:
                raise ValueError(
                    f'the key "{key}" (line {prompt.line}) collides with the output column "{column}"; '
                    "rename it in the input"
                )
            keys[key] = None
    ints = all(isinstance(p.id, int) and not isinstance(p.id, bool) for p in prompts)
    fields = [
        pa.field("id", pa.int64() if ints else pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("messages", pa.string(), metadata=JSON_FIELD),
    ]
    fields += [_extra_field(key, [p.extra.get(key) for p in prompts]) for key in keys]
    if any(p.completion is not None or p.completion_ids or p.position is not None for p in prompts):
        fields += POSITION_FIELDS
    fields += [pa.field("model", pa.string()), pa.field("method", pa.string())]
    targets = any(p.targets or p.target_ids for p in prompts)
    fields += _top_fields(vocab_size, store_top or top_k, targets, store_top is not None)
    whole = store_vector or (not targets and store_top is None)
    tail = [pa.field("logprobs", pa.list_(pa.float32(), vocab_size)), *_DIAGNOSTIC_FIELDS]
    fields += [
        f for f in tail
        if whole or (f.name not in _VECTOR_COLUMNS and (f.name not in _VECTOR_SCALARS or not targets))
    ]
    return pa.schema(fields)


def _top_fields(vocab_size: int, top: int, targets: bool, compact: bool) -> list[pa.Field]:
    """`targets` (with targets), `top_ids` and `top_logprobs` (with targets or `compact`: their field metadata hold
    the vocabulary size and how many entries a row keeps, `top`) and `rest_mass` (when `compact`)."""
    if not (targets or compact):
        return []
    sizes = {b"vocab_size": str(vocab_size).encode(), b"top_k": str(top).encode()}
    fields = [pa.field("targets", pa.list_(TARGET_TYPE))] if targets else []
    fields += [pa.field("top_ids", pa.list_(pa.int32()), metadata=sizes), pa.field("top_logprobs", pa.list_(pa.float32()))]
    return fields + ([pa.field("rest_mass", pa.float64())] if compact else [])


def colliding_column(key: str) -> str | None:
    """The tool's own column that an extra key `key` would collide with (names compared ignoring case, as
    DuckDB does), or None."""
    return _COLUMNS.get(key.lower())


def _extra_field(key: str, values: list[Any]) -> pa.Field:
    try:
        inferred = pa.array(values).type
    except (pa.ArrowException, OverflowError, RecursionError):
        return pa.field(key, pa.string(), metadata=JSON_FIELD)
    if pa.types.is_null(inferred) or _too_deep(inferred) or _has_empty_struct(inferred):
        return pa.field(key, pa.string(), metadata=JSON_FIELD)
    return pa.field(key, inferred)


def _too_deep(type_: pa.DataType) -> bool:
    """Whether `type_` nests lists and structs more than MAX_TYPED_NESTING deep (walked without recursion)."""
    stack = [(type_, 0)]
    while stack:
        current, depth = stack.pop()
        if pa.types.is_struct(current):
            children = [field.type for field in current]
        elif pa.types.is_list(current) or pa.types.is_large_list(current):
            children = [current.value_type]
        else:
            continue
        if depth + 1 > MAX_TYPED_NESTING:
            return True
        stack += [(child, depth + 1) for child in children]
    return False


def _has_empty_struct(type_: pa.DataType) -> bool:
    """Parquet cannot store a struct without fields (what `{}` infers to)."""
    if pa.types.is_struct(type_):
        return type_.num_fields == 0 or any(_has_empty_struct(f.type) for f in type_)
    if pa.types.is_list(type_):
        return _has_empty_struct(type_.value_type)
    return False


def write_parquet(path: str | os.PathLike, schema: pa.Schema, rows: Iterable[OutputRow], metadata: dict) -> int:
    """Stream rows into `path` in row groups of at most 32; returns the number of rows.

    The file is written beside `path` under a temporary name and moved onto it with
    os.replace, so `path` is always the old or the new complete file; on error the
    temporary file is removed and `path` is untouched. Only a regular file is replaced:
    FileExistsError when `path` is a link, directory, device or FIFO. `metadata` is stored
    as JSON under the file-level key b"logprob_cli", with "store" added ("vector", or "top:N" for the compact
    form, `store_form`), and "targets": true and "store_vector" when the schema has targets.
    """
    path = Path(path)
    metadata = {**metadata, "store": store_form(schema)}
    if "targets" in schema.names:
        metadata = {**metadata, "targets": True, "store_vector": "logprobs" in schema.names}
    schema = schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: json.dumps(metadata).encode()})
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    written = 0
    try:
        with open(temp, "xb") as sink:
            with pq.ParquetWriter(sink, schema, compression="zstd", use_dictionary=_dictionary_columns(schema)) as writer:
                pending: list[OutputRow] = []
                for row in rows:
                    pending.append(row)
                    if len(pending) == ROW_GROUP_ROWS:
                        writer.write_batch(_batch(schema, pending))
                        written += len(pending)
                        pending = []
                if pending:
                    writer.write_batch(_batch(schema, pending))
                    written += len(pending)
            sink.flush()
            os.fsync(sink.fileno())
        if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} is not a regular file; it was left as it is")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return written


def store_form(schema: pa.Schema) -> str:
    """How a file stores each row's distribution: "top:N" (the compact form: the N most likely tokens and
    `rest_mass`) or "vector"."""
    if "rest_mass" in schema.names:
        return f"top:{int(schema.field('top_ids').metadata[b'top_k'])}"
    return "vector"


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Every column but the vectors and their bounds, where a dictionary is only overhead."""
    dense = {"logprobs", "unrecovered_ids", "unrecovered_upper_bounds", "top_ids", "top_logprobs"}
    return [name for name in schema.names if name not in dense]


def _batch(schema: pa.Schema, rows: list[OutputRow]) -> pa.RecordBatch:
    vocab_size = _vocab_size(schema)
    for row in rows:
        if row.result.logprobs.shape != (vocab_size,):
            raise ValueError(
                f"prompt {row.prompt.id!r}: the vector has shape {row.result.logprobs.shape}, "
                f"expected ({vocab_size},) for this file's vocabulary"
            )
    columns = prompt_columns(schema, [r.prompt for r in rows])
    columns |= {
        "model": pa.array([r.model for r in rows], pa.string()),
        "method": pa.array([r.method for r in rows], pa.string()),
        "calls": pa.array([r.calls for r in rows], pa.int64()),
        "precision_nats": pa.array([r.result.precision for r in rows], pa.float64()),
        "notes": pa.array([list(r.result.notes) for r in rows], pa.list_(pa.string())),
    }
    if "position" in schema.names:
        columns |= _position_columns(rows)
    if "targets" in schema.names:
        columns["targets"] = pa.array([_targets(row) for row in rows], pa.list_(TARGET_TYPE))
    if "top_ids" in schema.names:
        columns |= _top_columns(rows, int(schema.field("top_ids").metadata[b"top_k"]))
    if "logprobs" in schema.names:
        columns["logprobs"] = _vectors([r.result.logprobs for r in rows], vocab_size)
    columns |= _diagnostic_columns(rows, [name for name in (*_VECTOR_COLUMNS, *_VECTOR_SCALARS) if name in schema.names])
    return pa.RecordBatch.from_arrays([columns[field.name] for field in schema], schema=schema)


def _vocab_size(schema: pa.Schema) -> int:
    if "logprobs" in schema.names:
        return schema.field("logprobs").type.list_size
    return int(schema.field("top_ids").metadata[b"vocab_size"])


def _diagnostic_columns(rows: list[OutputRow], names: list[str]) -> dict[str, pa.Array]:
    """What is known about each vector as a whole, the columns named by `names` only."""
    made = {
        "probability_sum": lambda: pa.array([r.result.probability_sum() for r in rows], pa.float64()),
        "unrecovered_count": lambda: pa.array([r.result.unrecovered_ids.size for r in rows], pa.int64()),
        "unrecovered_mass_bound": lambda: pa.array([r.result.unrecovered_mass_bound() for r in rows], pa.float64()),
        "unrecovered_ids": lambda: _lists([r.result.unrecovered_ids for r in rows], np.int32),
        "unrecovered_upper_bounds": lambda: _lists([_bounds(r.result) for r in rows], np.float32),
    }
    return {name: made[name]() for name in names if name in made}


def _position_columns(rows: list[OutputRow]) -> dict[str, pa.Array]:
    """Each row's position, context tokens, next completion token and that token's logprob where recovered."""
    nexts = [next_token(row.prompt) for row in rows]
    logprobs = [
        None if token is None or math.isnan(value := float(np.float32(row.result.logprobs[token]))) else value
        for row, token in zip(rows, nexts)
    ]
    return {
        "position": pa.array([row.prompt.position for row in rows], pa.int32()),
        "context_tokens": pa.array([list(row.prompt.context_ids) for row in rows], pa.list_(pa.int32())),
        "next_token_id": pa.array(nexts, pa.int32()),
        "next_token_logprob": pa.array(logprobs, pa.float64()),
    }


def next_token(prompt: Prompt) -> int | None:
    """A position's next completion token: the completion's token at `position`, None after the last one (and
    for a prompt that is not a position)."""
    if prompt.position is None or prompt.position >= len(prompt.completion_ids):
        return None
    return prompt.completion_ids[prompt.position]


def _top_columns(rows: list[OutputRow], top: int) -> dict[str, pa.Array]:
    """Each row's `top` largest recovered entries, best first, as float32, and `rest_mass`: 1 - the sum of their
    probabilities, in float64 from the float32 values stored, summed exactly rounded (`math.fsum`, so a reader on
    any machine recomputes the same number; numpy's pairwise sum differs in the last bits across CPUs), clamped at 0."""
    tops = [_top_ids(r.result.logprobs, top) if top > 0 else np.empty(0, np.int64) for r in rows]
    values = [r.result.logprobs[ids].astype(np.float32) for r, ids in zip(rows, tops)]
    rest = [max(0.0, 1.0 - math.fsum(np.exp(v.astype(np.float64)).tolist())) for v in values]
    return {
        "top_ids": _lists(tops, np.int32),
        "top_logprobs": _lists(values, np.float32),
        "rest_mass": pa.array(rest, pa.float64()),
    }


def _targets(row: OutputRow) -> list[dict[str, Any]]:
    """One struct per target: its logprob where recovered (float32 widened exactly) with the method's precision,
    else NULL with the bound the answers prove (NULL where none is known)."""
    vector, found = row.result.logprobs, []
    if tuple(token_id for token_id, _ in row.targets) != tuple(row.prompt.target_ids):
        raise ValueError(f"prompt {row.prompt.id!r}: the row's targets are not the prompt's resolved target_ids")
    for token_id, token in row.targets:
        if not 0 <= token_id < vector.size:
            raise ValueError(f"prompt {row.prompt.id!r}: target id {token_id} is outside the vocabulary ({vector.size:,})")
        logprob, bound, precision = row.result.reading(token_id)
        found.append({
            "token_id": token_id,
            "token": token,
            "logprob": None if logprob is None else float(np.float32(logprob)),
            "upper_bound": bound,
            "precision": precision,
        })
    return found


def prompt_columns(schema: pa.Schema, prompts: list[Prompt]) -> dict[str, pa.Array]:
    """The columns that come from the prompts themselves (id, prompt, messages, extra keys), typed by `schema`.

    Raises what pyarrow raises for a value the column cannot hold (pa.ArrowException,
    OverflowError, UnicodeEncodeError, TypeError, ValueError): the pre-flight check runs
    this on every prompt so that no such value is found after the calls are paid.
    """
    id_type = schema.field("id").type
    columns: dict[str, pa.Array] = {
        "id": pa.array([p.id if id_type == pa.int64() else str(p.id) for p in prompts], id_type),
        "prompt": pa.array([p.prompt for p in prompts], pa.string()),
        "messages": pa.array(
            [None if p.messages is None else json.dumps(p.messages, ensure_ascii=False) for p in prompts],
            pa.string(),
        ),
    }
    tool_columns = set(_HEAD + _TAIL + _TARGET_COLUMNS + _POSITION_COLUMNS)
    for field in schema:
        if field.name in tool_columns:
            continue
        values = [p.extra.get(field.name) for p in prompts]
        if field.metadata == JSON_FIELD:
            values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
        columns[field.name] = pa.array(values, field.type)
    return columns


def _bounds(result: MethodResult) -> np.ndarray:
    """The upper bound of each unrecovered token, in the order of unrecovered_ids (NaN where unknown)."""
    return np.array([result.upper_bounds.get(int(i), math.nan) for i in result.unrecovered_ids], dtype=np.float64)


def _vectors(vectors: list[np.ndarray], vocab_size: int) -> pa.FixedSizeListArray:
    flat = np.concatenate(vectors).astype(np.float32)
    values = pa.array(flat, pa.float32(), mask=np.isnan(flat))
    return pa.FixedSizeListArray.from_arrays(values, vocab_size)


def _lists(items: list[np.ndarray], dtype: type) -> pa.ListArray:
    """A list column from numpy arrays; NaN becomes NULL."""
    offsets = np.zeros(len(items) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(item) for item in items])
    flat = np.concatenate(items).astype(dtype)
    mask = np.isnan(flat) if np.issubdtype(flat.dtype, np.floating) else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, mask=mask))


def read_metadata(path: str | os.PathLike) -> dict:
    """The run description stored by `write_parquet`; ValueError if the file is not such a file."""
    return _open(path)[1]


def _open(path: str | os.PathLike) -> tuple[pq.ParquetFile, dict]:
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory: give a Parquet file written by `logprobs extract`")
    try:
        file = pq.ParquetFile(path, pre_buffer=False)  # with pre-buffering, iter_batches' memory grows batch by batch
    except pa.ArrowException as error:
        raise ValueError(f"{path} is not a Parquet file ({error})") from None
    except OSError as error:  # no such file, no read permission
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    raw = (file.schema_arrow.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} has no logprob_cli metadata: it was not written by `logprobs extract`")
    try:
        return file, json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} has unreadable logprob_cli metadata ({error})") from None


def token_text(metadata: dict) -> Callable[[int], str]:
    """A function giving a token id's readable text (repr-quoted) in the file's vocabulary where that vocabulary can
    be had on this machine without the network (`local_vocabulary`), else (and for ids it has no bytes for) "#id"."""
    vocabulary = local_vocabulary(metadata.get("vocabulary", {}).get("name") or "")
    if vocabulary is None:
        return lambda token_id: f"#{token_id}"
    return lambda token_id: (
        f"#{token_id}" if vocabulary.token_bytes(token_id) is None else repr(vocabulary.text(token_id))
    )


def local_vocabulary(name: str) -> Vocabulary | None:
    """The vocabulary a run recorded by `name`, where it is the simulator's or a tokenizer file or model folder on
    this machine (--tokenizer PATH, --model hf:PATH); None for the rest (a server's ids, a tiktoken encoding,
    which could mean a download) and for a file that no longer loads."""
    if name != "simulator" and not name.startswith("simulator:"):
        name = name.removeprefix("hf:")
        if not name or not os.path.exists(name):
            return None
    try:
        return load_vocabulary(name)
    except (VocabularyError, OSError, ValueError):
        return None


def render_inspect(path: str | os.PathLike, console: Console, top: int = 5) -> None:
    """Print the run header and a table with one row per prompt: top tokens, entropy, diagnostics.

    The header names the method that ran (the rows' `method` column; "X (chosen by auto)" when
    the run asked for auto). The table fits 80 columns: the top tokens share one cell, one a line;
    long ids and token texts are cut short; a row of a completion's position is named "id @position". A target
    file shows each target instead (at most
    MAX_TARGETS_SHOWN a prompt): its token, its logprob (or "< bound" where it was not recovered) and
    its precision. Reads the file in batches so memory does not grow with its size. Raises
    ValueError if the path is not a readable Parquet file with logprob_cli metadata.
    """
    file, metadata = _open(path)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", min_width=4, max_width=12, overflow="ellipsis", no_wrap=True)
    if "targets" in file.schema_arrow.names:
        ran = _target_rows(file, table)
        legend = "logprob in nats (< b: not recovered, at most b; ?: no bound known); ±nats: its precision"
    elif "logprobs" not in file.schema_arrow.names and "rest_mass" in file.schema_arrow.names:
        ran = _compact_rows(file, table, token_text(metadata), top)
        legend = (f"top: token and probability ({store_form(file.schema_arrow)}: the file keeps each row's most likely "
                  "tokens); rest: the probability beyond them; p sum: probability recovered; unrec.: tokens not recovered")
    else:
        ran = _vector_rows(file, table, token_text(metadata), top)
        legend = ("top: token and probability; entropy, ±nats (precision) in nats; p sum: probability recovered; "
                  "unrec.: tokens not recovered")
    vocabulary = metadata.get("vocabulary", {})
    size = vocabulary.get("size")
    model = metadata.get("model") or metadata.get("endpoint", {}).get("model", "?")
    console.print(
        f"{path}: {plural(file.metadata.num_rows, 'row')}, model {model}, vocabulary {vocabulary.get('name', '?')}"
        + (f" ({size:,} tokens)" if isinstance(size, int) else ""),
        highlight=False,
    )
    asked = metadata.get("settings", {}).get("method")
    console.print(f"method: {_method_that_ran(asked, ran, metadata.get('method'))}", highlight=False)
    console.print(table)
    console.print(legend, highlight=False, style="dim")


def _vector_rows(file: pq.ParquetFile, table: Table, text: Callable[[int], str], top: int) -> list[str]:
    """Fill `table` with each prompt's top tokens, entropy and diagnostics; the methods that ran."""
    table.add_column(f"top {top}", no_wrap=True, overflow="ellipsis")
    for name, width in (("entropy", 7), ("p sum", 8), ("unrec.", 6), ("calls", 5), ("±nats", 7)):
        table.add_column(name, justify="right", no_wrap=True, min_width=width)
    ran: dict[str, None] = {}
    scalars = ["id", *_position_column(file), "method", "probability_sum", "unrecovered_count", "calls", "precision_nats"]
    for batch in file.iter_batches(batch_size=ROW_GROUP_ROWS, columns=["logprobs", *scalars]):
        vocab_size = batch.schema.field("logprobs").type.list_size
        vectors = batch.column("logprobs").flatten().to_numpy(zero_copy_only=False).reshape(-1, vocab_size)
        for row, vector in zip(batch.select(scalars).to_pylist(), vectors):
            ran[row["method"]] = None
            lp = vector.astype(np.float64)
            tops = (f"{_short(text(int(i)))} {math.exp(lp[i]):.2g}" for i in _top_ids(lp, top))
            table.add_row(Text(_row_label(row)), Text("\n".join(tops)), f"{_entropy(lp):.4f}", *_diagnostics(row))
    return list(ran)


def _compact_rows(file: pq.ParquetFile, table: Table, text: Callable[[int], str], top: int) -> list[str]:
    """Fill `table` from a top:N file: each row's first `top` stored tokens, its rest mass and diagnostics; the
    methods that ran."""
    table.add_column(f"top {top}", no_wrap=True, overflow="ellipsis")
    for name, width in (("rest", 7), ("p sum", 8), ("unrec.", 6), ("calls", 5), ("±nats", 7)):
        table.add_column(name, justify="right", no_wrap=True, min_width=width)
    ran: dict[str, None] = {}
    columns = ["id", *_position_column(file), "method", "top_ids", "top_logprobs", "rest_mass", "probability_sum",
               "unrecovered_count", "calls", "precision_nats"]
    for batch in file.iter_batches(batch_size=ROW_GROUP_ROWS, columns=columns):
        for row in batch.to_pylist():
            ran[row["method"]] = None
            tops = (f"{_short(text(i))} {math.exp(lp):.2g}" for i, lp in zip(row["top_ids"][:top], row["top_logprobs"]))
            table.add_row(Text(_row_label(row)), Text("\n".join(tops)), f"{row['rest_mass']:.2g}", *_diagnostics(row))
    return list(ran)


def _diagnostics(row: dict[str, Any]) -> tuple[str, ...]:
    """The last cells of an `inspect` row: probability sum, unrecovered tokens, calls, precision."""
    return (
        f"{row['probability_sum']:.6f}", f"{row['unrecovered_count']:,}", f"{row['calls']:,}",
        f"{row['precision_nats']:.2g}",
    )


def _target_rows(file: pq.ParquetFile, table: Table) -> list[str]:
    """Fill `table` with each prompt's targets (token, logprob or "< bound", precision) and calls; the methods
    that ran."""
    table.add_column("token", no_wrap=True, overflow="ellipsis")
    for name, width in (("logprob", 9), ("±nats", 7), ("calls", 5)):
        table.add_column(name, justify="right", no_wrap=True, min_width=width)
    ran: dict[str, None] = {}
    columns = ["id", *_position_column(file), "method", "targets", "calls"]
    for batch in file.iter_batches(batch_size=ROW_GROUP_ROWS, columns=columns):
        for row in batch.to_pylist():
            ran[row["method"]] = None
            targets = row["targets"] or []
            shown = targets[:MAX_TARGETS_SHOWN]
            tokens = [_short(repr(t["token"]), 16) for t in shown]
            if len(targets) > len(shown):
                tokens.append(f"… {len(targets) - len(shown)} more")
            table.add_row(
                Text(_row_label(row)),
                Text("\n".join(tokens)),
                "\n".join(_target_logprob(t) for t in shown),
                "\n".join("" if t["precision"] is None else f"{t['precision']:.2g}" for t in shown),
                f"{row['calls']:,}",
            )
    return list(ran)


def _position_column(file: pq.ParquetFile) -> list[str]:
    """["position"] for a file of positions, else []."""
    return ["position"] if "position" in file.schema_arrow.names else []


def _row_label(row: dict[str, Any]) -> str:
    """How `inspect` names a row: its id, and for a position of a completion "id @position"."""
    return str(row["id"]) if row.get("position") is None else f"{row['id']} @{row['position']}"


def _target_logprob(target: dict[str, Any]) -> str:
    """A target's logprob, or "< bound" where it was not recovered ("< ?" where no bound is known)."""
    if target["logprob"] is not None:
        return f"{target['logprob']:.4f}"
    return "< ?" if target["upper_bound"] is None else f"< {target['upper_bound']:.4f}"


def _method_that_ran(asked: str | None, ran: list[str], recorded: str | None = None) -> str:
    """The rows' method(s), else the one the metadata records (files from 0.2.0 and earlier record none: the
    asked method), saying when auto chose it."""
    if not ran and not recorded:
        return f"{asked or '?'} (no rows)"
    shown = ", ".join(ran) or f"{recorded} (no rows)"
    return f"{shown} (chosen by auto)" if asked == "auto" else shown


def _short(token: str, width: int = 12) -> str:
    """A token's text cut to `width` characters with an ellipsis."""
    return token if len(token) <= width else token[: width - 1] + "…"


def _top_ids(logprobs: np.ndarray, top: int) -> np.ndarray:
    """The ids of the `top` most likely recovered tokens, best first."""
    ids = np.flatnonzero(~np.isnan(logprobs))
    if ids.size > top:
        ids = ids[np.argpartition(-logprobs[ids], top - 1)[:top]]
    return ids[np.lexsort((ids, -logprobs[ids]))]


def _entropy(logprobs: np.ndarray) -> float:
    """-sum p log p over the recovered tokens, in float64 (a -inf logprob adds 0)."""
    lp = logprobs[np.isfinite(logprobs)]
    return float(-(np.exp(lp) * lp).sum())
