"""--image auto (run/_learning.py, methods/_image.py's Learner): the image learned from the run's first whole
vectors, then the image method; checked against the simulator's ground truth, on a served model never seen before,
with another model answering under the same name mid-run, and across interruptions."""

import asyncio
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from typer.testing import CliRunner

from logprob_cli.api import extract_file, extract_logprobs
from logprob_cli.cli import app
from logprob_cli.endpoints import Prompt, SettingsError, SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._openai_compatible import OpenAIEndpoint
from logprob_cli.endpoints._vocabulary import load_vocabulary
from logprob_cli.io import read_metadata
from logprob_cli.methods import SPECS, Image
from logprob_cli.methods._image import CHECKS, MARGIN, Learner, learning_prompts
from logprob_cli.run import RunConfig, estimate_run, probe
from logprob_cli.run._journal import reading_connection
from logprob_cli.server import ServerConfig, SimulatorServer


def prompts_file(tmp_path, count: int, name: str = "p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": i, "prompt": f"prompt number {i}"}) + "\n" for i in range(count)))
    return path


def rows_of(path):
    return sorted(pq.read_table(path).to_pylist(), key=lambda row: row["id"])


def error(row, truth: SimulatedEndpoint, chat: bool = False) -> float:
    """The row's largest error against the simulator's truth for its prompt (sent as one user message: `chat`)."""
    content = [{"role": "user", "content": row["prompt"]}] if chat else row["prompt"]
    return float(np.abs(np.array(row["logprobs"], dtype=float) - truth.true_logprobs(content)).max())


def test_the_learner_finds_the_rank_from_the_vectors_alone():
    config = SimulatorConfig(vocab_size=3000, hidden_size=16)
    truth = SimulatedEndpoint(config)
    learner = Learner(config.vocab_size)
    for n in range(1, 200):
        vector = truth.true_logprobs(f"prompt number {n}").astype(np.float32)
        image = learner.add(vector, 2e-5, "test")
        if image is not None:
            break
    assert image.rank == 16 + 2  # W's 16 columns, the unigram term, the ones vector: never told
    assert n == learning_prompts(image.rank)
    fresh = truth.true_logprobs("a prompt it never saw")
    assert np.abs(image.basis @ (image.basis.T @ fresh) - fresh).max() < 1e-4
    with pytest.raises(ValueError, match="whole vectors"):
        learner.add(np.full(config.vocab_size, np.nan), 2e-5, "test")


def test_topk_learns_the_image_then_reads_about_r_tokens_a_prompt(tmp_path):
    """The issue's first check at V = 5,000 (the V = 100,000 figures: benchmarks/image_calls.py): after the warm-up,
    topk with the image spends 2 (its bias check) + ceil((r + MARGIN + CHECKS) / (k - 1)) calls, the r + MARGIN
    fit reads within 1.2 x ceil((d + 2) / (k - 1)) calls, every token within 1e-4 nats; rows finished with the
    image are marked topk+image, the others topk; the metadata says where the image came from."""
    config = SimulatorConfig(vocab_size=5000)
    rank = 64 + 2
    count = learning_prompts(rank) + 60  # 60 more: prompts in flight at the switch (16 workers) still finish whole
    summary = extract_file(prompts_file(tmp_path, count), method="topk+image", image="auto", simulator=config)
    assert summary.finished == count and not summary.failures
    rows = rows_of(tmp_path / "p.parquet")
    truth = SimulatedEndpoint(config)
    assert max(error(row, truth) for row in rows) < 1e-4
    imaged = [row for row in rows if row["method"] == "topk+image"]
    whole = [row for row in rows if row["method"] == "topk"]
    assert len(imaged) >= 20 and len(whole) >= learning_prompts(rank)
    assert {row["calls"] for row in whole} == {SPECS["topk"].calls(5000, 20, 1e-3, truth.limits)}
    fit_calls = math.ceil((rank + MARGIN) / 19)
    assert fit_calls <= 1.2 * math.ceil((64 + 2) / 19)
    assert {row["calls"] for row in imaged} == {2 + math.ceil((rank + MARGIN + CHECKS) / 19)}  # 7; plain topk: 265
    meta = read_metadata(tmp_path / "p.parquet")
    assert meta["settings"]["image"] == {"source": "auto"}
    assert meta["image"]["learned"] and meta["image"]["rank"] == rank
    assert meta["image"]["prompts"] >= learning_prompts(rank)
    assert "learned from this run" in meta["image"]["source"]


