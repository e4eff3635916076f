"""Which files a run may write or delete: only its own output and checkpoint, never the user's other files.

A run writes two files: the output NAME.parquet and, beside it, its checkpoint
NAME.checkpoint.sqlite (plus SQLite's -wal/-shm and a temporary file while the output
is replaced). Everything here runs before the first call, and refuses (journal.Refused,
a usage error) rather than guess:

- the output and the checkpoint must not be the input (by path, symbolic link or inode),
  and must each be a regular file or not exist (no directory, device, FIFO or link);
- an existing output must be a file `logprobs extract` wrote whose every row this
  checkpoint holds, and the checkpoint must hold no finished prompt missing from this
  input as it is: a run never replaces rows it cannot write again (another input with
  the same -o, an output left beside an empty or damaged checkpoint);
- --fresh deletes the output only if it is a Parquet file with logprob_cli metadata, and
  the checkpoint only if it is one (or a damaged one); anything else is left as it is.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from logprob_cli.endpoints import Prompt
from logprob_cli.errors import Worded
from logprob_cli.run._journal import Journal, Refused, prompt_key
from logprob_cli.io import read_metadata

SUFFIX = ".parquet"
CHECKPOINT_SUFFIX = ".checkpoint.sqlite"
MAX_EXAMPLES = 3


def checkpoint_path(output: Path) -> Path:
    """NAME.parquet -> NAME.checkpoint.sqlite beside it; Refused for any other output name.

    Only .parquet names are taken: the tool writes Parquet, so another name would mislead
    whoever opens the file, and with one suffix the checkpoint names of two outputs
    never collide (x.jsonl, x.csv and x.parquet used to share x.checkpoint.sqlite). The
    default output's checkpoint is where it always was, so existing checkpoints resume.
    """
    name = output.name
    if not name.endswith(SUFFIX) or name == SUFFIX:
        raise Refused(
            f"-o {output}: the output must be a .parquet file (e.g. -o {output.with_name(output.stem or 'out')}"
            f"{SUFFIX}); its checkpoint is named after it (NAME{CHECKPOINT_SUFFIX} beside NAME{SUFFIX})"
        )
    return output.with_name(name[: -len(SUFFIX)] + CHECKPOINT_SUFFIX)


def check_paths(input: str, output: Path) -> Path:
    """Refuse an output (or its checkpoint) that is the input or not a regular file; return the checkpoint path.

    `input` "-" is standard input. Nothing is created, opened or changed.
    """
    _check_one(input, output, "the output")
    checkpoint = checkpoint_path(output)
    _check_one(input, checkpoint, f"the checkpoint of {output}")
    return checkpoint


def _check_one(input: str, path: Path, role: str) -> None:
    if input != "-" and _same_file(Path(input), path):
        raise Refused(
            f"{path} is the input file {input} (as {role}); nothing was written. Name another output with -o, "
            f"e.g. -o {Path(input).with_name(Path(input).stem + '.out' + SUFFIX)}"
        )
    if path.parent.exists() and not path.parent.is_dir():
        raise Refused(f"{path.parent} is not a directory, so {path} ({role}) cannot be written; choose another -o")
    kind = _kind(path)
    if kind == "a directory" and role == "the output":
        raise Refused(f"-o {path} is a directory; name a file in it, e.g. -o {path / ('results' + SUFFIX)}")
    if kind:
        raise Refused(
            f"{path} ({role}) is {kind}, not a regular file; it is left as it is. Choose another output with -o"
        )


def _same_file(input: Path, path: Path) -> bool:
    if input.resolve() == path.resolve():
        return True
    try:
        return os.path.samefile(input, path)
    except OSError:  # one of them does not exist (or cannot be reached): not the same file
        return False


def _kind(path: Path) -> str | None:
    """What `path` is when it exists and is not a regular file ("a directory", ...); None otherwise."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)})"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def discard(output: Path, checkpoint: Path) -> None:
    """--fresh: delete the output and its checkpoint, only if they are the tool's (see module docstring).

    Checks both before deleting either; raises Refused and deletes nothing otherwise.
    """
    if output.exists():
        _tool_output(output, Worded("{fresh} deletes only an output that logprobs extract wrote"))
    Journal.discard(checkpoint)
    output.unlink(missing_ok=True)


