"""The tool writes only its own output and checkpoint: hostile and mistaken paths, damaged checkpoints.

Each refusal is checked for its exit code (2: before any call), a message naming the file
and the way out, no traceback, no simulator call, and every file that existed before
byte-identical afterwards. The CLI runs in-process (typer's CliRunner) with the simulator's
calls counted; the FIFO case runs in a subprocess with a timeout, since a bug there hangs.
"""

import hashlib
import json
import os
import random
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from logprob_cli.endpoints import _simulator as simulator
from logprob_cli.cli import app
from logprob_cli.io._jsonl import read_prompts, select_shard
from logprob_cli.run._journal import settings_differences
from logprob_cli.io._parquet import write_parquet

SIM = ("--sim", "vocab_size=1000", "-q")
COUNTER = Path(__file__).parent / "tools" / "counting_logprobs.py"


@pytest.fixture
def calls(monkeypatch):
    """The number of simulator calls the CLI made so far (a one-item list, read as calls[0]).

    Only calls on the main thread, where CliRunner runs the command, count: a served simulator left over
    from another test file answers on its own threads."""
    count = [0]
    answer = simulator.SimulatedEndpoint.answer

    def counted(self, prompt, query):
        if threading.current_thread() is threading.main_thread():
            count[0] += 1
        return answer(self, prompt, query)

    monkeypatch.setattr(simulator.SimulatedEndpoint, "answer", counted)
    return count


