"""Budgets (--max-calls, --max-cost) stop cleanly and resume; --shard i/n splits a batch into one dataset."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from logprob_cli.server import ServerConfig, SimulatorServer
from logprob_cli.endpoints._simulator import SimulatorConfig

TOOLS = Path(__file__).parent / "tools"
SIM = ["--sim", "vocab_size=2000", "--method", "topk", "-q"]


def logprobs(*args, calls: Path, env=None):
    """The CLI with simulator calls counted into `calls` (tests/tools/counting_logprobs.py)."""
    return subprocess.run(
        [sys.executable, str(TOOLS / "counting_logprobs.py"), *map(str, args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CALL_LOG": str(calls), **(env or {})},
    )


def count(calls: Path) -> int:
    return calls.stat().st_size if calls.exists() else 0


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"prompt number {i}", "n": i}) + "\n" for i in range(n)))
    return path


def test_max_calls_stops_at_the_cap_and_a_higher_cap_resumes(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    reference = tmp_path / "ref.parquet"
    assert logprobs("extract", prompts, *SIM, "-o", reference, calls=tmp_path / "ref").returncode == 0
    needed = count(tmp_path / "ref")

    out = tmp_path / "out.parquet"
    capped = logprobs("extract", prompts, *SIM, "-o", out, "--max-calls", 150, calls=tmp_path / "c")
    assert capped.returncode == 3, capped.stderr
    assert "--max-calls 150 reached" in capped.stderr and "higher cap" in capped.stderr
    assert "Traceback" not in capped.stderr
    assert count(tmp_path / "c") == 150
    again = logprobs("extract", prompts, *SIM, "-o", out, "--max-calls", 150, calls=tmp_path / "c")
    assert again.returncode == 3 and count(tmp_path / "c") == 150  # the cap counts the checkpoint's calls

    resumed = logprobs("extract", prompts, *SIM, "-o", out, "--max-calls", 100_000, calls=tmp_path / "c")
    assert resumed.returncode == 0, resumed.stderr
    assert count(tmp_path / "c") == needed  # nothing paid twice
    assert pq.read_table(out).equals(pq.read_table(reference))


def test_max_cost_stops_before_the_cap_at_the_given_price(tmp_path):
    """$1 per prompt token: every call costs what the server bills for it (usage), never more than the cap."""
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=2000), api_key="k")) as server:
        common = [
            "--model", "simulator", "--base-url", server.url, "--tokenizer", "simulator:2000", "--api-key", "k",
            "--method", "topk", "-q", "--price", "1000000,0",
        ]
        capped = logprobs("extract", prompts, *common, "--max-cost", 500, calls=tmp_path / "c")
        assert capped.returncode == 3, capped.stderr
        assert "--max-cost $500" in capped.stderr
        per_call = 8  # the server bills len(json(messages)) // 4 = 8 prompt tokens for these prompts
        assert server.endpoint.calls * per_call <= 500
        assert server.endpoint.calls * per_call > 500 - 2 * per_call * 16  # stopped near the cap, not early
        spent = server.endpoint.calls
        resumed = logprobs("extract", prompts, *common, "--max-cost", 100_000, calls=tmp_path / "c")
        assert resumed.returncode == 0, resumed.stderr
        table = pq.read_table(tmp_path / "p.parquet")
        assert table.num_rows == 2
        for row, i in zip(table.to_pylist(), range(2)):
            truth = server.endpoint.true_logprobs([{"role": "user", "content": f"prompt number {i}"}])
            assert np.abs(np.array(row["logprobs"]) - truth).max() < 1e-4
        assert server.endpoint.calls > spent


def test_max_cost_needs_a_known_price(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    with SimulatorServer(ServerConfig(SimulatorConfig(vocab_size=2000))) as server:
        run = logprobs(
            "extract", prompts, "--model", "simulator", "--base-url", server.url, "--tokenizer", "simulator:2000",
            "--api-key", "k", "--max-cost", 1, calls=tmp_path / "c",
        )
        assert run.returncode == 2 and "--price" in run.stderr and "Traceback" not in run.stderr
        assert server.endpoint.calls == 0


def test_shards_split_a_batch_into_one_dataset(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 9)
    whole = tmp_path / "whole.parquet"
    assert logprobs("extract", prompts, *SIM, "-o", whole, calls=tmp_path / "w").returncode == 0
    (tmp_path / "out").mkdir()
    for i in range(3):
        run = logprobs("extract", prompts, *SIM, "--shard", f"{i}/3", "-o", tmp_path / "out" / f"part-{i}.parquet",
                       calls=tmp_path / "s")
        assert run.returncode == 0, run.stderr
    parts = sorted(glob.glob(str(tmp_path / "out" / "*.parquet")))
    ids = [pq.read_table(p).column("id").to_pylist() for p in parts]
    assert all(ids), "with 9 prompts every one of 3 shards should hold some"
    assert sorted(sum(ids, [])) == sorted(f"p{i}" for i in range(9))  # disjoint and complete
    assert count(tmp_path / "s") == count(tmp_path / "w")  # no prompt done twice

    expected = pd.read_parquet(whole).sort_values("id").reset_index(drop=True)
    by_pandas = pd.concat(map(pd.read_parquet, parts)).sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(by_pandas.drop(columns="logprobs"), expected.drop(columns="logprobs"))
    assert all(np.array_equal(a, b) for a, b in zip(by_pandas["logprobs"], expected["logprobs"]))
    pattern = str(tmp_path / "out" / "*.parquet")
    assert pl.read_parquet(pattern).height == 9
    assert duckdb.sql(f"SELECT count(*), count(DISTINCT id) FROM read_parquet('{pattern}')").fetchall() == [(9, 9)]


def test_shard_default_output_and_bad_shards(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    run = logprobs("extract", prompts, *SIM, "--shard", "1/2", calls=tmp_path / "c")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "p.shard-1-of-2.parquet").exists()
    for bad in ("2/2", "-1/2", "1", "a/b", "0/0"):
        wrong = logprobs("extract", prompts, *SIM, "--shard", bad, calls=tmp_path / "c")
        assert wrong.returncode == 2 and "--shard" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.parametrize("n", [1, 2, 5])
def test_shards_are_a_partition_that_ignores_order(n):
    from logprob_cli.endpoints._base import Prompt
    from logprob_cli.io._jsonl import select_shard

    prompts = [Prompt(id=f"id-{i}", line=i + 1, prompt="x") for i in range(200)]
    parts = [select_shard(prompts, i, n) for i in range(n)]
    assert sorted(p.id for part in parts for p in part) == sorted(p.id for p in prompts)
    shuffled = list(reversed(prompts))
    assert [{p.id for p in select_shard(shuffled, i, n)} for i in range(n)] == [{p.id for p in part} for part in parts]
    if n > 1:
        assert all(len(part) > 200 / n / 2 for part in parts)  # roughly balanced


def test_a_checkpoint_of_version_0_1_0_is_migrated_and_its_calls_count(tmp_path):
    import sqlite3

    from logprob_cli.endpoints._base import Answer
    from logprob_cli.run._journal import Journal

    path = tmp_path / "old.checkpoint.sqlite"
    with sqlite3.connect(path) as db:  # the 0.1.0 answers table: no usage columns
        db.execute("CREATE TABLE answers (prompt TEXT NOT NULL, seq INTEGER NOT NULL, query BLOB NOT NULL, "
                   "answer BLOB NOT NULL, PRIMARY KEY (prompt, seq)) WITHOUT ROWID")
        db.execute("INSERT INTO answers VALUES ('p', 0, x'00', ?)", (Answer(3, -0.5).to_bytes(),))
    with Journal.open(path, {"method": "topk"}) as journal:
        assert journal.spent().calls == 1
        journal.put_answers([("p", 1, b"\x01", Answer(4, -1.0, prompt_tokens=7, completion_tokens=1))])
        spent = journal.spent()
        assert (spent.calls, spent.prompt_tokens, spent.completion_tokens) == (2, 7, 1)
        assert journal.answers("p")[0][1] == Answer(3, -0.5)
