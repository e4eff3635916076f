"""`store` top:N (issue 11, part 3): each row's N most likely tokens and the rest mass instead of the whole vector,
checked against the vector file of the same run (the simulator computes in float32, as engines do)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from typer.testing import CliRunner

from logprob_cli import cli
from logprob_cli.endpoints import Prompt, SettingsError, SimulatedEndpoint, SimulatorConfig
from logprob_cli.io import compare_files, read_metadata, read_prompts, render_inspect
from logprob_cli.run import RunConfig, extract_batch

EXAMPLES = Path(__file__).parent.parent / "examples" / "prompts.jsonl"
BIG = SimulatorConfig(vocab_size=100_000, top_logprobs_cap=100_000)  # `direct` reads the whole vector in one call
N = 20


def new_calls(summary) -> int:
    return summary.spent().minus(summary.spent_before).calls


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The six example prompts at V = 100,000: the vector file, then the same output resumed with top:20 (a copy of
    each kept), with the calls each run spent."""
    d = tmp_path_factory.mktemp("store")
    prompts = read_prompts(str(EXAMPLES))
    out = d / "out.parquet"
    first = extract_batch(prompts, out, SimulatedEndpoint(BIG), "direct")
    shutil.copy(out, d / "vector.parquet")
    second = extract_batch(prompts, out, SimulatedEndpoint(BIG), RunConfig("direct", store=f"top:{N}"))
    shutil.copy(out, d / "top.parquet")
    return {"dir": d, "out": out, "prompts": prompts, "first": first, "second": second,
            "vector": d / "vector.parquet", "top": d / "top.parquet"}


def test_a_top_file_is_far_smaller_than_the_vector_file(runs):
    assert len(runs["prompts"]) == 6 and runs["first"].finished == 6
    vector, top = runs["vector"].stat().st_size, runs["top"].stat().st_size
    assert vector > 1_000_000 and top < vector / 100, (vector, top)
    assert "logprobs" not in pq.read_schema(runs["top"]).names
    assert read_metadata(runs["top"])["store"] == f"top:{N}" and read_metadata(runs["vector"])["store"] == "vector"


def test_the_top_entries_are_the_vectors_n_largest_best_first_and_rest_mass_is_what_numpy_gives(runs):
    vectors = pq.read_table(runs["vector"]).to_pylist()
    tops = pq.read_table(runs["top"]).to_pylist()
    assert [r["id"] for r in tops] == [r["id"] for r in vectors]
    for full, top in zip(vectors, tops):
        vector = np.array(full["logprobs"], dtype=np.float32)
        expected = np.argsort(-vector, kind="stable")[:N]
        assert top["top_ids"] == expected.tolist()
        assert top["top_logprobs"] == vector[expected].tolist()  # the same float32 values, best first
        rest = 1.0 - np.exp(np.array(top["top_logprobs"], dtype=np.float64)).sum()
        assert top["rest_mass"] == pytest.approx(max(rest, 0.0), abs=1e-12) and 0 < top["rest_mass"] < 1
        for name in ("calls", "probability_sum", "unrecovered_count", "unrecovered_mass_bound", "precision_nats"):
            assert top[name] == full[name]
        assert "unrecovered_ids" not in top


def test_resuming_with_another_store_rewrites_the_output_without_a_call(runs):
    assert new_calls(runs["first"]) > 0 and new_calls(runs["second"]) == 0 and runs["second"].finished == 6
    back = extract_batch(runs["prompts"], runs["out"], SimulatedEndpoint(BIG), "direct")  # store vector again
    assert new_calls(back) == 0
    assert pq.read_table(runs["out"]).equals(pq.read_table(runs["vector"]))


def test_rest_mass_is_clamped_at_zero_when_the_top_holds_everything(tmp_path):
    small = SimulatorConfig(vocab_size=300, top_logprobs_cap=300)
    extract_batch([Prompt(1, 1, "x")], tmp_path / "o.parquet", SimulatedEndpoint(small), RunConfig("direct", store="top:300"))
    row = pq.read_table(tmp_path / "o.parquet").to_pylist()[0]
    assert sorted(row["top_ids"]) == list(range(300))
    assert row["rest_mass"] == max(0.0, 1.0 - math.fsum(np.exp(np.array(row["top_logprobs"], np.float64))))
    assert 0 <= row["rest_mass"] < 1e-6