def run(directory: Path, *args):
    """`logprobs extract ARGS` in `directory`; returns (exit code, stderr with its line breaks folded)."""
    previous = Path.cwd()
    os.chdir(directory)
    try:
        result = CliRunner().invoke(app, ["extract", *map(str, args)])
    finally:
        os.chdir(previous)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, " ".join(result.stderr.split())


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry under `directory`: a regular file's SHA-256, a link's target, or its kind."""
    state = {}
    for path in sorted(directory.rglob("*")):
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            state[str(path)] = "link to " + os.readlink(path)
        elif stat.S_ISREG(mode):
            state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[str(path)] = f"mode {stat.S_IFMT(mode):o}"
    return state


def write_input(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
    return path


def assert_refused(directory: Path, calls, args, *words, before=None):
    """The command exits 2 with `words` in its message, spends nothing, and changes no file."""
    before = snapshot(directory) if before is None else before
    spent = calls[0]
    code, message = run(directory, *args)
    assert code == 2, message
    assert "Traceback" not in message
    for word in words:
        assert word in message, message
    assert calls[0] == spent
    assert snapshot(directory) == before
    return message


@pytest.fixture
def finished(tmp_path, calls):
    """x.jsonl extracted into x.parquet beside x.checkpoint.sqlite (the default names)."""
    write_input(tmp_path / "x.jsonl", ["one", "two"])
    code, message = run(tmp_path, "x.jsonl", *SIM)
    assert code == 0, message
    assert (tmp_path / "x.parquet").exists() and (tmp_path / "x.checkpoint.sqlite").exists()
    return tmp_path


@pytest.mark.parametrize("fresh", [(), ("--fresh",)], ids=["plain", "fresh"])
@pytest.mark.parametrize("earlier_run", [False, True], ids=["first-run", "after-a-run"])
def test_output_equal_to_the_input_is_refused(tmp_path, calls, fresh, earlier_run):
    write_input(tmp_path / "x.jsonl", ["one", "two"])
    if earlier_run:
        assert run(tmp_path, "x.jsonl", *SIM)[0] == 0
    assert_refused(tmp_path, calls, ["x.jsonl", "-o", "x.jsonl", *SIM, *fresh], "x.jsonl is the input file", "-o")
    assert_refused(tmp_path, calls, ["x.jsonl", "-o", tmp_path / "x.jsonl", *SIM, *fresh], "is the input file")


def test_an_input_named_like_its_default_output_is_refused(tmp_path, calls):
    write_input(tmp_path / "x.parquet", ["one"])
    assert_refused(tmp_path, calls, ["x.parquet", *SIM], "is the input file")
    assert_refused(tmp_path, calls, ["x.parquet", "--fresh", *SIM], "is the input file")


@pytest.mark.parametrize("fresh", [(), ("--fresh",)], ids=["plain", "fresh"])
def test_output_linked_to_the_input_is_refused(tmp_path, calls, fresh):
    write_input(tmp_path / "x.jsonl", ["one"])
    (tmp_path / "link.parquet").symlink_to("x.jsonl")
    os.link(tmp_path / "x.jsonl", tmp_path / "hard.parquet")
    assert_refused(tmp_path, calls, ["x.jsonl", "-o", "link.parquet", *SIM, *fresh], "is the input file")
    assert_refused(tmp_path, calls, ["x.jsonl", "-o", "hard.parquet", *SIM, *fresh], "is the input file")


def test_the_input_as_the_checkpoint_is_refused(tmp_path, calls):
    write_input(tmp_path / "x.checkpoint.sqlite", ["one"])
    assert_refused(tmp_path, calls, ["x.checkpoint.sqlite", "-o", "x.parquet", *SIM], "is the input file")
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("fresh", [(), ("--fresh",)], ids=["plain", "fresh"])
def test_a_device_is_never_replaced(tmp_path, calls, fresh):
    write_input(tmp_path / "x.jsonl", ["one"])
    message = assert_refused(tmp_path, calls, ["x.jsonl", "-o", "/dev/null", *SIM, *fresh], "/dev/null", "a device")
    assert "choose another output" in message.lower()
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("name", ["d", "d.parquet"])
@pytest.mark.parametrize("fresh", [(), ("--fresh",)], ids=["plain", "fresh"])
def test_a_directory_as_the_output_is_refused(tmp_path, calls, name, fresh):
    write_input(tmp_path / "x.jsonl", ["one"])
    (tmp_path / name).mkdir()
    (tmp_path / name / "inside.txt").write_text("keep me")
    assert_refused(tmp_path, calls, ["x.jsonl", "-o", name, *SIM, *fresh], "is a directory", "-o")


def test_a_fifo_as_the_output_or_checkpoint_is_refused_without_hanging(tmp_path):
    write_input(tmp_path / "x.jsonl", ["one"])
    os.mkfifo(tmp_path / "f.parquet")
    os.mkfifo(tmp_path / "g.checkpoint.sqlite")
    before = snapshot(tmp_path)
    env = {**os.environ, "CALL_LOG": str(tmp_path.parent / f"{tmp_path.name}.calls")}
    for output in ("f.parquet", "g.parquet"):
        for fresh in ((), ("--fresh",)):
            done = subprocess.run(
                [sys.executable, str(COUNTER), "extract", "x.jsonl", "-o", output, *SIM, *fresh],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
            )
            assert done.returncode == 2 and "a FIFO" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert snapshot(tmp_path) == before
    assert Path(env["CALL_LOG"]).stat().st_size == 0  # one byte per simulator call


@pytest.mark.parametrize("fresh", [(), ("--fresh",)], ids=["plain", "fresh"])
def test_an_unrelated_parquet_file_is_left_alone(tmp_path, calls, fresh):
    write_input(tmp_path / "x.jsonl", ["one"])
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "theirs.parquet")
    assert_refused(tmp_path, calls, ["x.jsonl", "-o", "theirs.parquet", *SIM, *fresh], "theirs.parquet", "logprob")
    assert not (tmp_path / "theirs.checkpoint.sqlite").exists()


def test_an_output_that_is_not_parquet_is_refused(tmp_path, calls):
    write_input(tmp_path / "x.jsonl", ["one"])
    (tmp_path / "notes.txt").write_text("mine")
    assert_refused(tmp_path, calls, ["x.jsonl", "-o", "notes.txt", *SIM], ".parquet")
    assert_refused(tmp_path, calls, ["x.jsonl", "-o", "new.csv", *SIM], ".parquet")
    assert not (tmp_path / "new.csv").exists()


def test_inputs_sharing_a_stem_never_share_an_output(finished, calls):
    """x.jsonl and x.csv both default to x.parquet: the second is refused, not mixed in."""
    write_input(finished / "x.csv", ["three", "four"])
    message = assert_refused(finished, calls, ["x.csv", *SIM], "x.checkpoint.sqlite", "--fresh", "-o")
    assert "not in this input" in message
    assert_refused(finished, calls, ["x.jsonl", "-o", "x.csv", *SIM], ".parquet")
    code, message = run(finished, "x.csv", "-o", "x-csv.parquet", *SIM)
    assert code == 0, message
    assert pq.read_table(finished / "x-csv.parquet").column("prompt").to_pylist() == ["three", "four"]
    assert pq.read_table(finished / "x.parquet").column("prompt").to_pylist() == ["one", "two"]


def test_another_input_with_the_same_output_is_refused_and_fresh_replaces_only_the_tools_files(finished, calls):
    write_input(finished / "y.jsonl", ["three"])
    assert_refused(finished, calls, ["y.jsonl", "-o", "x.parquet", *SIM], "x.parquet", "--fresh", "-o")
    inputs = {name: (finished / name).read_bytes() for name in ("x.jsonl", "y.jsonl")}
    code, message = run(finished, "y.jsonl", "-o", "x.parquet", "--fresh", *SIM)
    assert code == 0, message
    assert pq.read_table(finished / "x.parquet").column("prompt").to_pylist() == ["three"]
    assert {name: (finished / name).read_bytes() for name in inputs} == inputs


def test_a_finished_run_resumes_where_its_checkpoint_always_was(finished, calls):
    spent = calls[0]
    rows = pq.read_table(finished / "x.parquet")
    code, message = run(finished, "x.jsonl", *SIM)
    assert code == 0, message
    assert calls[0] == spent
    assert pq.read_table(finished / "x.parquet").equals(rows)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _foreign(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE recipes (name TEXT)")
    db.close()


def _garble_after_the_first_page(path: Path) -> None:
    """Keep the header and the schema (page 1), overwrite every other page with noise."""
    data = path.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    path.write_bytes(data[:page] + random.Random(0).randbytes(len(data) - page))


DAMAGE = {
    "random-bytes": lambda path: path.write_bytes(os.urandom(8192)),
    "garbled-pages": _garble_after_the_first_page,
    "text": lambda path: path.write_text("this is not a database\n"),
    "truncated": _truncate,
    "header-only": lambda path: path.write_bytes(path.read_bytes()[:100]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_reported_and_fresh_discards_it(finished, calls, damage):
    DAMAGE[damage](finished / "x.checkpoint.sqlite")
    message = assert_refused(finished, calls, ["x.jsonl", *SIM], "x.checkpoint.sqlite", "damaged", "--fresh", "-o")
    assert "writable" not in message and "DatabaseError" not in message
    code, message = run(finished, "x.jsonl", "--fresh", *SIM)
    assert code == 0, message
    assert pq.read_table(finished / "x.parquet").column("prompt").to_pylist() == ["one", "two"]


@pytest.mark.parametrize("fresh", [(), ("--fresh",)], ids=["plain", "fresh"])
def test_an_sqlite_file_of_another_schema_is_never_deleted(finished, calls, fresh):
    _foreign(finished / "x.checkpoint.sqlite")
    message = assert_refused(finished, calls, ["x.jsonl", *SIM, *fresh], "not a logprobs checkpoint", "recipes", "-o")
    assert "writable" not in message


def test_an_empty_checkpoint_beside_finished_rows_spends_nothing_and_keeps_them(finished, calls):
    (finished / "x.checkpoint.sqlite").write_bytes(b"")
    message = assert_refused(finished, calls, ["x.jsonl", *SIM], "x.parquet", "does not hold", "--fresh", "-o")
    assert "is empty" in message


def test_an_empty_checkpoint_alone_is_a_new_one(tmp_path, calls):
    write_input(tmp_path / "x.jsonl", ["one"])
    (tmp_path / "x.checkpoint.sqlite").write_bytes(b"")
    code, message = run(tmp_path, "x.jsonl", *SIM)
    assert code == 0, message
    assert pq.read_table(tmp_path / "x.parquet").num_rows == 1


def test_an_output_without_its_checkpoint_is_refused(finished, calls):
    (finished / "x.checkpoint.sqlite").unlink()
    assert_refused(finished, calls, ["x.jsonl", *SIM], "x.parquet", "does not hold")
    assert not (finished / "x.checkpoint.sqlite").exists()  # the refused run left no checkpoint behind


def test_an_empty_shard_writes_every_column_and_no_row(tmp_path, calls):
    prompts_file = write_input(tmp_path / "x.jsonl", ["one", "two"])
    prompts = read_prompts(prompts_file)
    empty = next(i for i in range(8) if not select_shard(prompts, i, 8))
    full = next(i for i in range(8) if select_shard(prompts, i, 8))
    code, message = run(tmp_path, "x.jsonl", "--shard", f"{empty}/8", *SIM)
    assert code == 0, message
    assert calls[0] == 0
    assert run(tmp_path, "x.jsonl", "--shard", f"{full}/8", *SIM)[0] == 0
    empty_part = pq.read_table(tmp_path / f"x.shard-{empty}-of-8.parquet")
    full_part = pq.read_table(tmp_path / f"x.shard-{full}-of-8.parquet")
    assert empty_part.num_rows == 0 and full_part.num_rows > 0
    assert empty_part.schema.remove_metadata() == full_part.schema.remove_metadata()
    assert run(tmp_path, "x.jsonl", "--shard", f"{empty}/8", *SIM)[0] == 0  # and again, resumed


def test_changed_settings_are_named_by_their_keys(finished, calls):
    before, spent = snapshot(finished), calls[0]
    code, message = run(finished, "x.jsonl", "--sim", "vocab_size=2000", "-q")
    assert code != 0 and calls[0] == spent and snapshot(finished) == before
    assert "endpoint.vocab_size 1000 (now 2000)" in message
    assert "hidden_size" not in message  # not the whole dict


def test_settings_differences_walk_nested_dicts():
    saved = {"method": "auto", "endpoint": {"simulator": {"vocab_size": 1000, "seed": 0}, "model": "m"}}
    now = {"method": "auto", "endpoint": {"simulator": {"vocab_size": 2000, "seed": 0}, "model": "m"}, "eps": 0.1}
    assert settings_differences(saved, now) == ["endpoint.simulator.vocab_size 1000 (now 2000)", "eps unset (now 0.1)"]


def test_write_parquet_replaces_only_a_regular_file(tmp_path):
    schema = pa.schema([pa.field("id", pa.int64())])
    (tmp_path / "target").write_text("keep")
    (tmp_path / "out.parquet").symlink_to("target")
    (tmp_path / "dir.parquet").mkdir()
    for name in ("out.parquet", "dir.parquet"):
        with pytest.raises(FileExistsError):
            write_parquet(tmp_path / name, schema, [], {})
    assert (tmp_path / "out.parquet").is_symlink() and (tmp_path / "target").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.parquet", "out.parquet", "target"]  # no temp left


def test_an_output_where_nothing_can_be_created_is_refused(tmp_path, calls):
    write_input(tmp_path / "x.jsonl", ["one"])
    (tmp_path / "file").write_text("not a directory")
    assert_refused(tmp_path, calls, ["x.jsonl", "-o", "file/x.parquet", *SIM], "file is not a directory")
    assert_refused(tmp_path, calls, ["x.jsonl", "-o", "/proc/x.parquet", *SIM], "cannot create the checkpoint", "-o")
