"""The checkpoint: every answer an endpoint gave, and every finished prompt's result, in SQLite.

An answer is committed before the method that asked for it sees it, so a killed run
loses only the calls in flight. A method replays deterministically from its answers:
on resume the runner feeds a prompt's saved answers back in order (`seq`) and asks the
endpoint only for what is missing; each saved answer carries the digest of its query,
so a replay that would ask something else is caught instead of silently mixing runs.

WAL mode with synchronous=NORMAL: a commit survives the process being killed (the
failure this guards against); only an OS crash or power loss can drop the last commits.
One process at a time: an exclusive flock on the checkpoint file refuses a second one.

Opening never writes to a file it cannot vouch for: a file that is not SQLite, is cut
short or is malformed is reported as damaged, an SQLite database without the checkpoint's
tables as someone else's, and the caller's check (e.g. "the output holds no row this
checkpoint lacks") runs before the first write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from logprob_cli.run._budget import Spend
from logprob_cli.errors import LogprobError, Worded
from logprob_cli.endpoints import Answer, Prompt
from logprob_cli.methods import MethodResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    prompt TEXT NOT NULL, seq INTEGER NOT NULL, query BLOB NOT NULL, answer BLOB NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (prompt, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    prompt TEXT PRIMARY KEY, calls INTEGER NOT NULL, logprobs BLOB NOT NULL,
    bound_ids BLOB NOT NULL, bounds BLOB NOT NULL, precision REAL NOT NULL,
    behaviour TEXT NOT NULL, notes TEXT NOT NULL, sparse_size INTEGER);
CREATE TABLE IF NOT EXISTS failures (prompt TEXT PRIMARY KEY, message TEXT NOT NULL);
"""
CHECKPOINT_TABLES = {"meta", "answers", "results", "failures"}
SQLITE_HEADER = b"SQLite format 3\x00"
DAMAGE_ERRORS = ("SQLITE_CORRUPT", "SQLITE_NOTADB")  # sqlite_errorname prefixes that mean a broken file
SPARSE_BELOW = 1 / 8  # a result with fewer recovered entries than this share of its vector is stored sparsely


class JournalError(LogprobError, RuntimeError):
    """The checkpoint cannot be used as asked; the message says why and what to do. The CLI exits 1."""


class Refused(JournalError):
    """The files at the output's place cannot be used for this run, found before any call (a usage error: the
    CLI exits 2).

    `damaged`: the file is a checkpoint that cannot be read (fresh=True may discard it).
    """

    damaged = False


