"""Two outputs of `logprobs extract` compared prompt by prompt: does this endpoint serve the weights it claims?

`compare_files(a, b)` joins the rows of two files by `id` and measures, per prompt, how far the two
next-token distributions are apart. Rows on one side only are counted and listed, never dropped silently.

The measures, in nats and computed in float64 over C, the tokens both files recovered (NULL on either side
is left out). Let p, q be the two distributions restricted to C and renormalized over it (p_i =
exp(a_i) / sum_C exp(a_j), likewise q), so that a normalizer offset (every logprob of a vector shifted alike)
costs nothing:

  KL(A||B) = sum_C p_i (log p_i - log q_i), and KL(B||A) alike; inf where some p_i > 0 has q_i = 0
  total variation = 1/2 sum_C |p_i - q_i|
  max |diff| = the largest |a_i - b_i| over i in C with exp(a_i) > floor or exp(b_i) > floor (the raw logprobs
  as stored), with the token where it occurs
  top-1 = whether the most likely recovered token of A is that of B

Coverage is sum_C exp(a_i) (and sum_C exp(b_i)): the share of each side's whole distribution that C holds.
Where either is below FULL_COVERAGE, the comparison is partial: the measures are those of the distributions
conditioned on C, not of the whole ones, and say so (`partial`).

The files are read in batches of ROW_GROUP_ROWS rows, so memory holds a batch of each side, not a file. Rows
of B are looked up by their place in B: fast when both files list the ids in the same order (two runs of the
same prompts file), correct in any order (a batch of B is then read again when needed).

A compact file (`store` top:N) holds each row's N most likely tokens only: it is read as a vector recovered on
those N and NULL elsewhere, so the measures are over the top tokens both files hold, partial wherever these cover
less than FULL_COVERAGE (the rest mass of the file), and top-1 is exact. Files of positions (a `position` column)
are joined by (id, position), and a position's context must be the same in both.

`render_comparison` prints it for people (the `logprobs compare` table); `Comparison.to_dict` is its JSON.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from logprob_cli.errors import LogprobError
from logprob_cli.io._parquet import ROW_GROUP_ROWS, read_metadata, store_form, token_text
from logprob_cli.wording import plural

DEFAULT_FLOOR = 1e-4
FULL_COVERAGE = 0.999  # a side covered below this share of its mass makes the comparison partial
MEASURES = ("kl_ab", "kl_ba", "total_variation", "max_abs_diff")


class CompareError(LogprobError, ValueError):
    """Two files that cannot be compared: not outputs of `logprobs extract`, other vocabularies, no common id,
    positions against none, another context at a position."""


@dataclass(frozen=True)
class PromptComparison:
    """The measures for one id (see the module docstring). KL and total variation are None when the files have
    no common token with mass on both sides, max_abs_diff and its token when no common token is above the
    floor, top1_* when a side recovered no token."""

    id: Any
    kl_ab: float | None
    kl_ba: float | None
    total_variation: float | None
    max_abs_diff: float | None
    max_diff_token: int | None
    top1_a: int | None
    top1_b: int | None
    top1_agree: bool
    covered_a: float
    covered_b: float
    partial: bool
    tokens_compared: int
    position: int | None = None  # in files of positions


@dataclass
class Comparison:
    """Everything `compare_files` found: the files, the per-prompt measures in A's row order, the ids on one side
    only, and notes a reader must see (vocabularies compared by size only)."""

    a: str
    b: str
    vocab_size: int
    floor: float
    prompts: list[PromptComparison] = field(default_factory=list)
    only_in_a: list[Any] = field(default_factory=list)  # ids, or {"id", "position"} in files of positions
    only_in_b: list[Any] = field(default_factory=list)
    models: tuple[str, str] = ("?", "?")
    vocabulary: str | None = None  # A's vocabulary name, for token texts
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Mean and max of each measure over the compared prompts (None where no prompt has it), the top-1
        agreement rate, and the number of partial comparisons."""
        result: dict[str, Any] = {"prompts": len(self.prompts)}
        for name in MEASURES:
            values = [getattr(p, name) for p in self.prompts if getattr(p, name) is not None]
            result[name] = {"mean": float(np.mean(values)) if values else None, "max": max(values, default=None)}
        agree = [p.top1_agree for p in self.prompts]
        result["top1_agreement"] = sum(agree) / len(agree) if agree else None
        result["partial"] = sum(p.partial for p in self.prompts)
        return result

    def to_dict(self) -> dict[str, Any]:
        """The whole comparison as JSON-ready values; an infinite KL is the string "inf" (JSON has no infinity)."""
        return _json_ready({
            "a": self.a, "b": self.b, "models": list(self.models), "vocabulary": self.vocabulary,
            "vocab_size": self.vocab_size,
            "floor": self.floor, "full_coverage": FULL_COVERAGE, "summary": self.summary(),
            "only_in_a": self.only_in_a, "only_in_b": self.only_in_b, "notes": self.notes,
            "prompts": [asdict(p) for p in self.prompts],
        })


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def compare_vectors(a: np.ndarray, b: np.ndarray, floor: float = DEFAULT_FLOOR, id: Any = None) -> PromptComparison:
    """The measures of the module docstring for two logprob vectors of one vocabulary (NaN = not recovered)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    common = np.flatnonzero(~np.isnan(a) & ~np.isnan(b))
    x, y = a[common], b[common]
    prob_x, prob_y = np.exp(x), np.exp(y)
    covered_a, covered_b = float(prob_x.sum()), float(prob_y.sum())
    kl_ab, kl_ba, tv = _divergences(x, y, prob_x, prob_y)
    above = np.flatnonzero((prob_x > floor) | (prob_y > floor))
    if above.size:
        worst = above[np.argmax(np.abs(x[above] - y[above]))]
        max_diff, max_token = float(abs(x[worst] - y[worst])), int(common[worst])
    else:
        max_diff, max_token = None, None
    top1_a, top1_b = _top1(a), _top1(b)
    return PromptComparison(
        id=id, kl_ab=kl_ab, kl_ba=kl_ba, total_variation=tv, max_abs_diff=max_diff, max_diff_token=max_token,
        top1_a=top1_a, top1_b=top1_b, top1_agree=top1_a is not None and top1_a == top1_b,
        covered_a=covered_a, covered_b=covered_b, partial=min(covered_a, covered_b) < FULL_COVERAGE,
        tokens_compared=int(common.size),
    )


Measures = tuple[float | None, float | None, float | None]


def _divergences(x: np.ndarray, y: np.ndarray, prob_x: np.ndarray, prob_y: np.ndarray) -> Measures:
    """KL(p||q), KL(q||p) and the total variation of p, q = the softmax of logprobs x, y (float64; prob_x = exp(x),
    likewise prob_y); KL is inf where one side has mass the other has not. Nothing to compare (no common token
    with mass on both sides) is None."""
    if not x.size or not (np.isfinite(x).any() and np.isfinite(y).any()):
        return None, None, None
    log_p, log_q = x - _log_total(x, prob_x), y - _log_total(y, prob_y)
    p, q = np.exp(log_p), np.exp(log_q)
    return _kl(p, log_p, log_q), _kl(q, log_q, log_p), float(0.5 * np.abs(p - q).sum())


def _kl(p: np.ndarray, log_p: np.ndarray, log_q: np.ndarray) -> float:
    """sum p (log p - log q) over p > 0: inf where log q is -inf there."""
    mass = p > 0
    if np.isneginf(log_q[mass]).any():
        return math.inf
    return float(max(0.0, (p[mass] * (log_p[mass] - log_q[mass])).sum()))


def _log_total(x: np.ndarray, prob_x: np.ndarray) -> float:
    """log sum exp(x): from the probabilities when they do not all underflow, else shifted by the largest."""
    total = prob_x.sum()
    if total > 1e-300:
        return float(np.log(total))
    top = x.max()
    return float(top + np.log(np.exp(x - top).sum()))


def _top1(logprobs: np.ndarray) -> int | None:
    """The most likely recovered token (lowest id among ties), or None when none was recovered."""
    if np.isnan(logprobs).all():
        return None
    return int(np.nanargmax(logprobs))


Key = Any  # a row's id, or (id, position) in a file of positions


@dataclass(frozen=True)
class _Side:
    """One file opened for comparison: its Parquet reader, metadata, vocabulary, the place of each key (id, or (id,
    position)) and, in files of positions, a digest of each key's context; `top` is N of a top:N file (None for a
    file of vectors)."""

    path: str
    file: pq.ParquetFile
    metadata: dict
    vocab_size: int
    places: dict[Key, tuple[int, int]]  # key -> (row group, row within it)
    top: int | None = None
    contexts: dict[Key, int] = field(default_factory=dict)

    @property
    def positions(self) -> bool:
        return "position" in self.file.schema_arrow.names


def _open_side(path: str | os.PathLike) -> _Side:
    """A file of full vectors, or of each row's top N (`store` top:N), written by `logprobs extract`, with its keys
    indexed; CompareError otherwise."""
    if not os.path.exists(path):
        raise CompareError(f"{path} does not exist")
    try:
        metadata = read_metadata(path)
    except ValueError as error:
        raise CompareError(str(error)) from None
    file = pq.ParquetFile(path, pre_buffer=False)  # with pre-buffering, iter_batches' memory grows batch by batch
    schema = file.schema_arrow
    top = _top_of(path, schema)
    if "id" not in schema.names or (top is None and not pa.types.is_fixed_size_list(schema.field("logprobs").type)):
        raise CompareError(f"{path} does not have the columns of a `logprobs extract` output (id, logprobs)")
    vocab_size = schema.field("logprobs").type.list_size if top is None else int(
        schema.field("top_ids").metadata[b"vocab_size"])
    places, contexts = _index(str(path), file)
    return _Side(str(path), file, metadata, vocab_size, places, top, contexts)


def _top_of(path: str | os.PathLike, schema: pa.Schema) -> int | None:
    """N of a top:N file, None for a file of whole vectors; CompareError for a file of neither (chosen tokens)."""
    if "logprobs" in schema.names:
        return None
    if "targets" not in schema.names and "rest_mass" in schema.names:
        return int(store_form(schema).removeprefix("top:"))
    kind = "chosen tokens' targets" if "targets" in schema.names else "no `logprobs` column"
    raise CompareError(f"{path} holds {kind}, not full vectors: compare takes files of whole logprob vectors "
                       "(or of each row's top tokens)")


def _index(path: str, file: pq.ParquetFile) -> tuple[dict[Key, tuple[int, int]], dict[Key, int]]:
    """Each row's key (id, or (id, position) in a file of positions) -> (row group, row), and in a file of
    positions each key's context digest; CompareError for a key held twice."""
    positions = "position" in file.schema_arrow.names
    places: dict[Key, tuple[int, int]] = {}
    contexts: dict[Key, int] = {}
    for group in range(file.num_row_groups):
        table = file.read_row_group(group, columns=["id", "position", "context_tokens"] if positions else ["id"])
        ids = table.column("id").to_pylist()
        keys = list(zip(ids, table.column("position").to_pylist())) if positions else ids
        for row, key in enumerate(keys):
            if key in places:
                raise CompareError(f"{path} holds {_label(key)} twice: ids must be unique to be joined")
            places[key] = (group, row)
        if positions:
            contexts |= {key: hash(tuple(c)) for key, c in zip(keys, table.column("context_tokens").to_pylist())}
    return places, contexts


