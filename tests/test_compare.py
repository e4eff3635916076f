"""`logprobs compare`: two outputs of `logprobs extract` on the built-in simulator, measured against each other.

The files are made by the command itself (in a subprocess, as a user runs it); the measures are checked against a
plain numpy computation from the vectors the files hold.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logprob_cli.io import CompareError, compare_files
from logprob_cli.io._compare import FULL_COVERAGE, compare_vectors

VOCAB = 1000


def logprobs(*args, timeout=300):
    """The `logprobs` command in a subprocess (200 columns wide, so that no line wraps); returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "logprob_cli.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"},
    )


def extract(prompts, out, *switches, method="topk"):
    sims = [arg for switch in (f"vocab_size={VOCAB}", *switches) for arg in ("--sim", switch)]
    run = logprobs("extract", prompts, "-o", out, "--method", method, "-q", *sims)
    assert run.returncode == 0, run.stderr
    return out


def write_prompts(path, ids):
    path.write_text("".join(json.dumps({"id": i, "prompt": f"prompt number {i}"}) + "\n" for i in ids))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Outputs of 40 prompts (two row groups): seed 0 twice, seed 1, `visible` (NULLs), another vocabulary size,
    seed 0 in reverse order with one id left out and one added."""
    d = tmp_path_factory.mktemp("compare")
    ids = [f"p{i}" for i in range(40)]
    prompts = write_prompts(d / "p.jsonl", ids)
    other = write_prompts(d / "other.jsonl", ["extra", *reversed(ids[1:])])
    return {
        "a": extract(prompts, d / "a.parquet"),
        "a2": extract(prompts, d / "a2.parquet", method="exact"),
        "seed1": extract(prompts, d / "seed1.parquet", "seed=1"),
        "visible": extract(prompts, d / "visible.parquet", method="visible"),
        "big": extract(write_prompts(d / "q.jsonl", ids[:2]), d / "big.parquet", "vocab_size=2000"),
        "reordered": extract(other, d / "reordered.parquet"),
    }


def vectors(path):
    table = pq.read_table(path, columns=["id", "logprobs"]).to_pylist()
    return {row["id"]: np.array([math.nan if v is None else v for v in row["logprobs"]]) for row in table}


def numpy_kl(a, b):
    """KL(p||q) of the two vectors, each renormalized over their common recovered tokens."""
    both = ~np.isnan(a) & ~np.isnan(b)
    p, q = np.exp(a[both]), np.exp(b[both])
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def test_the_same_model_twice_agrees(files):
    comparison = compare_files(files["a"], files["a2"])
    assert len(comparison.prompts) == 40 and not comparison.only_in_a and not comparison.only_in_b
    summary = comparison.summary()
    assert summary["top1_agreement"] == 1.0 and summary["partial"] == 0
    assert summary["kl_ab"]["max"] < 1e-9 and summary["kl_ba"]["max"] < 1e-9
    assert summary["max_abs_diff"]["max"] < 1e-4, "topk and exact agree to the engine's rounding"
    identical = compare_files(files["a"], files["a"]).summary()
    assert identical["kl_ab"]["max"] == 0 and identical["total_variation"]["max"] == 0


def test_two_models_differ_as_numpy_computes(files):
    comparison = compare_files(files["a"], files["seed1"], floor=1e-3)
    a, b = vectors(files["a"]), vectors(files["seed1"])
    for p in comparison.prompts:
        x, y = a[p.id], b[p.id]
        assert p.kl_ab > 1 and p.kl_ab == pytest.approx(numpy_kl(x, y), rel=1e-9)
        assert p.kl_ba == pytest.approx(numpy_kl(y, x), rel=1e-9)
        px, py = np.exp(x) / np.exp(x).sum(), np.exp(y) / np.exp(y).sum()
        assert p.total_variation == pytest.approx(0.5 * np.abs(px - py).sum(), rel=1e-9)
        above = (np.exp(x) > 1e-3) | (np.exp(y) > 1e-3)
        diffs = np.where(above, np.abs(x - y), -1)
        assert p.max_abs_diff == pytest.approx(diffs.max()) and p.max_diff_token == int(diffs.argmax())
        assert p.top1_agree == (np.argmax(x) == np.argmax(y))
        assert not p.partial and p.tokens_compared == VOCAB
    assert comparison.summary()["top1_agreement"] < 1


def test_unrecovered_tokens_make_a_partial_comparison(files):
    comparison = compare_files(files["a"], files["visible"])
    visible = vectors(files["visible"])
    for p in comparison.prompts:
        recovered = ~np.isnan(visible[p.id])
        assert p.tokens_compared == recovered.sum() < VOCAB
        assert p.covered_b == pytest.approx(np.exp(visible[p.id][recovered]).sum(), rel=1e-12)
        assert p.partial == (min(p.covered_a, p.covered_b) < FULL_COVERAGE)
        assert p.kl_ab < 1e-9 and p.top1_agree, "visible's top-k values are exact"
    assert comparison.summary()["partial"] > 0, "the simulator's tail holds more than 0.001 beyond the top 20"


def test_rows_on_one_side_are_listed_and_order_does_not_matter(files):
    comparison = compare_files(files["a"], files["reordered"])
    assert comparison.only_in_a == ["p0"] and comparison.only_in_b == ["extra"]
    assert [p.id for p in comparison.prompts] == [f"p{i}" for i in range(1, 40)]
    assert comparison.summary()["kl_ab"]["max"] == 0, "each row is joined to its own id across row groups"


def test_zero_probability_against_mass_is_infinite():
    a = np.array([math.log(0.5), math.log(0.5), -math.inf])
    b = np.log(np.array([0.5, 0.25, 0.25]))
    p = compare_vectors(a, b)
    assert p.kl_ab == pytest.approx(0.5 * math.log(2)) and p.kl_ba == math.inf
    assert p.total_variation == pytest.approx(0.25)


def test_files_that_cannot_be_compared_are_refused(files, tmp_path):
    with pytest.raises(CompareError, match="1,000 tokens.*2,000"):
        compare_files(files["a"], files["big"])
    renamed = tmp_path / "renamed.parquet"
    table = pq.read_table(files["a"])
    meta = json.loads(table.schema.metadata[b"logprob_cli"])
    meta["vocabulary"]["name"] = "o200k_base"
    pq.write_table(table.replace_schema_metadata({b"logprob_cli": json.dumps(meta)}), renamed)
    with pytest.raises(CompareError, match="uses simulator.*o200k_base"):
        compare_files(files["a"], renamed)
    meta["vocabulary"]["name"] = f"server:{VOCAB}"  # a server's own ids: the name does not say which tokenizer
    pq.write_table(table.replace_schema_metadata({b"logprob_cli": json.dumps(meta)}), renamed)
    assert "compared by size only" in compare_files(files["a"], renamed).notes[0]
    unrelated = write_prompts(tmp_path / "u.jsonl", ["u1"])
    with pytest.raises(CompareError, match="no id in common"):
        compare_files(files["a"], extract(unrelated, tmp_path / "u.parquet"))
    targets = tmp_path / "targets.parquet"
    pq.write_table(pa.table({"id": ["p0"], "targets": [[{"id": 1, "logprob": -1.0}]]},
                            metadata={b"logprob_cli": json.dumps(meta)}), targets)
    with pytest.raises(CompareError, match="targets, not full vectors"):
        compare_files(files["a"], targets)
    with pytest.raises(CompareError, match="not written by `logprobs extract`"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
        compare_files(tmp_path / "plain.parquet", files["a"])


def test_cli_table_json_and_errors(files, tmp_path):
    table = logprobs("compare", files["a"], files["reordered"], "--top", "3")
    assert table.returncode == 0, table.stderr
    assert "39 prompts compared" in table.stdout and "top-1 agreement 100.0% (39 of 39)" in table.stdout
    assert "1 id only in A, not compared: p0" in table.stdout and "1 id only in B, not compared: extra" in table.stdout
    assert "the 3 prompts of largest KL shown of 39" in table.stdout
    partial = logprobs("compare", files["a"], files["visible"])
    assert "0*" in partial.stdout and "* partial" in partial.stdout
    data = json.loads(logprobs("compare", files["a"], files["seed1"], "--json", "--floor", "0.01").stdout)
    assert data["floor"] == 0.01 and len(data["prompts"]) == 40
    first = compare_files(files["a"], files["seed1"], floor=0.01).prompts[0]
    assert data["prompts"][0]["kl_ab"] == first.kl_ab and data["prompts"][0]["id"] == "p0"
    refused = logprobs("compare", files["a"], files["big"])
    assert refused.returncode == 2 and "different vocabularies" in refused.stderr and "Traceback" not in refused.stderr
    missing = logprobs("compare", files["a"], tmp_path / "none.parquet")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def positions_file(path, seed=0, completion=(300, 5, 999), ids=("a", "b")):
    """A file of positions (direct on the in-process simulator: every vector whole)."""
    from logprob_cli.endpoints import Prompt, SimulatedEndpoint, SimulatorConfig
    from logprob_cli.run import extract_batch

    sim = SimulatedEndpoint(SimulatorConfig(vocab_size=VOCAB, top_logprobs_cap=VOCAB, seed=seed))
    prompts = [Prompt(i, n, f"prompt {i}", completion_ids=completion) for n, i in enumerate(ids, 1)]
    assert extract_batch(prompts, path, sim, "direct").finished == len(ids) * (len(completion) + 1)
    return path


def test_files_of_positions_are_joined_by_id_and_position(tmp_path):
    a = positions_file(tmp_path / "a.parquet")
    b = positions_file(tmp_path / "b.parquet", seed=1, ids=("b", "a", "c"))  # another order, an id A lacks
    rows = {side: {(r["id"], r["position"]): np.array(r["logprobs"]) for r in pq.read_table(path).to_pylist()}
            for side, path in (("a", a), ("b", b))}
    comparison = compare_files(a, b)
    assert [(p.id, p.position) for p in comparison.prompts] == [(i, k) for i in "ab" for k in range(4)]
    for p in comparison.prompts:
        expected = numpy_kl(rows["a"][p.id, p.position], rows["b"][p.id, p.position])
        assert p.kl_ab == pytest.approx(expected, rel=1e-9) and p.kl_ab > 0.01
    assert comparison.only_in_b == [{"id": "c", "position": k} for k in range(4)] and comparison.only_in_a == []
    data = json.loads(logprobs("compare", a, b, "--json").stdout)
    assert [(p["id"], p["position"]) for p in data["prompts"]] == [(i, k) for i in "ab" for k in range(4)]
    table = logprobs("compare", a, b)
    assert table.returncode == 0 and "a @3" in table.stdout and "4 ids only in B, not compared: c @0, c @1" in table.stdout


def test_positions_against_no_positions_or_another_context_are_refused(tmp_path):
    a = positions_file(tmp_path / "a.parquet")
    plain = extract(write_prompts(tmp_path / "p.jsonl", ["a", "b"]), tmp_path / "plain.parquet")
    with pytest.raises(CompareError, match=r"a\.parquet holds positions of completions .* and \S*plain\.parquet does not"):
        compare_files(a, plain)
    with pytest.raises(CompareError, match="holds positions of completions"):
        compare_files(plain, a)
    other = positions_file(tmp_path / "other.parquet", completion=(300, 6, 999))
    with pytest.raises(CompareError, match="@2 has another context .*same completions"):
        compare_files(a, other)
    refused = logprobs("compare", plain, a)
    assert refused.returncode == 2 and "does not" in refused.stderr and "Traceback" not in refused.stderr


def test_tokens_show_as_text_where_the_runs_vocabulary_is_on_this_machine(tmp_path):
    """A tokenizer.json the run named (--tokenizer PATH, an hf: folder) gives texts; a server's ids stay ids."""
    from logprob_cli.io._parquet import token_text
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "Ġcat": 1, "<s>": 2}},
                                     "added_tokens": [{"id": 2, "content": "<s>", "special": True}],
                                     "decoder": {"type": "ByteLevel"}}))
    for name in (str(tokenizer), f"hf:{tmp_path}"):
        text = token_text({"vocabulary": {"name": name}})
        assert (text(1), text(0), text(2), text(3)) == ("' cat'", "'a'", "#2", "#3")  # <s> is special: no text
    assert token_text({"vocabulary": {"name": "server:3"}})(1) == "#1"
    assert token_text({"vocabulary": {"name": str(tmp_path / "gone.json")}})(1) == "#1"
