"""io/: JSONL in (every problem of a file found before a call is spent), Parquet out, `inspect` and `compare`.

_jsonl.py reads and checks prompts; _preflight.py checks what the output could not store; _parquet.py
fixes the output's columns, writes it atomically and renders `inspect`; _compare.py measures two outputs
against each other, prompt by prompt. Imports endpoints/ (the
`Prompt` type, token texts) and methods/ (the result type), never run/.
"""

from logprob_cli.io._jsonl import InputError, check_prompts, read_prompts, select_shard, with_targets
from logprob_cli.io._parquet import read_metadata, render_inspect
from logprob_cli.io._jsonl import content_problems
from logprob_cli.io._parquet import OutputRow, output_schema, write_parquet
from logprob_cli.io._compare import CompareError, Comparison, PromptComparison, compare_files, render_comparison

__all__ = [
    "CompareError",
    "Comparison",
    "InputError",
    "OutputRow",
    "PromptComparison",
    "check_prompts",
    "compare_files",
    "content_problems",
    "output_schema",
    "read_metadata",
    "read_prompts",
    "render_comparison",
    "render_inspect",
    "select_shard",
    "with_targets",
    "write_parquet",
]