def _label(key: Key) -> str:
    """How a key is named to people: the id 'p0', or 'q @2' for position 2 of id q."""
    return f"{key[0]!r} @{key[1]}" if isinstance(key, tuple) else f"the id {key!r}"


def _check_vocabularies(a: _Side, b: _Side) -> list[str]:
    """Refuses two vocabularies that differ in size or name; returns a note when a name does not identify its
    vocabulary (a file path, a server's own ids) and the two are compared by size only."""
    if a.vocab_size != b.vocab_size:
        raise CompareError(
            f"the files have different vocabularies: {a.path} has {a.vocab_size:,} tokens, {b.path} {b.vocab_size:,}"
        )
    names = [side.metadata.get("vocabulary", {}).get("name") for side in (a, b)]
    kinds = [_vocabulary_identity(name) for name in names]
    if None not in kinds and kinds[0] != kinds[1]:
        raise CompareError(f"the files have different vocabularies: {a.path} uses {names[0]}, {b.path} {names[1]}")
    if None in kinds and names[0] != names[1]:
        return [f"vocabularies {names[0]} and {names[1]} compared by size only ({a.vocab_size:,} tokens): "
                "make sure they are the same tokenizer"]
    return []


def _vocabulary_identity(name: str | None) -> str | None:
    """What a vocabulary name identifies: "simulator" for the simulator at any size, a tiktoken encoding's name;
    None where the name says where the tokens came from rather than which they are (a path, "server:N")."""
    if not name or name.startswith("server:") or "/" in name or os.sep in name or name.endswith((".json", ".tiktoken")):
        return None
    return name.partition(":")[0] if name.startswith("simulator") else name