@pytest.mark.parametrize("store", ["top:0", "top:-3", "top:", "top", "top:1.5", "top:ten", "top: 5", "Vector", "", 5, None])
def test_a_store_that_does_not_read_vector_or_top_n_is_refused(store):
    with pytest.raises(SettingsError, match="store must be \"vector\" or \"top:N\""):
        RunConfig(store=store)


def test_a_top_n_beyond_the_vocabulary_is_refused_before_any_call(tmp_path):
    small = SimulatorConfig(vocab_size=300, top_logprobs_cap=300)
    with pytest.raises(SettingsError, match=r"store top:301 keeps more tokens than the vocabulary holds \(300\)"):
        extract_batch([Prompt(1, 1, "x")], tmp_path / "o.parquet", SimulatedEndpoint(small), "direct", store="top:301")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_names_the_flag_and_exits_2(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(cli.app, ["extract", str(prompts), "--store", "top:0", "-q"])
    assert result.exit_code == 2 and "--store must be" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli.app, ["extract", str(prompts), "--store", "top:1001", "--sim", "vocab_size=1000", "-q"])
    assert result.exit_code == 2 and "--store top:1001 keeps more tokens" in result.output
    assert not (tmp_path / "p.checkpoint.sqlite").exists()


def test_with_targets_top_n_is_how_many_top_entries_a_row_keeps(tmp_path):
    prompts = [Prompt(1, 1, "x", target_ids=(7, 99)), Prompt(2, 2, "y", target_ids=(7, 99))]
    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=1000, top_logprobs_cap=1000))
    extract_batch(prompts, tmp_path / "t.parquet", sim, "direct", store="top:3")
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    for prompt, row in zip(prompts, rows):
        truth = sim.true_logprobs(prompt.prompt).astype(np.float32)
        assert row["top_ids"] == np.argsort(-truth, kind="stable")[:3].tolist()
        assert [t["logprob"] for t in row["targets"]] == pytest.approx(truth[[7, 99]].tolist(), abs=1e-5)
        assert row["rest_mass"] == pytest.approx(1 - np.exp(np.array(row["top_logprobs"], np.float64)).sum(), abs=1e-12)
    meta = read_metadata(tmp_path / "t.parquet")
    assert meta["store"] == "top:3" and meta["targets"] is True and meta["store_vector"] is False


def test_store_vector_keeps_the_vector_beside_the_top(tmp_path):
    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=1000, top_logprobs_cap=1000))
    extract_batch([Prompt(1, 1, "x")], tmp_path / "b.parquet", sim, "direct", store="top:4", store_vector=True)
    row = pq.read_table(tmp_path / "b.parquet").to_pylist()[0]
    vector = np.array(row["logprobs"], np.float32)
    assert row["top_ids"] == np.argsort(-vector, kind="stable")[:4].tolist() and row["unrecovered_ids"] == []


def test_inspect_reads_a_top_file(runs):
    console = Console(record=True, width=100)
    render_inspect(runs["top"], console, top=3)
    text = console.export_text()
    assert "6 rows" in text and "rest" in text and f"top:{N}" in text
    first = pq.read_table(runs["top"]).to_pylist()[0]
    assert f"{first['rest_mass']:.2g}" in text


def test_compare_measures_a_top_file_over_the_shared_top_tokens_and_marks_it_partial(runs):
    vectors = {r["id"]: r for r in pq.read_table(runs["vector"]).to_pylist()}
    tops = {r["id"]: r for r in pq.read_table(runs["top"]).to_pylist()}
    comparison = compare_files(runs["vector"], runs["top"])
    assert len(comparison.prompts) == 6 and any("top 20 tokens only" in note for note in comparison.notes)
    for p in comparison.prompts:
        top = tops[p.id]
        assert p.tokens_compared == N and p.top1_agree and p.top1_b == top["top_ids"][0]
        assert p.kl_ab == pytest.approx(0, abs=1e-12) and p.total_variation == pytest.approx(0, abs=1e-12)
        assert p.covered_b == pytest.approx(1 - top["rest_mass"], abs=1e-9)
        assert p.partial == (min(p.covered_a, p.covered_b) < 0.999)
        assert p.covered_a == pytest.approx(np.exp(np.array(vectors[p.id]["logprobs"], np.float64)[top["top_ids"]]).sum())
    assert any(p.partial for p in comparison.prompts)
    json.dumps(comparison.to_dict(), allow_nan=False)
