"""The input and output side of chosen tokens ("targets"): JSONL, the Python API's prompts, the checkpoint, Parquet."""

import json

from logprob_cli.endpoints._base import Prompt
from logprob_cli.run._journal import prompt_key

# keys computed before targets existed: a checkpoint of a run without targets must keep resuming
PINNED_KEYS = {
    "e0d96bbbbbb9b4966794ec4c": Prompt(1, 1, "The capital of France is"),
    "c8d540790061e5896b07fb67": Prompt("a", 3, messages=[{"role": "user", "content": "Bonjour ✓"}]),
}


def test_prompt_key_without_targets_is_unchanged():
    for key, prompt in PINNED_KEYS.items():
        assert prompt_key(prompt) == key


# ---- input: the "targets" key of a JSONL line, the Python API's prompts, one target set for a batch ----

import pytest

from logprob_cli.errors import Worded
from logprob_cli.io import InputError, check_prompts, read_prompts, with_targets
from logprob_cli.io._preflight import MAX_TARGETS


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
