import io
import json

import pytest

from logprob_cli.endpoints._base import Prompt
from logprob_cli.io._jsonl import InputError, read_prompts


def write(tmp_path, *lines: str, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def problems_of(tmp_path, *lines: str) -> list[str]:
    with pytest.raises(InputError) as caught:
        read_prompts(write(tmp_path, *lines))
    return caught.value.problems


def use_stdin(monkeypatch, data: bytes):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
PARTS = [{"role": "user", "content": [{"type": "text", "text": "Describe"}]}]


def test_valid_mixed_file(tmp_path):
    path = write(
        tmp_path,
        json.dumps({"prompt": "The capital of France is", "topic": "geo", "n": 1}),
        "",
        "   \t",
        json.dumps({"messages": CHAT, "z": None, "a": [1, 2]}),
        json.dumps({"id": 9, "messages": PARTS}),
        json.dumps({"prompt": "  padded  ", "id": 10}),
    )
    assert read_prompts(path) == [
        Prompt(id=1, line=1, prompt="The capital of France is", extra={"topic": "geo", "n": 1}),
        Prompt(id=4, line=4, messages=CHAT, extra={"z": None, "a": [1, 2]}),
        Prompt(id=9, line=5, messages=PARTS),
        Prompt(id=10, line=6, prompt="  padded  "),
    ]
    assert list(read_prompts(path)[1].extra) == ["z", "a"]


def test_string_ids_make_string_default_ids(tmp_path):
    path = write(tmp_path, '{"prompt": "a"}', '{"id": "x", "prompt": "b"}', '{"prompt": "c"}')
    assert [(p.id, p.line) for p in read_prompts(path)] == [("1", 1), ("x", 2), ("3", 3)]


def test_accepts_str_path_crlf_and_byte_order_mark(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    assert [(p.id, p.prompt) for p in read_prompts(str(path))] == [(1, "a"), (2, "b")]


def test_reads_stdin(monkeypatch):
    use_stdin(monkeypatch, b'\n{"id": "q", "prompt": "caf\xc3\xa9"}\n')
    assert read_prompts("-") == [Prompt(id="q", line=2, prompt="café")]


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"prompt": "a" "b"}', "invalid JSON: Expecting ',' delimiter (column 16)"),
        ('{"prompt": ', "invalid JSON: Expecting value (column 12)"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ("42", "expected a JSON object, got an integer"),
        ('"just text"', "expected a JSON object, got a string"),
        ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', 'give either "prompt" or "messages", not both'),
        ('{"id": 3, "text": "a"}', 'missing prompt: give "prompt" or "messages"'),
        ('{"prompt": 5}', '"prompt" must be a string, got an integer'),
        ('{"prompt": ["a"]}', '"prompt" must be a string, got an array'),
        ('{"prompt": ""}', '"prompt" is empty'),
        ('{"prompt": " \\n\\t"}', '"prompt" is empty'),
        ('{"messages": "hi"}', '"messages" must be an array of messages, got a string'),
        ('{"messages": []}', '"messages" is empty'),
        ('{"messages": ["hi"]}', 'messages[0] must be an object with "role" and "content", got a string'),
        ('{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}', 'messages[1]: "role" is missing'),
        ('{"messages": [{"role": 1, "content": "a"}]}', 'messages[0]: "role" must be a string, got an integer'),
        ('{"messages": [{"role": "user"}]}', 'messages[0]: "content" is missing'),
        (
            '{"messages": [{"role": "user", "content": {"text": "a"}}]}',
            'messages[0]: "content" must be a string or an array of content parts, got an object',
        ),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "  "}]}', 'messages[1]: "content" is empty'),
        ('{"messages": [{"role": "user", "content": []}]}', 'messages[0]: "content" is empty'),
        ('{"id": true, "prompt": "a"}', '"id" must be an integer or a non-empty string, got a boolean'),
        ('{"id": 1.0, "prompt": "a"}', '"id" must be an integer or a non-empty string, got a decimal number'),
        ('{"id": null, "prompt": "a"}', '"id" must be an integer or a non-empty string, got null'),
        ('{"id": [1], "prompt": "a"}', '"id" must be an integer or a non-empty string, got an array'),
        ('{"id": "", "prompt": "a"}', '"id" is empty'),
        ('{"id": " ", "prompt": "a"}', '"id" is empty'),
    ],
)
def test_each_bad_line_is_reported_with_its_line_number(tmp_path, line, problem):
    assert problems_of(tmp_path, '{"prompt": "fine"}', "", line, '{"prompt": "fine too"}') == [f"line 3: {problem}"]


def test_every_message_problem_is_listed(tmp_path):
    line = '{"messages": [{"role": 1}, 7, {"role": "user", "content": ""}]}'
    assert problems_of(tmp_path, line) == [
        'line 1: messages[0]: "role" must be a string, got an integer',
        'line 1: messages[0]: "content" is missing',
        'line 1: messages[1] must be an object with "role" and "content", got an integer',
        'line 1: messages[2]: "content" is empty',
    ]


def test_mixed_id_types_reported_once_on_first_differing_line(tmp_path):
    lines = ['{"prompt": "a"}', '{"id": "a", "prompt": "a"}', '{"id": "b", "prompt": "b"}', '{"id": 4, "prompt": "c"}', '{"id": 5, "prompt": "d"}']
    assert problems_of(tmp_path, *lines) == [
        "line 4: id 4 is an integer but the id on line 2 is a string; give all ids the same type"
    ]


def test_duplicate_given_ids_name_both_lines(tmp_path):
    lines = ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"}', '{"id": "a", "prompt": "z"}', '{"id": "a", "prompt": "w"}']
    assert problems_of(tmp_path, *lines) == [
        'line 3: duplicate id "a" (already used on line 1)',
        'line 4: duplicate id "a" (already used on line 1)',
    ]


