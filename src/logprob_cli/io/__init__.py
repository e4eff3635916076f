"""io/: JSONL in (every problem of a file found before a call is spent), Parquet out, and `inspect`.

jsonl.py reads and checks prompts; preflight.py checks what the output could not store; parquet.py
fixes the output's columns, writes it atomically and renders `inspect`. Imports endpoints/ (the
`Prompt` type, token texts) and methods/ (the result type), never run/.
"""

from logprob_cli.io.jsonl import InputError, check_prompts, read_prompts, select_shard
from logprob_cli.io.parquet import read_metadata, render_inspect

__all__ = ["InputError", "check_prompts", "read_metadata", "read_prompts", "render_inspect", "select_shard"]
