import json
import math
import weakref

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from logprob_cli.endpoints._base import Prompt
from logprob_cli.methods._base import MethodResult
from logprob_cli.io._parquet import (
    OutputRow,
    output_schema,
    read_metadata,
    render_inspect,
    token_text,
    write_parquet,
)
from logprob_cli.endpoints._simulator import simulator_token_bytes

V = 300
PARIS = 299  # a word token of the simulator vocabulary
NEWLINE = 10
UNRECOVERED = [3, 17, 250]


def metadata(vocabulary="simulator"):
    return {
        "tool_version": "0.2.0",
        "vocabulary": {"name": vocabulary, "size": V},
        "endpoint": {"backend": "simulator", "model": "simulator", "vocab_size": V},
        "behaviour": {"bias_steers_sampling": True, "logprobs_after_bias": True},
        "settings": {"method": "exact", "top_k": 20},
    }


def make_result(seed=0):
    """A vector with ' Paris'-like token at p=0.78, '\\n' at 0.12, three unrecovered tokens (one without a bound)."""
    rng = np.random.default_rng(seed)
    p = rng.random(V)
    p[[PARIS, NEWLINE]] = 0
    p *= 0.10 / p.sum()
    p[PARIS], p[NEWLINE] = 0.78, 0.12
    lp = np.log(p)
    lp[UNRECOVERED] = np.nan
    bounds = {3: -6.5, 17: math.nan, 250: -7.25}
    return MethodResult(lp, bounds, precision=2.5e-6, behaviour={"x": 1}, notes=["first note", "second"])


def prompts():
    return [
        Prompt(1, 1, "The capital of France is", extra={"lang": "en", "score": 1, "tags": ["a"]}),
        Prompt(2, 2, messages=[{"role": "user", "content": "Bonjour ✓"}], extra={"score": 2.5, "meta": {"k": 1}}),
        Prompt(3, 3, "x", extra={"lang": "fr", "mixed": 1}),
        Prompt(4, 4, "y", extra={"mixed": "one", "empty": {}, "nothing": None}),
    ]


def rows(items, calls=7, seed=0):
    return (OutputRow(p, "simulator", "exact", calls + i, make_result(seed + i)) for i, p in enumerate(items))


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "out.parquet"
    items = prompts()
    assert write_parquet(path, output_schema(items, V), rows(items), metadata()) == len(items)
    return path


def test_schema_columns_types_and_extra_inference():
    schema = output_schema(prompts(), V)
    assert schema.names == [
        "id", "prompt", "messages", "lang", "score", "tags", "meta", "mixed", "empty", "nothing",
        "model", "method", "logprobs", "calls", "probability_sum", "unrecovered_count",
        "unrecovered_mass_bound", "unrecovered_ids", "unrecovered_upper_bounds", "precision_nats", "notes",
    ]  # fmt: skip
    types = {field.name: field.type for field in schema}
    assert types["id"] == pa.int64()
    assert types["prompt"] == types["messages"] == types["lang"] == pa.string()
    assert types["score"] == pa.float64()  # 1 and 2.5 infer double
    assert types["tags"] == pa.list_(pa.string())
    assert types["meta"] == pa.struct([("k", pa.int64())])
    for key in ("mixed", "empty", "nothing"):  # no common type, struct<> (Parquet can't), null type
        assert types[key] == pa.string() and schema.field(key).metadata == {b"encoding": b"json"}
    assert schema.field("lang").metadata is None
    assert types["logprobs"] == pa.list_(pa.float32(), V)
    assert types["calls"] == types["unrecovered_count"] == pa.int64()
    assert types["probability_sum"] == types["unrecovered_mass_bound"] == types["precision_nats"] == pa.float64()
    assert types["unrecovered_ids"] == pa.list_(pa.int32())
    assert types["unrecovered_upper_bounds"] == pa.list_(pa.float32())
    assert types["notes"] == pa.list_(pa.string())


def test_string_ids_give_a_string_column():
    schema = output_schema([Prompt("a", 1, "x"), Prompt("b", 2, "y")], V)
    assert schema.field("id").type == pa.string()