def prompt_key(prompt: Prompt) -> str:
    """A stable key for a prompt's journal entries: its id, content and target ids (an edited prompt or target set
    starts afresh). Without targets the key is what it was before targets existed, so older checkpoints resume.

    The targets enter as their resolved ids, in the order given (the same token spelt as text or as its id is the
    same target; the output's `targets` column holds these ids, so a row's key can be rebuilt from the file).
    A position of a completion (`Prompt.position` not None) adds its position and context ids (the output's
    `position` and `context_tokens` columns), so each position resumes on its own; without one the key is as
    before positions existed.
    Raises ValueError for a prompt whose targets are not resolved yet (`Prompt.target_ids` empty).
    """
    if prompt.targets and not prompt.target_ids:
        raise ValueError(f"prompt {prompt.id!r}: resolve its targets to token ids before keying it")
    parts = [prompt.id, prompt.content()]
    if prompt.target_ids:
        parts.append({"target_ids": [int(i) for i in prompt.target_ids]})
    if prompt.position is not None:
        parts.append({"position": prompt.position, "context_ids": [int(i) for i in prompt.context_ids]})
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


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
        self._opened = False  # past the checks of `open`: a run may be spending

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        settings: dict[str, Any],
        check: Callable[[set[str]], None] = lambda finished: None,
    ) -> "Journal":
        """Open (or create) the checkpoint for a run with these settings, under an exclusive lock.

        `check(finished)` gets the keys of the prompts the checkpoint has finished and may
        refuse the run by raising; it runs before the run writes anything to the file
        (only a checkpoint of an earlier version is brought to this schema before).
        Raises Refused when the file is damaged or not a checkpoint, JournalError when
        another process holds it or it was made with other settings; a file this call
        created is removed again then.
        """
        journal = cls(path)
        created = not journal.path.exists()
        journal._lock()
        try:
            ours = journal._inspect()
            if ours:
                journal._prepare()  # a checkpoint of an earlier version gets this version's tables and columns
            now = json.loads(json.dumps(settings, sort_keys=True))  # as it is stored
            saved = journal.get_meta("settings") if ours else None
            if saved is not None and saved != now:
                raise JournalError(Worded(
                    "the checkpoint {path} belongs to a run with other settings: {differences}. Re-run with those "
                    "settings to resume it, add {fresh} to discard it and start over, or choose another {output}.",
                    path=journal.path, differences=", ".join(settings_differences(saved, now)),
                )
                )
            check(journal._verified_finished() if ours else set())
            if not ours:
                journal._prepare()
            if saved is None:
                journal.set_meta("settings", now)
            journal._opened = True
        except BaseException:
            if created:
                for suffix in ("", "-wal", "-shm"):
                    journal.path.with_name(journal.path.name + suffix).unlink(missing_ok=True)
            journal.close()
            raise
        return journal

    @classmethod
    def discard(cls, path: str | os.PathLike) -> None:
        """Delete a checkpoint, a damaged one included (unless another process is using it).

        Raises Refused, deleting nothing, when the file is not a regular file or is an SQLite
        database without the checkpoint's tables: that file is not the tool's to delete.
        """
        journal = cls(path)
        journal._lock()
        try:
            try:
                journal._inspect()
            except Refused as refusal:
                if not refusal.damaged:
                    raise
            for suffix in ("", "-wal", "-shm"):
                journal.path.with_name(journal.path.name + suffix).unlink(missing_ok=True)
        finally:
            journal.close()

    def _lock(self) -> None:
        """flock the database file itself: SQLite's own locks are POSIX fcntl locks, independent of flock."""
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise Refused(
                f"{self.path} (the checkpoint's place) is not a regular file; it is left as it is. Move it away or "
                "choose another output with -o"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "ab")
        except OSError as error:
            raise Refused(
                f"cannot create the checkpoint {self.path} ({error.strerror or error}); nothing was sent. Choose an "
                "output in a directory you can write to with -o"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise JournalError(
                f"the checkpoint {self.path} is in use by another logprobs process; wait for it to finish or stop it"
            ) from None
        self._lock_file = handle

    def _inspect(self) -> bool:
        """Connect without writing; True for a checkpoint, False for an empty file (a new one).

        Raises Refused (with `damaged` set) for a file that is not SQLite, is shorter than its
        header says or is malformed, and Refused (`damaged` unset) for an SQLite database
        with none of the checkpoint's tables (someone else's).
        """
        assert self._lock_file is not None
        size = os.fstat(self._lock_file.fileno()).st_size
        with open(self.path, "rb") as file:
            head = file.read(100)
        if size and not head.startswith(SQLITE_HEADER):
            raise self._damaged("it is not an SQLite database")
        wal = self.path.with_name(self.path.name + "-wal")
        if size >= 100 and head[24:28] == head[92:96] and not (wal.exists() and wal.stat().st_size):
            page_size = int.from_bytes(head[16:18], "big")
            page_size = 65536 if page_size == 1 else page_size  # the header's way of writing 65536
            expected = page_size * int.from_bytes(head[28:32], "big")
            if size < expected:
                raise self._damaged(f"it is cut short: {size:,} of its {expected:,} bytes")
        self._connect()
        with self._reading():
            tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return False
        if not tables & CHECKPOINT_TABLES:
            raise Refused(
                f"{self.path} is an SQLite database but not a logprobs checkpoint (its tables: "
                f"{', '.join(sorted(tables))}); it is left as it is. Move it away, or choose another output with -o "
                "(the checkpoint is named after the output)"
            )
        return True

    def _verified_finished(self) -> set[str]:
        """The finished prompts, after reading every answer's usage (so a malformed page shows now, not mid-run)."""
        try:
            self.spent()
            return self.finished()
        except JournalError as error:
            raise Refused(str(error)) from None

    def _damaged(self, what: str) -> JournalError:
        """Refused (`damaged`) while opening; once the run is under way, a JournalError that stops it."""
        choices = (
            "Add {fresh} to discard it (the answers it held are lost) and start over, or choose another {output} to "
            "leave it as it is"
        )
        if self._opened:
            return JournalError(Worded(
                "the checkpoint {path} became unreadable during the run ({what}). " + choices, path=self.path, what=what
            ))
        refusal = Refused(Worded(
            "the checkpoint {path} is damaged ({what}), so it cannot be resumed; nothing was sent. " + choices,
            path=self.path, what=what,
        ))
        refusal.damaged = True
        return refusal

    def _error(self, err: sqlite3.Error, doing: str, advice: str) -> JournalError:
        """A SQLite error as a JournalError: corruption is named as such, anything else gets `advice`."""
        if getattr(err, "sqlite_errorname", "").startswith(DAMAGE_ERRORS):
            return self._damaged(str(err))
        return JournalError(f"cannot {doing} {self.path}: {err}. {advice}")

    def _connect(self) -> None:
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as err:
            raise self._error(
                err, "open the checkpoint", f"Check that {self.path.parent} is readable and writable, then run again"
            ) from None

    def _prepare(self) -> None:
        """Make the file a checkpoint of the current schema (the first writes of a run)."""
        with self._writing():
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(answers)")}
            for column in ("prompt_tokens", "completion_tokens"):  # checkpoints written by version 0.1.0
                if column not in columns:
                    self.db.execute(f"ALTER TABLE answers ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
            if "requests" not in columns:  # checkpoints written before Answer.requests: every answer was a request
                self.db.execute("ALTER TABLE answers ADD COLUMN requests INTEGER NOT NULL DEFAULT 1")
            if "sparse_size" not in {row[1] for row in self.db.execute("PRAGMA table_info(results)")}:
                self.db.execute("ALTER TABLE results ADD COLUMN sparse_size INTEGER")  # before targets: all dense

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
            raise self._error(
                err, "write the checkpoint", "Every answer committed before is kept: free some space (or make the "
                "directory writable) and run the same command again"
            ) from None

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Turn a failed read (a malformed file, an I/O error) into a JournalError that says what happened."""
        try:
            yield
        except sqlite3.Error as err:
            raise self._error(err, "read the checkpoint", "Check the disk, then run again") from None

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
        with self._reading():
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        with self._writing():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def put_answers(self, rows: list[tuple[str, int, bytes, Answer]]) -> None:
        """Make answers (prompt, seq, query digest, answer) and their billed usage and requests durable, in one
        transaction, before anyone uses them."""
        with self._writing(), self._transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO answers (prompt, seq, query, answer, prompt_tokens, completion_tokens, requests)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(p, seq, q, a.to_bytes(), a.prompt_tokens, a.completion_tokens, a.requests) for p, seq, q, a in rows],
            )

    def spent(self) -> Spend:
        """Everything this checkpoint paid for: its answers' requests (an answer read from an earlier request's rows
        cost none) plus the run set-up's calls (probe, token check)."""
        with self._reading():
            calls, prompt_tokens, completion_tokens = self.db.execute(
                "SELECT coalesce(sum(requests), 0), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)"
                " FROM answers"
            ).fetchone()
        return Spend(calls, prompt_tokens, completion_tokens).plus(Spend(**(self.get_meta("setup_spend") or {})))

    def add_setup_spend(self, spend: Spend) -> None:
        """Count calls made outside any prompt's answers (probe, token check) into `spent`."""
        self.set_meta("setup_spend", asdict(Spend(**(self.get_meta("setup_spend") or {})).plus(spend)))

    def answers(self, prompt: str) -> dict[int, tuple[bytes, Answer]]:
        """A prompt's saved answers by sequence number, with the digest of the query each answered."""
        with self._reading():
            rows = self.db.execute("SELECT seq, query, answer FROM answers WHERE prompt = ?", (prompt,)).fetchall()
        return {seq: (bytes(q), Answer.from_bytes(a)) for seq, q, a in rows}

    def answer_counts(self) -> dict[str, int]:
        """How many answers are saved per prompt (the progress display does not expect them again)."""
        return dict(self.db.execute("SELECT prompt, count(*) FROM answers GROUP BY prompt"))

    def requests_of(self, prompt: str) -> int:
        """The requests a prompt's saved answers cost (its row's calls: an answer read from rows an earlier request
        returned, vLLM's prompt_logprobs, cost none)."""
        with self._reading():
            return self.db.execute(
                "SELECT coalesce(sum(requests), 0) FROM answers WHERE prompt = ?", (prompt,)
            ).fetchone()[0]

    def put_result(self, prompt: str, calls: int, result: MethodResult) -> None:
        """Make a finished prompt's result durable (and clear its failure). The vector is stored as float32; when
        fewer than SPARSE_BELOW of its entries are recovered (a run over a few targets), only those entries are:
        their ids and values (`sparse_size` holds the vector's length), so a target run stores bytes per target,
        not per vocabulary entry."""
        ids = np.array(sorted(result.upper_bounds), dtype="<i4")
        bounds = np.array([result.upper_bounds[int(i)] for i in ids], dtype="<f8")
        vector, sparse_size = _packed(result.logprobs)
        with self._writing(), self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO results (prompt, calls, logprobs, bound_ids, bounds, precision, behaviour, "
                "notes, sparse_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    prompt,
                    calls,
                    vector,
                    ids.tobytes(),
                    bounds.tobytes(),
                    result.precision,
                    json.dumps(result.behaviour, sort_keys=True),
                    json.dumps(result.notes),
                    sparse_size,
                ),
            )
            self.db.execute("DELETE FROM failures WHERE prompt = ?", (prompt,))

    def finished(self) -> set[str]:
        with self._reading():
            return {row[0] for row in self.db.execute("SELECT prompt FROM results")}

    def result(self, prompt: str) -> SavedResult | None:
        """A finished prompt's result as `put_result` stored it (NaN where not recovered), dense or sparse alike."""
        with self._reading():
            row = self.db.execute(
                "SELECT calls, logprobs, bound_ids, bounds, precision, behaviour, notes, sparse_size FROM results "
                "WHERE prompt = ?",
                (prompt,),
            ).fetchone()
        if row is None:
            return None
        calls, logprobs, bound_ids, bounds, precision, behaviour, notes, sparse_size = row
        ids = np.frombuffer(bound_ids, dtype="<i4")
        values = np.frombuffer(bounds, dtype="<f8")
        result = MethodResult(
            _unpacked(logprobs, sparse_size),
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
        with self._reading():
            return dict(self.db.execute("SELECT prompt, message FROM failures").fetchall())


def _packed(logprobs: np.ndarray) -> tuple[bytes, int | None]:
    """A vector as stored: float32 of every entry (sparse_size None), or, when fewer than SPARSE_BELOW of them are
    recovered, the recovered entries' ids (int32) then their values (float32), with the vector's length."""
    vector = np.asarray(logprobs, dtype="<f4")
    recovered = np.flatnonzero(~np.isnan(vector))
    if recovered.size >= SPARSE_BELOW * vector.size:
        return vector.tobytes(), None
    return recovered.astype("<i4").tobytes() + vector[recovered].tobytes(), int(vector.size)


def _unpacked(blob: bytes, sparse_size: int | None) -> np.ndarray:
    """The float32 vector `_packed` stored (NaN where not recovered)."""
    if sparse_size is None:
        return np.frombuffer(blob, dtype="<f4").copy()
    count = len(blob) // 8
    vector = np.full(sparse_size, np.nan, dtype=np.float32)
    vector[np.frombuffer(blob, dtype="<i4", count=count)] = np.frombuffer(blob, dtype="<f4", offset=4 * count)
    return vector


def reading_connection(path: str | os.PathLike) -> Journal:
    """A second, lock-free connection to an open checkpoint, for a writer thread to read results."""
    journal = Journal(path)
    journal._opened = True
    journal._connect()
    return journal


def settings_differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Each setting that differs, by its dotted path: ["endpoint.simulator.vocab_size 1000 (now 2000)", ...]."""
    differences = []
    for key in sorted(set(saved) | set(now), key=str):
        before, after = saved.get(key, _UNSET), now.get(key, _UNSET)
        if isinstance(before, dict) and isinstance(after, dict):
            differences += settings_differences(before, after, f"{prefix}{key}.")
        elif before != after:
            differences.append(f"{prefix}{key} {_shown(before)} (now {_shown(after)})")
    return differences


_UNSET = object()


def _shown(value: Any) -> str:
    return "unset" if value is _UNSET else json.dumps(value)