class _RowReader:
    """Rows of one side by their place, reading one batch at a time and moving forward through a row group;
    a place behind the current batch restarts the row group."""

    def __init__(self, side: _Side) -> None:
        self.side = side
        self.group: int | None = None
        self.batches: Iterator[pa.RecordBatch] = iter(())
        self.start, self.vectors = 0, np.empty((0, side.vocab_size), dtype=np.float32)

    def vector(self, group: int, row: int) -> np.ndarray:
        if group != self.group or row < self.start:
            self.group, self.start, self.vectors = group, 0, self.vectors[:0]
            self.batches = self.side.file.iter_batches(
                batch_size=ROW_GROUP_ROWS, row_groups=[group], columns=_vector_columns(self.side))
        while row >= self.start + len(self.vectors):
            self.start += len(self.vectors)
            self.vectors = _vectors(next(self.batches), self.side)
        return self.vectors[row - self.start]


def _vector_columns(side: _Side) -> list[str]:
    return ["logprobs"] if side.top is None else ["top_ids", "top_logprobs"]


def _vectors(batch: pa.RecordBatch, side: _Side) -> np.ndarray:
    """A batch's logprobs as a (rows, vocab) float32 array, NULL as NaN; in a top:N file, each row's top tokens
    placed at their ids and NaN elsewhere."""
    if side.top is None:
        values = batch.column("logprobs").flatten().to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float32).reshape(-1, side.vocab_size)
    vectors = np.full((batch.num_rows, side.vocab_size), np.nan, dtype=np.float32)
    for row, (ids, values) in enumerate(zip(batch.column("top_ids").to_pylist(), batch.column("top_logprobs").to_pylist())):
        vectors[row, ids] = np.array(values, dtype=np.float32)
    return vectors


