"""The checkpoint: every answer an endpoint gave, and every finished prompt's result, in SQLite.

An answer is committed before the method that asked for it sees it, so a killed run
loses only the calls in flight. A method replays deterministically from its answers:
on resume the runner feeds a prompt's saved answers back in order (`seq`) and asks the
endpoint only for what is missing; each saved answer carries the digest of its query,
so a replay that would ask something else is caught instead of silently mixing runs.

WAL mode with synchronous=NORMAL: a commit survives the process being killed (the
failure this guards against); only an OS crash or power loss can drop the last commits.
One process at a time: an exclusive flock on the checkpoint file refuses a second one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .budget import Spend
from .endpoint import Answer
from .methods.base import MethodResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    prompt TEXT NOT NULL, seq INTEGER NOT NULL, query BLOB NOT NULL, answer BLOB NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (prompt, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    prompt TEXT PRIMARY KEY, calls INTEGER NOT NULL, logprobs BLOB NOT NULL,
    bound_ids BLOB NOT NULL, bounds BLOB NOT NULL, precision REAL NOT NULL,
    behaviour TEXT NOT NULL, notes TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS failures (prompt TEXT PRIMARY KEY, message TEXT NOT NULL);
"""


class JournalError(RuntimeError):
    """The checkpoint cannot be used as asked; the message says why and what to do."""


@dataclass
class SavedResult:
    calls: int
    result: MethodResult


class Journal:
    """A run's checkpoint file. Use as a context manager; `open` checks the run's settings."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_file = None
        self._db: sqlite3.Connection | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, settings: dict[str, Any]) -> "Journal":
        """Open (or create) the checkpoint for a run with these settings, under an exclusive lock.

        Raises JournalError when another process holds it, or when it was made with other settings.
        """
        journal = cls(path)
        journal._lock()
        try:
            journal._connect()
            saved = journal.get_meta("settings")
            if saved is None:
                journal.set_meta("settings", settings)
            elif saved != settings:
                diff = ", ".join(
                    f"{key} {saved.get(key)!r} (now {settings.get(key)!r})"
                    for key in sorted(set(saved) | set(settings))
                    if saved.get(key) != settings.get(key)
                )
                raise JournalError(
                    f"the checkpoint {journal.path} belongs to a run with other settings: {diff}. "
                    "Re-run with those settings to resume it, add --fresh to discard it and start over, "
                    "or choose another output with -o."
                )
        except BaseException:
            journal.close()
            raise
        return journal

    @classmethod
    def discard(cls, path: str | os.PathLike) -> None:
        """Delete a checkpoint (unless another process is using it)."""
        journal = cls(path)
        journal._lock()
        try:
            for suffix in ("", "-wal", "-shm"):
                journal.path.with_name(journal.path.name + suffix).unlink(missing_ok=True)
        finally:
            journal.close()

    def _lock(self) -> None:
        """flock the database file itself: SQLite's own locks are POSIX fcntl locks, independent of flock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise JournalError(
                f"the checkpoint {self.path} is in use by another logprobs process; wait for it to finish or stop it"
            ) from None
        self._lock_file = handle

    def _connect(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(answers)")}
            for column in ("prompt_tokens", "completion_tokens"):  # checkpoints written by version 0.1.0
                if column not in columns:
                    db.execute(f"ALTER TABLE answers ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
        except sqlite3.DatabaseError as err:
            raise JournalError(
                f"cannot use {self.path} as a checkpoint: {err}. Check that {self.path.parent} is writable and has "
                "free space, then run again"
            ) from None
        self._db = db

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "journal is closed"
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn a failed write (disk full, read-only directory) into a JournalError that says what to do."""
        try:
            yield
        except sqlite3.Error as err:
            raise JournalError(
                f"cannot write the checkpoint {self.path}: {err}. Every answer committed before is kept: free some "
                "space (or make the directory writable) and run the same command again"
            ) from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        with self._writing():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def put_answers(self, rows: list[tuple[str, int, bytes, Answer]]) -> None:
        """Make answers (prompt, seq, query digest, answer) and their billed usage durable, in one
        transaction, before anyone uses them."""
        with self._writing(), self._transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                [(p, seq, q, a.to_bytes(), a.prompt_tokens, a.completion_tokens) for p, seq, q, a in rows],
            )

    def spent(self) -> Spend:
        """Everything this checkpoint paid for: its answers plus the run set-up's calls (probe, token check)."""
        calls, prompt_tokens, completion_tokens = self.db.execute(
            "SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) FROM answers"
        ).fetchone()
        return Spend(calls, prompt_tokens, completion_tokens).plus(Spend(**(self.get_meta("setup_spend") or {})))

    def add_setup_spend(self, spend: Spend) -> None:
        """Count calls made outside any prompt's answers (probe, token check) into `spent`."""
        self.set_meta("setup_spend", asdict(Spend(**(self.get_meta("setup_spend") or {})).plus(spend)))

    def answers(self, prompt: str) -> dict[int, tuple[bytes, Answer]]:
        """A prompt's saved answers by sequence number, with the digest of the query each answered."""
        rows = self.db.execute("SELECT seq, query, answer FROM answers WHERE prompt = ?", (prompt,))
        return {seq: (bytes(q), Answer.from_bytes(a)) for seq, q, a in rows}

    def answer_counts(self) -> dict[str, int]:
        """How many answers are saved per prompt (the progress display does not expect them again)."""
        return dict(self.db.execute("SELECT prompt, count(*) FROM answers GROUP BY prompt"))

    def put_result(self, prompt: str, calls: int, result: MethodResult) -> None:
        ids = np.array(sorted(result.upper_bounds), dtype="<i4")
        bounds = np.array([result.upper_bounds[int(i)] for i in ids], dtype="<f8")
        with self._writing(), self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    prompt,
                    calls,
                    np.asarray(result.logprobs, dtype="<f4").tobytes(),
                    ids.tobytes(),
                    bounds.tobytes(),
                    result.precision,
                    json.dumps(result.behaviour, sort_keys=True),
                    json.dumps(result.notes),
                ),
            )
            self.db.execute("DELETE FROM failures WHERE prompt = ?", (prompt,))

    def finished(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT prompt FROM results")}

    def result(self, prompt: str) -> SavedResult | None:
        row = self.db.execute(
            "SELECT calls, logprobs, bound_ids, bounds, precision, behaviour, notes FROM results WHERE prompt = ?",
            (prompt,),
        ).fetchone()
        if row is None:
            return None
        calls, logprobs, bound_ids, bounds, precision, behaviour, notes = row
        ids = np.frombuffer(bound_ids, dtype="<i4")
        values = np.frombuffer(bounds, dtype="<f8")
        result = MethodResult(
            np.frombuffer(logprobs, dtype="<f4").copy(),
            {int(i): float(v) for i, v in zip(ids, values)},
            precision,
            json.loads(behaviour),
            json.loads(notes),
        )
        return SavedResult(calls, result)

    def results(self, prompts: list[str]) -> Iterator[tuple[str, SavedResult]]:
        """Finished results in the given order, one at a time (flat memory)."""
        for prompt in prompts:
            saved = self.result(prompt)
            if saved is not None:
                yield prompt, saved

    def put_failure(self, prompt: str, message: str) -> None:
        with self._writing():
            self.db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?)", (prompt, message))

    def failures(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT prompt, message FROM failures").fetchall())


def reading_connection(path: str | os.PathLike) -> Journal:
    """A second, lock-free connection to an open checkpoint, for a writer thread to read results."""
    journal = Journal(path)
    journal._connect()
    return journal
