"""Chosen tokens before any call: texts resolved to one token each by bytes, every problem at once with its line."""

from __future__ import annotations

import asyncio

import pytest

from logprob_cli.endpoints import Prompt, SimulatedEndpoint, SimulatorConfig
from logprob_cli.endpoints._simulator import simulator_token_bytes
from logprob_cli.io import InputError
from logprob_cli.run._probe import expected_calls, probe
from logprob_cli.run._targets import resolve_targets

ENDPOINT = SimulatedEndpoint(SimulatorConfig(vocab_size=20_000))
ONE = simulator_token_bytes(5000).decode()  # exactly one token's bytes


def resolve(*targets_per_line):
    prompts = [Prompt(id=n, line=n + 1, prompt="Hi", targets=tuple(t)) for n, t in enumerate(targets_per_line)]
    return asyncio.run(resolve_targets(ENDPOINT, prompts))


def test_texts_and_ids_resolve_in_the_order_given():
    (prompt,) = resolve([ONE, 7, 19_999])
    assert prompt.target_ids == (5000, 7, 19_999)


def test_every_problem_is_reported_with_its_line_and_the_split_shown():
    with pytest.raises(InputError) as caught:
        resolve([ONE + ONE], [20_000], [ONE, 5000])
    problems = caught.value.problems
    assert len(problems) == 3
    assert problems[0].startswith("line 1:") and "2 tokens" in problems[0] and "(5000) + " in problems[0]
    assert problems[1].startswith("line 2:") and "outside the vocabulary" in problems[1]
    assert problems[2].startswith("line 3:") and "same token (id 5000)" in problems[2]


def test_an_endpoint_without_a_tokenizer_asks_for_ids():
    class NoTokenizer(SimulatedEndpoint):
        async def split_text(self, text):  # the contract's default
            return await super(SimulatedEndpoint, self).split_text(text)

    prompts = [Prompt(id=0, line=1, prompt="Hi", targets=("x",))]
    with pytest.raises(Exception, match="give token ids"):
        asyncio.run(resolve_targets(NoTokenizer(SimulatorConfig(vocab_size=20_000)), prompts))


def test_the_probe_observes_listed_ids_only_where_the_endpoint_takes_them():
    prompt = Prompt(id=0, line=1, prompt="Hi")
    taking = asyncio.run(probe(SimulatedEndpoint(SimulatorConfig(vocab_size=5_000, chosen_ids=64)), prompt))
    assert taking.chosen_ids and taking.limits().token_ids == 64
    assert taking.calls == expected_calls(taking)
    plain = asyncio.run(probe(SimulatedEndpoint(SimulatorConfig(vocab_size=5_000)), prompt))
    assert not plain.chosen_ids and plain.limits().token_ids == 0
    assert plain.calls == expected_calls(plain) == taking.calls - 1