def test_a_served_model_never_seen_costs_well_under_a_third_of_plain_topk(tmp_path):
    """The issue's second check: an OpenAI-compatible server, logprobs after the bias, an output layer with an
    offset (the simulator's unigram term u: z = W h + u) and a seed and size no test uses elsewhere; 200 prompts."""
    sim = SimulatorConfig(vocab_size=3000, hidden_size=24, seed=7)
    with SimulatorServer(ServerConfig(sim)) as server:
        endpoint = OpenAIEndpoint("simulator", load_vocabulary("simulator:3000"), base_url=server.url)
        summary = extract_file(prompts_file(tmp_path, 200), method="auto", image="auto", endpoint=endpoint)
    assert summary.finished == 200
    plain = 200 * SPECS["topk"].calls(3000, 20, 1e-3, SimulatedEndpoint(sim).limits)
    assert summary.spent().calls < plain / 3  # measured: about 0.22 of plain topk's 31,800
    rows = rows_of(tmp_path / "p.parquet")
    truth = SimulatedEndpoint(sim)
    assert max(error(row, truth, chat=True) for row in rows) < 1e-4  # plain topk's rows are within 2e-5 here
    assert read_metadata(tmp_path / "p.parquet")["image"]["rank"] == 24 + 2


class SwappedModel(SimulatedEndpoint):
    """Answers prompts numbered `from_id` and above with another model (seed 1) under the same name."""

    def __init__(self, config: SimulatorConfig, from_id: int):
        super().__init__(config)
        self.other = SimulatedEndpoint(SimulatorConfig(**{**config.__dict__, "seed": 1}))
        self.from_id = from_id

    def answer(self, prompt, query):
        return self.other.answer(prompt, query) if int(prompt.id) >= self.from_id else super().answer(prompt, query)


def test_another_model_mid_run_falls_back_on_every_affected_row_and_none_is_wrong(tmp_path):
    config = SimulatorConfig(vocab_size=3000, hidden_size=16)
    count = learning_prompts(18) + 30
    swap = count - 20
    endpoint = SwappedModel(config, swap)
    summary = extract_file(prompts_file(tmp_path, count), method="topk+image", image="auto", endpoint=endpoint,
                           concurrency=1)
    assert summary.finished == count
    rows = rows_of(tmp_path / "p.parquet")
    before, after = SimulatedEndpoint(config), endpoint.other
    for row in rows:
        assert error(row, after if row["id"] >= swap else before) < 1e-4
    swapped = [row for row in rows if row["id"] >= swap]
    assert all(row["method"] == "topk" and any("did not fit" in note for note in row["notes"]) for row in swapped)
    assert any(row["method"] == "topk+image" for row in rows if row["id"] < swap)


def test_a_resumed_run_rebuilds_the_same_image_and_spends_nothing_twice(tmp_path):
    """Two stops (one during the warm-up, one inside an image prompt), then the rest: the same image, rows and
    calls as one run without a stop."""
    config = SimulatorConfig(vocab_size=3000, hidden_size=16)
    count = learning_prompts(18) + 10
    whole = SPECS["topk"].calls(3000, 20, 1e-3, SimulatedEndpoint(config).limits)
    run = dict(method="topk+image", image="auto", simulator=config, concurrency=1)
    straight = extract_file(prompts_file(tmp_path, count, "a.jsonl"), **run)
    stopped = prompts_file(tmp_path, count, "b.jsonl")
    first = extract_file(stopped, max_calls=10 * whole + 5, **run)
    assert first.budget_reached
    second = extract_file(stopped, max_calls=learning_prompts(18) * whole + 4, **run)
    assert second.budget_reached
    last = extract_file(stopped, **run)
    assert last.finished == count and last.spent().calls == straight.spent().calls
    learned = [reading_connection(tmp_path / f"{name}.checkpoint.sqlite").get_meta("image_learned") for name in "ab"]
    assert learned[0] == learned[1]
    a, b = rows_of(tmp_path / "a.parquet"), rows_of(tmp_path / "b.parquet")
    assert [(r["method"], r["calls"], r["logprobs"]) for r in a] == [(r["method"], r["calls"], r["logprobs"]) for r in b]