def check_resumable(output: Path, checkpoint: Path, prompts: list[Prompt], finished: set[str]) -> None:
    """Refuse a run that would replace output rows it cannot write again (see module docstring).

    `finished`: the keys of the prompts the checkpoint has finished. Reads the output's
    id, prompt and messages columns; writes nothing.
    """
    if _kind(output):
        raise Refused(Worded(
            "{path} (the output) is {kind}, not a regular file; choose another {output}", path=output, kind=_kind(output)
        ))
    rows = list(_row_keys(output)) if output.exists() else []
    unheld = [row_id for row_id, key in rows if key not in finished]
    if unheld:
        state = "is empty" if not finished else f"holds {len(finished):,} finished prompts"
        raise Refused(Worded(
            "{path} holds {rows:,} rows ({examples}) that its checkpoint {checkpoint} does not hold (the checkpoint "
            "{state}): it was written from another input or another checkpoint, and this run would replace them. "
            "Nothing was sent. Choose another {output} to keep it, or add {fresh} to discard it and start over",
            path=output, rows=len(unheld), examples=_examples(unheld), checkpoint=checkpoint, state=state,
        ))
    keys = {prompt_key(prompt) for prompt in prompts}
    strangers = finished - keys
    if strangers:
        dropped = [row_id for row_id, key in rows if key in strangers]
        where = f" ({_examples(dropped)})" if dropped else ""
        raise Refused(Worded(
            "the checkpoint {checkpoint} holds {count:,} finished prompts{where} that are not in this input as it is: "
            "it was made from another input, or those prompts were edited or removed since, and this run would drop "
            "them from {path}. Nothing was sent. Run with the input it was made from to resume it, choose another "
            "{output} for this input, or add {fresh} to discard them and start over",
            checkpoint=checkpoint, count=len(strangers), where=where, path=output,
        ))


def _examples(ids: list) -> str:
    shown = ", ".join(json.dumps(row_id) for row_id in ids[:MAX_EXAMPLES])
    return f"id{'s' if len(ids) > 1 else ''} {shown}" + (", ..." if len(ids) > MAX_EXAMPLES else "")


def _tool_output(output: Path, why: str) -> None:
    """Refused unless `output` is a Parquet file with logprob_cli metadata."""
    try:
        read_metadata(output)
    except (ValueError, OSError) as error:
        raise Refused(f"{error}; {why}, so it is left as it is. Choose another output with -o") from None


def _row_keys(output: Path) -> Iterator[tuple[object, str]]:
    """(id, journal key) of each row of an output `logprobs extract` wrote (a target file's rows keyed by their
    target ids, a position's by its position and context tokens, as the journal keys them); Refused for any other
    file."""
    _tool_output(output, "a run replaces only an output that logprobs extract wrote")
    try:
        names = pq.read_schema(output).names
        columns = ["id", "prompt", "messages"]
        columns += [name for name in ("targets", "position", "context_tokens") if name in names]
        table = pq.read_table(output, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise Refused(
            f"{output} cannot be read ({error}); it is left as it is. Choose another output with -o"
        ) from None
    for row in table.to_pylist():
        messages = None if row["messages"] is None else json.loads(row["messages"])
        ids = tuple(target["token_id"] for target in row.get("targets") or ())
        context = tuple(row.get("context_tokens") or ())
        prompt = Prompt(
            id=row["id"], line=0, prompt=row["prompt"], messages=messages, targets=ids, target_ids=ids,
            position=row.get("position"), context_ids=context,
        )
        yield row["id"], prompt_key(prompt)