def compare_files(a: str | os.PathLike, b: str | os.PathLike, floor: float = DEFAULT_FLOOR) -> Comparison:
    """Compare two outputs of `logprobs extract` prompt by prompt (the module docstring says how).

    Raises CompareError for a file that is not such an output of full vectors or top tokens, for vocabularies that
    differ, for a file of positions against one without, for a position whose context differs, and for files with
    no key in common.
    """
    if not 0 <= floor <= 1:
        raise CompareError(f"the probability floor must be between 0 and 1, got {floor!r}")
    side_a, side_b = _open_side(a), _open_side(b)
    notes = _check_vocabularies(side_a, side_b)
    _check_positions(side_a, side_b)
    notes += [f"{side.path} keeps each row's top {side.top} tokens only: the measures are over the tokens both "
              "files hold (partial where they cover less of a side's mass)" for side in (side_a, side_b) if side.top]
    common = side_a.places.keys() & side_b.places.keys()
    if not common:
        types = [side.file.schema_arrow.field("id").type for side in (side_a, side_b)]
        why = f" (their ids are {types[0]} and {types[1]})" if types[0] != types[1] else ""
        raise CompareError(
            f"{side_a.path} and {side_b.path} have no id in common{why} ({plural(len(side_a.places), 'row')} and "
            f"{len(side_b.places):,}): compare runs of the same prompts"
        )
    result = Comparison(
        str(a), str(b), side_a.vocab_size, floor, notes=notes,
        only_in_a=[_json_key(key) for key in side_a.places if key not in side_b.places],
        only_in_b=[_json_key(key) for key in side_b.places if key not in side_a.places],
        models=(_model(side_a.metadata), _model(side_b.metadata)),
        vocabulary=side_a.metadata.get("vocabulary", {}).get("name"),
    )
    reader_b = _RowReader(side_b)
    keys = ["id", "position"] if side_a.positions else ["id"]
    for batch in side_a.file.iter_batches(batch_size=ROW_GROUP_ROWS, columns=keys + _vector_columns(side_a)):
        rows = zip(*(batch.column(name).to_pylist() for name in keys)) if side_a.positions else batch.column("id").to_pylist()
        for key, vector in zip(rows, _vectors(batch, side_a)):
            if key in common:
                other = reader_b.vector(*side_b.places[key])
                measured = compare_vectors(vector, other, floor, id=key[0] if side_a.positions else key)
                result.prompts.append(replace(measured, position=key[1]) if side_a.positions else measured)
    return result


def _check_positions(a: _Side, b: _Side) -> None:
    """Refuses a file of positions against one without, and a position whose context differs between the files
    (its distributions are then of different texts)."""
    if a.positions != b.positions:
        with_, without = (a, b) if a.positions else (b, a)
        raise CompareError(
            f"{with_.path} holds positions of completions (a row per position) and {without.path} does not: compare "
            "two files of positions of the same completions, or two files of one row per prompt"
        )
    for key, context in a.contexts.items():  # in A's order: the first position that differs is named
        if key in b.contexts and b.contexts[key] != context:
            raise CompareError(
                f"{_label(key)} has another context in {a.path} than in {b.path} (other completion tokens before "
                "it): compare runs of the same completions"
            )


def _json_key(key: Key) -> Any:
    """A key as the JSON lists it: the id, or {"id", "position"}."""
    return {"id": key[0], "position": key[1]} if isinstance(key, tuple) else key