def test_image_auto_is_refused_where_it_cannot_learn():
    with pytest.raises(SettingsError, match="takes a file"):
        RunConfig("topk+image", image="sometimes")
    with pytest.raises(SettingsError, match="used only by the image methods"):
        RunConfig("topk", image="auto")
    with pytest.raises(SettingsError, match="one prompt has none"):
        extract_logprobs("Hello", method="topk+image", image="auto")


class UnknownRank(SimulatedEndpoint):
    """The simulator as an endpoint whose image's rank is not known before the run (any remote model)."""

    def __init__(self, config: SimulatorConfig):
        super().__init__(config)
        self.image_rank = None


def test_estimate_prices_the_warm_up_then_the_image_method():
    config = SimulatorConfig(vocab_size=5000)
    prompts = [Prompt(i, i, prompt=f"prompt number {i}") for i in range(300)]
    whole = SPECS["topk"].calls(5000, 20, 1e-3, SimulatedEndpoint(config).limits)
    imaged = SPECS["topk+image"].calls(5000, 20, 1e-3, SimulatedEndpoint(config).limits, rank=66)
    (row,) = estimate_run(prompts, SimulatedEndpoint(config), "topk+image", learn_image=True)
    assert row.learning_prompts == learning_prompts(66) == 98
    assert row.calls == 98 * whole + (300 - 98) * imaged
    (auto,) = estimate_run(prompts, SimulatedEndpoint(config), "auto", learn_image=True,
                           report=asyncio.run(probe(SimulatedEndpoint(config), prompts[0])))
    assert auto.method == "topk+image" and auto.learning_prompts == 98
    (unknown,) = estimate_run(prompts, UnknownRank(config), "topk+image", learn_image=True)
    assert unknown.learning_prompts is None and unknown.calls == 300 * whole  # the most it spends


def test_the_estimate_command_says_when_learning_pays(tmp_path):
    path = prompts_file(tmp_path, 150)
    shown = CliRunner().invoke(app, ["estimate", str(path), "--method", "topk+image", "--image", "auto",
                                     "--sim", "vocab_size=5000"], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert "image learned after ~98 prompts" in shown.output and "it pays from 99 prompts on" in shown.output


def test_the_learner_always_wants_a_vector_until_its_image_is_ready():
    """A direction found late, after vectors that added none, must not leave the run waiting for none (a run
    starts no whole vector while as many are in flight as the learner wants)."""
    rng = np.random.default_rng(0)
    columns = rng.standard_normal((400, 6))
    learner = Learner(400)
    for step in range(6):
        for _ in range(7):  # in the span found so far: no new direction
            assert learner.add(columns[:, :step] @ rng.standard_normal(step), 1e-9, "test") is None
            assert learner.wanted() >= 1
        assert learner.add(columns[:, step], 1e-9, "test") is None and learner.wanted() >= 1
    for _ in range(learner.settle(7) - 1):
        assert learner.add(columns @ rng.standard_normal(6), 1e-9, "test") is None and learner.wanted() >= 1
    assert learner.add(columns @ rng.standard_normal(6), 1e-9, "test").rank == 7


def test_auto_runs_the_image_method_where_an_image_is_given_and_cheaper():
    config = SimulatorConfig(vocab_size=3000, hidden_size=16)
    image = Image.from_matrix(SimulatedEndpoint(config).sim.output_matrix(), "simulator")
    one = extract_logprobs("prompt number 1", image=image, simulator=config)
    assert one.method == "topk+image" and one.calls < 30  # the probe's calls and 5; plain topk: 159
    truth = SimulatedEndpoint(config).true_logprobs("prompt number 1")
    assert np.abs(one.logprobs - truth).max() < 1e-4
    few = extract_logprobs("prompt number 1", image=image, simulator=config, targets=[5, 6])
    assert few.method == "topk"  # two tokens read directly are cheaper than the image's r + 16