def test_given_id_colliding_with_a_default_id_names_both_lines(tmp_path):
    hint = 'a line without "id" gets its line number'
    assert problems_of(tmp_path, '{"id": 3, "prompt": "x"}', '{"prompt": "y"}', '{"prompt": "z"}') == [
        f"line 3: duplicate id 3 (already used on line 1; {hint})"
    ]
    assert problems_of(tmp_path, '{"prompt": "x"}', '{"id": "1", "prompt": "y"}') == [
        f'line 2: duplicate id "1" (already used on line 1; {hint})'
    ]


def test_problems_from_the_whole_file_are_collected_in_line_order(tmp_path):
    lines = [
        '{"id": 2, "prompt": "ok"}',
        '{"prompt": "ok"}',
        "not json",
        "",
        '{"prompt": ""}',
        '{"id": "x", "messages": []}',
    ]
    assert problems_of(tmp_path, *lines) == [
        "line 2: duplicate id 2 (already used on line 1; a line without \"id\" gets its line number)",
        "line 3: invalid JSON: Expecting value (column 1)",
        'line 5: "prompt" is empty',
        'line 6: "messages" is empty',
        "line 6: id \"x\" is a string but the id on line 1 is an integer; give all ids the same type",
    ]


def test_message_lists_first_twenty_problems_then_a_count(tmp_path):
    path = write(tmp_path, *['{"prompt": 1}'] * 25)
    with pytest.raises(InputError) as caught:
        read_prompts(path)
    text = str(caught.value).splitlines()
    assert len(caught.value.problems) == 25
    assert text[0] == f"{path}: 25 problems"
    assert text[1:21] == [f'  line {n}: "prompt" must be a string, got an integer' for n in range(1, 21)]
    assert text[21:] == ["  ... and 5 more"]


def test_single_problem_message_names_the_file(tmp_path):
    path = write(tmp_path, '{"prompt": "a"}', "{")
    with pytest.raises(InputError) as caught:
        read_prompts(path)
    assert str(caught.value) == f"{path}: 1 problem\n  line 2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"


def test_stdin_problems_are_named_stdin(monkeypatch):
    use_stdin(monkeypatch, b'{"prompt": "a"}\n{"prompt": 1}\n')
    with pytest.raises(InputError) as caught:
        read_prompts("-")
    assert str(caught.value).splitlines()[0] == "<stdin>: 1 problem"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(InputError) as caught:
        read_prompts(path)
    assert caught.value.problems == [f"cannot read {path}: No such file or directory"]
    assert str(caught.value) == f"cannot read {path}: No such file or directory"


def test_directory_is_not_readable(tmp_path):
    with pytest.raises(InputError) as caught:
        read_prompts(tmp_path)
    assert caught.value.problems == [f"cannot read {tmp_path}: Is a directory"]


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "ok"}\n{"prompt": "café"}\n'.encode("latin-1"))
    with pytest.raises(InputError) as caught:
        read_prompts(path)
    assert caught.value.problems == [f"{path} is not UTF-8 text (line 2 has the byte 0xe9)"]


@pytest.mark.parametrize("content", ["", "\n", "  \n\n\t\n"])
def test_no_prompts(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as caught:
        read_prompts(path)
    assert caught.value.problems == [f"no prompts in {path}"]
    assert str(caught.value) == f"no prompts in {path}"


def test_no_prompts_on_stdin(monkeypatch):
    use_stdin(monkeypatch, b"\n")
    with pytest.raises(InputError, match="^no prompts in <stdin>$"):
        read_prompts("-")


def test_preflight_problems_are_listed_with_the_shape_problems(tmp_path):
    problems = problems_of(
        tmp_path,
        '{"prompt": "a"',
        '{"prompt": "b\\ud800"}',
        '{"prompt": "c", "Calls": 1}',
        '{"prompt": "d"}',
        '{"prompt": "e", "v": NaN}',
    )
    assert [p.split(":")[0] for p in problems] == ["line 1", "line 2", "line 3", "line 5"]
    assert "invalid JSON" in problems[0] and "Unicode" in problems[1] and '"Calls"' in problems[2] and "NaN" in problems[3]


def test_chat_lines_are_refused_for_the_completions_api_only(tmp_path):
    path = write(tmp_path, '{"prompt": "a"}', json.dumps({"messages": CHAT}), json.dumps({"messages": PARTS}))
    assert len(read_prompts(path, api="chat")) == len(read_prompts(path)) == 3
    with pytest.raises(InputError) as caught:
        read_prompts(path, api="completions")
    assert [p.split(":")[0] for p in caught.value.problems] == ["line 2", "line 3"]
    assert all('api="chat"' in p for p in caught.value.problems)  # the setting, as the Python API names it


def test_content_parts_need_a_type_and_text_parts_their_text(tmp_path):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    ok = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    assert read_prompts(write(tmp_path, json.dumps({"messages": ok})))[0].messages == ok
    bad = [{"role": "user", "content": ["text", {"text": "no type"}, {"type": "text", "text": 3}]}]
    problems = problems_of(tmp_path, json.dumps({"messages": bad}))
    assert [p.split(": ")[1] for p in problems] == ["messages[0].content[0]", "messages[0].content[1]", "messages[0].content[2]"]


def test_json_nested_past_the_parser_is_a_line_problem(tmp_path):
    problems = problems_of(tmp_path, '{"prompt": "a"}', '{"prompt": "b", "k": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert problems == ["line 2: JSON nested too deeply to read: flatten the line"]
