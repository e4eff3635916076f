"""io/: JSONL in (every problem of a file found before a call is spent), Parquet out, `inspect` and `compare`.

_jsonl.py reads and checks prompts; _preflight.py checks what the output could not store; _parquet.py
fixes the output's columns, writes it atomically and renders `inspect`; _image.py reads the model's image
(a matrix or a GGUF model's output layer) for the image methods; _compare.py measures two outputs
against each other, prompt by prompt. Imports endpoints/ (the
`Prompt` type, token texts) and methods/ (the result type), never run/.
"""

from logprob_cli.io._jsonl import InputError, check_prompts, read_prompts, select_shard, with_targets
from logprob_cli.io._parquet import read_metadata, render_inspect
from logprob_cli.io._jsonl import content_problems
from logprob_cli.io._parquet import OutputRow, output_schema, write_parquet
from logprob_cli.io._image import ImageError, image_setting, load_image, save_image
from logprob_cli.io._compare import CompareError, Comparison, PromptComparison, compare_files, render_comparison

__all__ = [
    "CompareError",
    "Comparison",
    "ImageError",
    "InputError",
    "OutputRow",
    "PromptComparison",
    "check_prompts",
    "compare_files",
    "content_problems",
    "image_setting",
    "load_image",
    "output_schema",
    "read_metadata",
    "read_prompts",
    "render_comparison",
    "render_inspect",
    "save_image",
    "select_shard",
    "with_targets",
    "write_parquet",
]