@pytest.mark.parametrize("key", ["model", "logprobs", "notes", "Calls"])
def test_extra_key_colliding_with_a_column_is_rejected(key):
    items = [Prompt(1, 1, "x"), Prompt(2, 2, "y", extra={key: 1})]
    with pytest.raises(ValueError, match=f'"{key}" \\(line 2\\)'):
        output_schema(items, V)


def test_round_trip_values_nulls_and_diagnostics(written):
    table = pq.read_table(written)
    assert table.num_rows == 4
    for i, row in enumerate(table.to_pylist()):
        result = make_result(i)
        expected = result.logprobs.astype(np.float32)
        vector = table.column("logprobs")[i].values
        assert vector.null_count == len(UNRECOVERED)
        assert [j for j, v in enumerate(row["logprobs"]) if v is None] == UNRECOVERED
        stored = vector.to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(stored, expected)  # exact float32, NaN where NULL
        assert row["model"] == "simulator" and row["method"] == "exact" and row["calls"] == 7 + i
        assert row["probability_sum"] == result.probability_sum()
        assert row["unrecovered_count"] == 3
        assert row["unrecovered_mass_bound"] == result.unrecovered_mass_bound()
        assert row["unrecovered_ids"] == UNRECOVERED
        assert row["unrecovered_upper_bounds"] == [-6.5, None, -7.25]
        assert row["precision_nats"] == 2.5e-6
        assert row["notes"] == ["first note", "second"]
    rows_ = table.drop_columns(["logprobs"]).to_pylist()
    assert [r["id"] for r in rows_] == [1, 2, 3, 4]
    assert [r["prompt"] for r in rows_] == ["The capital of France is", None, "x", "y"]
    assert rows_[0]["messages"] is None
    assert json.loads(rows_[1]["messages"]) == [{"role": "user", "content": "Bonjour ✓"}]
    assert [r["lang"] for r in rows_] == ["en", None, "fr", None]
    assert [r["score"] for r in rows_] == [1.0, 2.5, None, None]
    assert [r["tags"] for r in rows_] == [["a"], None, None, None]
    assert [r["meta"] for r in rows_] == [None, {"k": 1}, None, None]
    assert [r["mixed"] for r in rows_] == [None, None, "1", '"one"']
    assert [r["empty"] for r in rows_] == [None, None, None, "{}"]
    assert [r["nothing"] for r in rows_] == [None] * 4


def test_metadata_is_stored_as_json_under_the_file_key(written):
    assert read_metadata(written) == {**metadata(), "store": "vector"}
    assert json.loads(pq.read_metadata(written).metadata[b"logprob_cli"]) == {**metadata(), "store": "vector"}


def test_row_groups_of_32_and_rows_are_streamed(tmp_path):
    items = [Prompt(i, i, f"p{i}") for i in range(70)]
    alive: list[weakref.ref] = []
    most_alive = 0

    def stream():
        nonlocal most_alive
        for item in items:
            row = OutputRow(item, "simulator", "exact", 1, make_result())
            alive.append(weakref.ref(row.result))
            most_alive = max(most_alive, sum(ref() is not None for ref in alive))
            yield row

    path = tmp_path / "big.parquet"
    assert write_parquet(path, output_schema(items, V), stream(), metadata()) == 70
    file = pq.ParquetFile(path)
    assert [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)] == [32, 32, 6]
    assert most_alive <= 33


def test_zero_rows_give_a_valid_empty_file(tmp_path):
    path = tmp_path / "empty.parquet"
    schema = output_schema(prompts(), V)
    assert write_parquet(path, schema, iter(()), metadata()) == 0
    table = pq.read_table(path)
    assert table.num_rows == 0
    assert table.schema.equals(schema)
    assert read_metadata(path) == {**metadata(), "store": "vector"}
    console = Console(record=True, width=200)
    render_inspect(path, console)
    assert "0 rows" in console.export_text()