def _model(metadata: dict) -> str:
    return str(metadata.get("model") or metadata.get("endpoint", {}).get("model", "?"))


def render_comparison(comparison: Comparison, console: Console, top: int = 20) -> None:
    """Print the files compared, a table of at most `top` prompts (largest KL first), the summary line (mean and
    max of each measure, top-1 agreement), the ids on one side only, and what the columns mean."""
    c = comparison
    console.print(f"A: {c.a} ({c.models[0]})\nB: {c.b} ({c.models[1]})\n"
                  f"{plural(len(c.prompts), 'prompt')} compared, vocabulary {c.vocabulary or '?'} "
                  f"({c.vocab_size:,} tokens)", highlight=False)
    text = token_text({"vocabulary": {"name": c.vocabulary}})
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)  # 80 columns: id and token are cut first
    table.add_column("id", max_width=12, overflow="ellipsis", no_wrap=True)
    for name in ("KL(A||B)", "KL(B||A)", "TV", "max diff"):  # never cut: a cut would hide the partial mark
        table.add_column(name, justify="right", no_wrap=True, min_width=8)
    table.add_column("top-1", justify="right", no_wrap=True, min_width=5)
    table.add_column("covered", justify="right", no_wrap=True, min_width=7)
    table.add_column("at token", max_width=10, overflow="ellipsis", no_wrap=True)
    for p in sorted(c.prompts, key=_largest_kl, reverse=True)[:top]:
        mark = "*" if p.partial else ""
        table.add_row(
            Text(_shown(p.id, p.position)), _number(p.kl_ab) + mark, _number(p.kl_ba) + mark, _number(p.total_variation) + mark,
            _number(p.max_abs_diff), "yes" if p.top1_agree else "NO", f"{min(p.covered_a, p.covered_b):.4f}",
            Text("-" if p.max_diff_token is None else text(p.max_diff_token)),
        )
    console.print(table)
    for line in _summary_lines(c, top):
        console.print(line, highlight=False)


def _summary_lines(c: Comparison, top: int) -> list[str]:
    summary = c.summary()
    measures = ", ".join(
        f"{label} {_number(summary[name]['mean'])} / {_number(summary[name]['max'])}"
        for name, label in zip(MEASURES, ("KL(A||B)", "KL(B||A)", "TV", "max diff"))
    )
    agree = sum(p.top1_agree for p in c.prompts)
    lines = [f"mean / max: {measures}; top-1 agreement {agree / len(c.prompts):.1%} ({agree} of {len(c.prompts)})"]
    if len(c.prompts) > top:
        lines.append(f"(the {top} prompts of largest KL shown of {len(c.prompts):,})")
    for ids, side in ((c.only_in_a, "A"), (c.only_in_b, "B")):
        if ids:
            shown = ", ".join(_shown(*_key_parts(key)) for key in ids[:10]) + (", ..." if len(ids) > 10 else "")
            lines.append(f"{plural(len(ids), 'id')} only in {side}, not compared: {shown}")
    if summary["partial"]:
        lines.append(f"* partial ({plural(summary['partial'], 'prompt')}): the tokens both files recovered cover less "
                     f"than {FULL_COVERAGE:g} of a side's mass; the measures are those of the distributions on them")
    if any(p.kl_ab == math.inf or p.kl_ba == math.inf for p in c.prompts):
        lines.append("inf: one side gives probability 0 (logprob -inf) to a token the other gives mass to")
    lines += [f"note: {note}" for note in c.notes]
    lines.append(f"KL in nats; TV: total variation; max diff: largest |logprob difference| over tokens with p > "
                 f"{c.floor:g} in either, at token; covered: the smaller share of mass the common tokens hold")
    return lines


def _key_parts(key: Any) -> tuple[Any, int | None]:
    """(id, position) of an entry of `only_in_a` / `only_in_b` (position None outside files of positions)."""
    return (key["id"], key["position"]) if isinstance(key, dict) else (key, None)


def _shown(id: Any, position: int | None) -> str:
    """A row's name in the table: its id, and "id @position" for a position of a completion (as `inspect`)."""
    return str(id) if position is None else f"{id} @{position}"


def _largest_kl(p: PromptComparison) -> float:
    values = [v for v in (p.kl_ab, p.kl_ba) if v is not None]
    return max(values, default=-1.0)


def _number(value: float | None) -> str:
    """3 significant digits (5.04e-4 below 0.001), "inf", or "-" for a value that does not exist."""
    if value is None:
        return "-"
    if value == math.inf:
        return "inf"
    if 0 < abs(value) < 1e-3:
        mantissa, _, exponent = f"{value:.2e}".partition("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.3g}"
