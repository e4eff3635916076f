"""The input and output side of chosen tokens ("targets"): JSONL, the Python API's prompts, the checkpoint, Parquet."""

import dataclasses
import json
import math
import re
import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from logprob_cli.endpoints._base import Prompt
from logprob_cli.errors import Worded
from logprob_cli.io import (
    InputError, OutputRow, check_prompts, output_schema, read_metadata, read_prompts, render_inspect, with_targets,
    write_parquet,
)
from logprob_cli.io._preflight import MAX_TARGETS
from logprob_cli.methods._base import MethodResult
from logprob_cli.run._journal import SPARSE_BELOW, Journal, prompt_key
from logprob_cli.run._outputs_guard import _row_keys

# keys computed before targets existed: a checkpoint of a run without targets must keep resuming
PINNED_KEYS = {
    "e0d96bbbbbb9b4966794ec4c": Prompt(1, 1, "The capital of France is"),
    "c8d540790061e5896b07fb67": Prompt("a", 3, messages=[{"role": "user", "content": "Bonjour ✓"}]),
}


def test_prompt_key_without_targets_is_unchanged():
    for key, prompt in PINNED_KEYS.items():
        assert prompt_key(prompt) == key


# ---- input: the "targets" key of a JSONL line, the Python API's prompts, one target set for a batch ----