def test_failed_write_leaves_the_old_file_and_no_temp_files(written):
    before = written.read_bytes()
    items = [Prompt(i, i, f"p{i}") for i in range(100)]

    def failing():
        for i, row in enumerate(rows(items)):
            if i == 40:  # after one row group reached the temporary file
                raise RuntimeError("endpoint died")
            yield row

    with pytest.raises(RuntimeError, match="endpoint died"):
        write_parquet(written, output_schema(items, V), failing(), metadata())
    assert written.read_bytes() == before
    assert [p.name for p in written.parent.iterdir()] == [written.name]


def test_successful_write_replaces_the_file(written):
    items = [Prompt(9, 1, "new")]
    assert write_parquet(written, output_schema(items, V), rows(items), metadata()) == 1
    assert pq.read_table(written, columns=["id"]).column("id").to_pylist() == [9]
    assert [p.name for p in written.parent.iterdir()] == [written.name]


def test_wrong_vector_length_is_rejected(tmp_path):
    path = tmp_path / "out.parquet"
    items = [Prompt(1, 1, "x")]
    with pytest.raises(ValueError, match=r"shape \(300,\), expected \(400,\)"):
        write_parquet(path, output_schema(items, 400), rows(items), metadata())
    assert list(tmp_path.iterdir()) == []


def test_pandas_polars_and_duckdb_read_the_same_vectors(written, monkeypatch):
    monkeypatch.chdir(written.parent)
    expected = np.stack([make_result(i).logprobs.astype(np.float32) for i in range(4)])

    df = pd.read_parquet("out.parquet")
    pandas_vectors = np.stack(df["logprobs"].tolist())

    pf = pl.read_parquet("out.parquet")
    polars_vectors = np.stack([v.to_numpy() for v in pf["logprobs"]])

    rel = duckdb.sql("select id, logprobs from 'out.parquet' order by id").fetchall()
    duckdb_vectors = np.array([[math.nan if v is None else v for v in vector] for _, vector in rel], dtype=np.float32)
    paris = duckdb.sql(f"select logprobs[{PARIS} + 1] from 'out.parquet' order by id").fetchall()  # 1-based

    for vectors in (pandas_vectors, polars_vectors, duckdb_vectors):
        assert vectors.dtype == np.float32
        np.testing.assert_array_equal(vectors, expected)
    assert [row[0] for row in paris] == [float(np.float32(math.log(0.78)))] * 4
    assert list(df["id"]) == list(pf["id"]) == [row[0] for row in rel] == [1, 2, 3, 4]


def test_token_text():
    text = token_text(metadata())
    assert text(NEWLINE) == "'\\n'"
    assert text(ord("A")) == "'A'"
    assert text(200) == "'\ufffd'"  # a lone byte of a multi-byte character
    word = simulator_token_bytes(PARIS).decode()
    assert text(PARIS) == repr(word) and word.startswith(" ")
    assert token_text(metadata("o200k_base"))(PARIS) == f"#{PARIS}"


def test_render_inspect_shows_top_tokens_entropy_and_diagnostics(written):
    console = Console(record=True, width=200)
    render_inspect(written, console, top=2)
    out = console.export_text()
    assert out.splitlines()[0] == f"{written}: 4 rows, model simulator, vocabulary simulator (300 tokens)"
    assert out.splitlines()[1] == "method: exact"
    paris = repr(simulator_token_bytes(PARIS).decode())
    assert f"{paris} 0.78" in out and "'\\n' 0.12" in out
    lp = make_result(0).logprobs.astype(np.float32).astype(np.float64)
    lp = lp[~np.isnan(lp)]
    entropy = -(np.exp(lp) * lp).sum()
    assert 0.5 < entropy < 1.5
    assert f"{entropy:.4f}" in out
    assert f"{make_result(0).probability_sum():.6f}" in out
    assert "2.5e-06" in out
    assert out.count(paris) == 4  # one row per prompt, only the top 2 tokens


def test_render_inspect_rejects_foreign_files(tmp_path):
    text_file = tmp_path / "notes.parquet"
    text_file.write_text("hello\n")
    with pytest.raises(ValueError, match="is not a Parquet file"):
        render_inspect(text_file, Console(record=True))
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    with pytest.raises(ValueError, match="no logprob_cli metadata"):
        render_inspect(plain, Console(record=True))
    with pytest.raises(ValueError, match="no logprob_cli metadata"):
        read_metadata(plain)