def write(tmp_path, *lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def problems_of(tmp_path, *lines):
    with pytest.raises(InputError) as caught:
        read_prompts(write(tmp_path, *lines))
    return caught.value.problems


def test_targets_are_read_in_order_and_are_not_an_extra_column(tmp_path):
    prompts = read_prompts(write(
        tmp_path,
        '{"id": 1, "prompt": "Is it?", "targets": [" Yes", " No", 1734], "lang": "en"}',
        '{"id": 2, "messages": [{"role": "user", "content": "Hi"}], "targets": [0]}',
    ))
    assert [p.targets for p in prompts] == [(" Yes", " No", 1734), (0,)]
    assert [p.target_ids for p in prompts] == [(), ()]  # resolved by the run layer
    assert prompts[0].extra == {"lang": "en"} and prompts[1].extra == {}


def test_a_file_without_targets_reads_as_before(tmp_path):
    prompts = read_prompts(write(tmp_path, '{"prompt": "a"}', '{"prompt": "b"}'))
    assert [p.targets for p in prompts] == [(), ()]


BAD_TARGETS = {
    '"yes"': '"targets" must be an array of token strings or token ids, got a string',
    "[]": '"targets" is empty',
    "{}": "got an object",
    '[" Yes", true]': '"targets"[1] must be a token string or a token id (an integer from 0), got a boolean',
    '[" Yes", null]': '"targets"[1] must be a token string or a token id (an integer from 0), got null',
    "[1.0]": '"targets"[0] must be a token string or a token id (an integer from 0), got a decimal number',
    '[[" Yes"]]': "got an array",
    "[-1]": '"targets"[0] is -1: token ids are integers from 0',
    "[2147483648]": '"targets"[0] is 2147483648',
    '[""]': '"targets"[0] is an empty string',
    '["a\\ud800"]': '"targets"[0] is text that is not valid Unicode',
    '[" Yes", 3, " Yes"]': '"targets"[2] is given twice (also "targets"[0])',
    "[3, 3]": '"targets"[1] is given twice (also "targets"[0])',
}


@pytest.mark.parametrize("value", BAD_TARGETS)
def test_each_bad_target_list_is_a_problem_of_its_line(tmp_path, value):
    problems = problems_of(tmp_path, '{"prompt": "ok", "targets": [1]}', f'{{"prompt": "x", "targets": {value}}}')
    assert len(problems) == 1
    assert problems[0].startswith("line 2: ") and BAD_TARGETS[value] in problems[0]


def test_a_string_and_an_id_may_look_alike_and_every_bad_item_is_listed(tmp_path):
    assert read_prompts(write(tmp_path, '{"prompt": "x", "targets": ["3", 3]}'))[0].targets == ("3", 3)
    problems = problems_of(tmp_path, '{"prompt": "x", "targets": [true, -2, "", 4, 4]}')
    assert [p.split(" ", 3)[2] for p in problems] == ['"targets"[0]', '"targets"[1]', '"targets"[2]', '"targets"[4]']


def test_at_most_max_targets(tmp_path):
    fits = json.dumps({"prompt": "x", "targets": list(range(MAX_TARGETS))})
    assert len(read_prompts(write(tmp_path, fits))[0].targets) == MAX_TARGETS
    over = json.dumps({"prompt": "x", "targets": list(range(MAX_TARGETS + 1))})
    assert problems_of(tmp_path, over) == [f"line 1: \"targets\" holds 1,001 tokens; at most {MAX_TARGETS:,} are allowed"]


def test_targets_on_some_lines_only_is_an_error_naming_each_line_without_them(tmp_path):
    problems = problems_of(
        tmp_path, '{"prompt": "a"}', '{"prompt": "b", "targets": [" Yes"]}', '{"prompt": "c"}', '{"prompt": "d", "targets": [2]}'
    )
    assert problems == [
        f"line {n}: no targets, but line 2 has them: give targets on every line, or one target set for every prompt "
        "(targets)"
        for n in (1, 3)
    ]
    assert isinstance(problems[0], Worded)  # the CLI names its own option
    assert "(--target)" in problems[0].worded({"targets": "--target"})


def test_targets_problems_come_with_the_other_problems_of_the_file(tmp_path):
    problems = problems_of(tmp_path, '{"prompt": "", "targets": []}', '{"prompt": "b", "calls": 1, "targets": [1]}')
    assert problems[0] == 'line 1: "prompt" is empty' and problems[1].startswith('line 1: "targets" is empty')
    assert problems[2].startswith('line 2: the key "calls" collides')


@pytest.mark.parametrize("key", ["targets", "TOP_IDS", "top_logprobs"])
def test_tool_columns_of_target_files_are_reserved_for_extra_keys_of_api_prompts(key):
    with pytest.raises(InputError, match=f'the key "{key}" collides with the output column'):
        check_prompts([Prompt(1, 0, "x", extra={key: 1})])


def test_check_prompts_checks_the_targets_of_api_prompts():
    check_prompts([Prompt(1, 0, "x", targets=(" Yes", 5)), Prompt(2, 0, "y", targets=(1,))])
    with pytest.raises(InputError) as caught:
        check_prompts([Prompt("a", 0, "x", targets=(True,)), Prompt("b", 0, "y"), Prompt("c", 0, "z", targets=(1, 1))])
    assert caught.value.problems == [
        "prompt 'a': \"targets\"[0] must be a token string or a token id (an integer from 0), got a boolean",
        "prompt 'b': no targets, but prompt 'a' has them: give targets on every line, or one target set for every "
        "prompt (targets)",
        "prompt 'c': \"targets\"[1] is given twice (also \"targets\"[0])",
    ]
    with pytest.raises(InputError, match="must be an array of token strings or token ids, got a string"):
        check_prompts([Prompt("a", 0, "x", targets=" Yes")])  # not four one-character targets


def test_with_targets_gives_every_prompt_the_same_list():
    prompts = [Prompt(1, 1, "a", extra={"k": 1}), Prompt(2, 2, "b")]
    given = with_targets(prompts, [" Yes", 7])
    assert [p.targets for p in given] == [(" Yes", 7), (" Yes", 7)]
    assert given[0].extra == {"k": 1} and [p.targets for p in prompts] == [(), ()]  # the inputs are not changed
    check_prompts(given)


def test_with_targets_refuses_a_bad_list_and_prompts_with_their_own_targets():
    prompts = [Prompt(1, 1, "a"), Prompt(2, 2, "b", targets=(1,)), Prompt(3, 0, "c", targets=(2,))]
    with pytest.raises(InputError) as caught:
        with_targets(prompts, [" Yes", " Yes", ""], source="in.jsonl")
    error = caught.value
    assert error.problems == [
        'targets: target 2 (" Yes") is given twice (also target 1 (" Yes"))',
        'targets: target 3 ("") is an empty string: a token has at least one character',
        'line 2: has its own "targets", and one target set is given for every prompt (targets): give one or the other',
        'prompt 3: has its own "targets", and one target set is given for every prompt (targets): give one or the other',
    ]
    assert error.worded({"targets": "--target"}).splitlines()[:2] == [
        "in.jsonl: 4 problems", '  --target: target 2 (" Yes") is given twice (also target 1 (" Yes"))'
    ]
    with pytest.raises(InputError, match="the list must be an array"):
        with_targets(prompts[:1], " Yes")
    with pytest.raises(InputError, match="the list is empty"):
        with_targets(prompts[:1], [])


# ---- the checkpoint: keys that know the targets, sparse results ----


def resolved(prompt, ids):
    return dataclasses.replace(prompt, targets=tuple(ids), target_ids=tuple(ids))


def test_prompt_key_holds_the_target_ids_in_order():
    plain = Prompt(1, 1, "The capital of France is")
    key = prompt_key(resolved(plain, [5, 9]))
    assert key not in PINNED_KEYS and key != prompt_key(resolved(plain, [9, 5])) != prompt_key(resolved(plain, [5]))
    spelt = dataclasses.replace(plain, targets=(" Yes", 9), target_ids=(5, 9))  # " Yes" resolved to 5
    assert prompt_key(spelt) == key  # the same tokens, however they were given
    assert prompt_key(dataclasses.replace(plain, line=7, extra={"k": 1}, targets=(5, 9), target_ids=(5, 9))) == key
    assert prompt_key(resolved(Prompt(2, 1, "The capital of France is"), [5, 9])) != key


def test_prompt_key_of_unresolved_targets_is_refused():
    with pytest.raises(ValueError, match="resolve its targets"):
        prompt_key(Prompt(1, 1, "x", targets=(" Yes",)))


def sparse_result(size=1000, recovered=(3, 40, 999)):
    """A vector with a few recovered entries (values that float32 rounds, and -inf), NaN elsewhere."""
    vector = np.full(size, np.nan)
    vector[list(recovered)] = [-0.1234567890123, -np.inf, -17.000001][: len(recovered)] + [-2.5] * (len(recovered) - 3)
    return MethodResult(vector, {7: -9.75, 8: float("nan")}, 1e-5, {"bias_steers_sampling": True}, ["a note"])


def stored_row(path, key):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT length(logprobs), sparse_size FROM results WHERE prompt = ?", (key,)).fetchone()


def test_a_result_with_few_recovered_entries_is_stored_sparsely_and_reads_back_exactly(tmp_path):
    path = tmp_path / "run.checkpoint.sqlite"
    result = sparse_result()
    with Journal.open(path, {"method": "topk"}) as journal:
        journal.put_result("p", 4, result)
        saved = journal.result("p")
    assert stored_row(path, "p") == (3 * 8, 1000)  # 3 ids and 3 values, not 1000 floats
    assert saved.calls == 4 and saved.result.logprobs.dtype == np.float32
    np.testing.assert_array_equal(saved.result.logprobs, result.logprobs.astype(np.float32))  # NaN where NaN
    assert saved.result.logprobs[3] == np.float32(-0.1234567890123) and saved.result.logprobs[40] == -np.inf
    assert saved.result.upper_bounds[7] == -9.75 and np.isnan(saved.result.upper_bounds[8])
    assert (saved.result.precision, saved.result.behaviour, saved.result.notes) == (1e-5, {"bias_steers_sampling": True}, ["a note"])


def test_a_result_with_nothing_recovered_round_trips(tmp_path):
    path = tmp_path / "run.checkpoint.sqlite"
    with Journal.open(path, {"method": "topk"}) as journal:
        journal.put_result("p", 0, MethodResult(np.full(50, np.nan), {}, 0.0))
        assert np.isnan(journal.result("p").result.logprobs).all() and journal.result("p").result.logprobs.size == 50
    assert stored_row(path, "p") == (0, 50)


def test_a_result_with_an_eighth_or_more_recovered_is_stored_dense(tmp_path):
    path = tmp_path / "run.checkpoint.sqlite"
    size = 800
    at_threshold = range(int(SPARSE_BELOW * size))  # exactly 1/8: dense
    below = range(int(SPARSE_BELOW * size) - 1)
    with Journal.open(path, {"method": "topk"}) as journal:
        journal.put_result("dense", 1, sparse_result(size, at_threshold))
        journal.put_result("sparse", 1, sparse_result(size, below))
        full = MethodResult(np.log(np.full(size, 1 / size)), {}, 0.0)
        journal.put_result("full", 1, full)
        np.testing.assert_array_equal(journal.result("dense").result.logprobs, sparse_result(size, at_threshold).logprobs.astype(np.float32))
        np.testing.assert_array_equal(journal.result("sparse").result.logprobs, sparse_result(size, below).logprobs.astype(np.float32))
        np.testing.assert_array_equal(journal.result("full").result.logprobs, full.logprobs.astype(np.float32))
    assert stored_row(path, "dense") == (4 * size, None)
    assert stored_row(path, "full") == (4 * size, None)
    assert stored_row(path, "sparse") == (8 * len(below), size)


OLD_RESULTS = """CREATE TABLE results (
    prompt TEXT PRIMARY KEY, calls INTEGER NOT NULL, logprobs BLOB NOT NULL,
    bound_ids BLOB NOT NULL, bounds BLOB NOT NULL, precision REAL NOT NULL,
    behaviour TEXT NOT NULL, notes TEXT NOT NULL)"""  # the results table before targets


def test_a_checkpoint_from_before_targets_keeps_reading_its_dense_results(tmp_path):
    path = tmp_path / "old.checkpoint.sqlite"
    vector = np.array([-0.5, np.nan, -1.25, -30.0], dtype="<f4")
    with sqlite3.connect(path) as db:
        db.execute(OLD_RESULTS)
        db.execute(
            "INSERT INTO results VALUES ('p', 5, ?, ?, ?, 1e-6, '{}', '[]')",
            (vector.tobytes(), np.array([1], "<i4").tobytes(), np.array([-3.0], "<f8").tobytes()),
        )
    with Journal.open(path, {"method": "topk"}) as journal:
        saved = journal.result("p")
        np.testing.assert_array_equal(saved.result.logprobs, vector)
        assert (saved.calls, saved.result.upper_bounds, saved.result.precision) == (5, {1: -3.0}, 1e-6)
        journal.put_result("q", 1, sparse_result(40, [0]))  # the old file takes sparse results now
        assert np.flatnonzero(~np.isnan(journal.result("q").result.logprobs)).tolist() == [0]
    assert stored_row(path, "p") == (16, None)


# ---- the Parquet output of a target run, and inspect ----


V = 500
YES, NO, MAYBE, FAR = 17, 42, 300, 499  # MAYBE is not recovered (a bound is known), FAR neither (no bound)
TOKENS = {YES: " Yes", NO: " No", MAYBE: " Maybe", FAR: "\n"}
META = {"tool_version": "x", "vocabulary": {"name": "simulator", "size": V}, "settings": {"method": "auto"}}


def classifier_result(seed):
    """A vector whose visible top 6 and the targets YES, NO are recovered; MAYBE has a proven bound."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=V).astype(np.float32)
    full = (logits - np.log(np.exp(logits.astype(np.float64)).sum())).astype(np.float64)
    vector = np.full(V, np.nan)
    shown = list(np.argsort(-full)[:6]) + [YES, NO]
    vector[shown] = full[shown]
    return MethodResult(vector, {MAYBE: -8.5, FAR: math.nan}, 3e-5, {}, ["n"]), full


def target_prompts():
    return [
        Prompt(1, 1, "Is it?", extra={"gold": "yes"}, targets=(" Yes", NO, " Maybe", FAR), target_ids=(YES, NO, MAYBE, FAR)),
        Prompt(2, 2, "Is it not?", extra={"gold": "no"}, targets=(" Yes", NO, " Maybe", FAR), target_ids=(YES, NO, MAYBE, FAR)),
    ]


def target_rows(prompts):
    for seed, prompt in enumerate(prompts):
        pairs = tuple((i, TOKENS[i]) for i in prompt.target_ids)
        yield OutputRow(prompt, "sim", "bisection", 10 + seed, classifier_result(seed)[0], pairs)


@pytest.fixture
def target_file(tmp_path):
    path = tmp_path / "out.parquet"
    prompts = target_prompts()
    write_parquet(path, output_schema(prompts, V, top_k=5), target_rows(prompts), META)
    return path


def test_target_schema_has_no_vector_unless_asked_for():
    prompts = target_prompts()
    head = ["id", "prompt", "messages", "gold", "model", "method", "targets", "top_ids", "top_logprobs"]
    assert output_schema(prompts, V).names == head + ["calls", "precision_nats", "notes"]
    assert output_schema(prompts, V, store_vector=True).names == head + [
        "logprobs", "calls", "probability_sum", "unrecovered_count", "unrecovered_mass_bound", "unrecovered_ids",
        "unrecovered_upper_bounds", "precision_nats", "notes",
    ]
    schema = output_schema(prompts, V)
    assert schema.field("targets").type == pa.list_(pa.struct([
        ("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float64()), ("upper_bound", pa.float64()),
        ("precision", pa.float64()),
    ]))
    assert schema.field("top_ids").type == pa.list_(pa.int32()) and schema.field("top_logprobs").type == pa.list_(pa.float32())


def test_without_targets_store_vector_and_top_k_change_nothing():
    plain = [Prompt(1, 1, "x")]
    assert output_schema(plain, V, store_vector=False, top_k=3) == output_schema(plain, V)
    assert "logprobs" in output_schema(plain, V).names and "targets" not in output_schema(plain, V).names


def test_target_values_bounds_precision_and_top_k_against_ground_truth(target_file):
    table = pq.read_table(target_file)
    for seed, row in enumerate(table.to_pylist()):
        result, full = classifier_result(seed)
        assert row["id"] == seed + 1 and row["gold"] == ["yes", "no"][seed] and row["calls"] == 10 + seed
        assert row["method"] == "bisection" and row["precision_nats"] == 3e-5 and row["notes"] == ["n"]
        assert row["targets"] == [
            {"token_id": YES, "token": " Yes", "logprob": float(np.float32(full[YES])), "upper_bound": None, "precision": 3e-5},
            {"token_id": NO, "token": " No", "logprob": float(np.float32(full[NO])), "upper_bound": None, "precision": 3e-5},
            {"token_id": MAYBE, "token": " Maybe", "logprob": None, "upper_bound": -8.5, "precision": None},
            {"token_id": FAR, "token": "\n", "logprob": None, "upper_bound": None, "precision": None},
        ]
        best = np.argsort(-full)[:5]
        assert row["top_ids"] == best.tolist()
        assert row["top_logprobs"] == [float(np.float32(full[i])) for i in best]


def test_top_k_holds_only_recovered_entries_best_first(tmp_path):
    path = tmp_path / "few.parquet"
    prompt = resolved(Prompt(1, 1, "x"), [YES])
    vector = np.full(V, np.nan)
    vector[[YES, 3, 9]] = [-2.0, -0.25, -np.inf]
    rows = [OutputRow(prompt, "m", "forced", 1, MethodResult(vector, {}, 0.0), ((YES, " Yes"),))]
    write_parquet(path, output_schema([prompt], V, top_k=20), rows, META)
    row = pq.read_table(path).to_pylist()[0]
    assert row["top_ids"] == [3, YES, 9] and row["top_logprobs"] == [-0.25, -2.0, -math.inf]


def test_a_stored_vector_sits_beside_the_targets(tmp_path):
    path = tmp_path / "both.parquet"
    prompts = target_prompts()
    write_parquet(path, output_schema(prompts, V, store_vector=True), target_rows(prompts), META)
    table = pq.read_table(path)
    np.testing.assert_array_equal(
        table.column("logprobs")[0].values.to_numpy(zero_copy_only=False), classifier_result(0)[0].logprobs.astype(np.float32)
    )
    assert table.column("unrecovered_count").to_pylist() == [V - 8, V - 8]
    assert table.column("targets")[0].as_py()[0]["logprob"] == float(np.float32(classifier_result(0)[1][YES]))
    assert read_metadata(path) == {**META, "store": "vector", "targets": True, "store_vector": True}


def test_metadata_records_the_target_mode_only_with_targets(target_file, tmp_path):
    assert read_metadata(target_file) == {**META, "store": "vector", "targets": True, "store_vector": False}
    plain = tmp_path / "plain.parquet"
    write_parquet(plain, output_schema([Prompt(1, 1, "x")], V), [], META)
    assert read_metadata(plain) == {**META, "store": "vector"}


def test_a_target_outside_the_vocabulary_or_a_vector_of_another_size_is_refused(tmp_path):
    prompt = resolved(Prompt(1, 1, "x"), [YES])
    schema = output_schema([prompt], V)
    result = classifier_result(0)[0]
    outside = resolved(Prompt(2, 2, "y"), [V])
    with pytest.raises(ValueError, match=f"target id {V} is outside the vocabulary"):
        write_parquet(tmp_path / "a.parquet", schema, [OutputRow(outside, "m", "x", 1, result, ((V, "?"),))], META)
    with pytest.raises(ValueError, match="not the prompt's resolved target_ids"):  # a row built without its targets
        write_parquet(tmp_path / "a.parquet", schema, [OutputRow(prompt, "m", "x", 1, result)], META)
    short = MethodResult(result.logprobs[:-1], {}, 0.0)
    with pytest.raises(ValueError, match=f"expected \\({V},\\)"):
        write_parquet(tmp_path / "a.parquet", schema, [OutputRow(prompt, "m", "x", 1, short, ((YES, " Yes"),))], META)
    assert list(tmp_path.iterdir()) == []


def test_the_output_guard_keys_a_target_file_as_the_journal_does(target_file):
    assert list(_row_keys(target_file)) == [(p.id, prompt_key(p)) for p in target_prompts()]


def test_one_line_reads_in_pandas_pyarrow_polars_and_duckdb(target_file, monkeypatch):
    monkeypatch.chdir(target_file.parent)
    yes = [float(np.float32(classifier_result(seed)[1][YES])) for seed in range(2)]
    import pandas as pd

    frame = pd.read_parquet("out.parquet").explode("targets")
    assert len(frame) == 8 and [t["logprob"] for t in frame["targets"]][::4] == yes

    flat = pq.read_table("out.parquet").column("targets").combine_chunks().flatten()  # pyarrow
    assert flat.field("logprob").to_pylist()[::4] == yes

    polars = pytest.importorskip("polars")
    frame = polars.read_parquet("out.parquet").explode("targets").unnest("targets")
    assert frame.filter(polars.col("token") == " Yes")["logprob"].to_list() == yes
    assert frame["upper_bound"].to_list()[2] == -8.5 and frame["id"].to_list() == [1] * 4 + [2] * 4

    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql("select id, unnest(targets, recursive := true) from 'out.parquet'").fetchall()
    rows = [(r[0], r[2], r[3], r[4]) for r in rows]  # id, token_id, token, logprob, upper_bound, precision
    assert rows[:4] == [(1, " Yes", yes[0], None), (1, " No", rows[1][2], None), (1, " Maybe", None, -8.5), (1, "\n", None, None)]
    assert [r[2] for r in rows if r[1] == " Yes"] == yes


def test_inspect_shows_each_target_with_its_logprob_or_bound_and_precision(target_file):
    console = Console(record=True, width=300)
    render_inspect(target_file, console)
    out = console.export_text()
    lines = out.splitlines()
    assert lines[0] == f"{target_file}: 2 rows, model ?, vocabulary simulator (500 tokens)"
    assert lines[1] == "method: bisection (chosen by auto)"
    yes = classifier_result(0)[1][YES]
    assert re.search(rf"^ *1 +' Yes' +{np.float32(yes):.4f} +3e-05 +10 *$", out, re.M)
    assert len(re.findall(r"^ +' Maybe' +< -8\.5000 *$", out, re.M)) == 2
    assert len(re.findall(r"^ +'\\n' +< \? *$", out, re.M)) == 2
    assert "entropy" not in out and "p sum" not in out
    assert out.count("' No'") == 2
