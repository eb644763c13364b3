"""Conversation sessions: the turns of a dialogue, kept as what CSM needs, so any connection can resume them.

A turn is stored as its speaker, text, duration and Mimi codes (16-bit, frames x
codebooks), never as audio: a minute of conversation is tens of KB.  A session
belongs to the API key that created it (stored as a hash); an unknown, expired
or foreign id is the same ``unknown_session`` to the caller.  Ids carry 128
random bits.  Limits: ``ttl`` seconds of inactivity, ``max_sessions``,
``max_per_owner`` (counted under ``counted_as``: the key's hash, or on a keyless
server a hash of the client address), and ``max_bytes`` per session (the oldest
turns are dropped to stay under it).

Stores: ``memory`` (tests, one process) and ``sqlite:///path`` (the default; a
file, WAL journal, ``synchronous=FULL``: a turn acknowledged is on disk).  The
file and its ``-wal``/``-shm`` are its owner's alone (0600; SQLite gives the
journals the database's mode), and deleted text leaves the disk at once
(``secure_delete`` zeroes it, a checkpoint empties the WAL that still held it).
Calls block; the interfaces run them through ``session_calls.Sessions``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engines.base import TURN_CODES, ContextTurn
from . import replies as r


@dataclass(frozen=True)
class StoredTurn:
    speaker: int
    text: str
    duration_s: float
    codes: np.ndarray  # (frames, codebooks) int64, CSM's Mimi codes

    @property
    def size(self) -> int:
        return self.codes.size * 2 + len(self.text.encode())

    def describe(self) -> dict:
        return {"speaker": self.speaker, "text": self.text, "duration_s": round(self.duration_s, 3)}

    def context(self) -> ContextTurn:
        """As a prompt turn: CSM reads the codes from the turn's cache; there is no audio to re-encode."""
        return ContextTurn(self.speaker, self.text, None, {TURN_CODES: self.codes}, duration=self.duration_s)

    @classmethod
    def of(cls, turn: ContextTurn) -> "StoredTurn":
        codes = turn.cache[TURN_CODES]
        codes = codes.cpu().numpy() if hasattr(codes, "cpu") else np.asarray(codes)  # a tensor, maybe on a GPU
        return cls(turn.speaker, turn.text, turn.duration_s, codes.astype(np.int64))


def owner_of(api_key: str | None) -> str:
    """Who a session belongs to: a hash of the key that created it (no key: everyone on a keyless server)."""
    return hashlib.sha256((api_key or "").encode()).hexdigest()


def too_many(limit: int) -> r.Refusal:
    return r.Refusal(r.ErrorCode.TOO_MANY_SESSIONS, f"You already hold {limit} sessions (the most one API key, "
                                                    "or one address on a server without keys, may hold): "
                                                    "delete one, or resume one with its id")


def server_full(limit: int) -> r.Refusal:
    return r.Refusal(r.ErrorCode.BUSY, f"The server holds its maximum of {limit} sessions; retry later")


def unknown(session: str) -> r.Refusal:
    return r.Refusal(r.ErrorCode.UNKNOWN_SESSION, f"No session {session[:64]!r}: it never existed, expired, was "
                                                  "deleted, or belongs to another API key")


class SessionStore:
    """SQLite (a file) or memory (``:memory:``), behind one lock: every call is one short transaction."""

    unreachable = (sqlite3.OperationalError, OSError)  # the disk, not the caller: ``store_unavailable``

    def __init__(self, path: str, ttl: float = 86400, max_sessions: int = 10000, max_bytes: int = 4 * 2**20,
                 max_per_owner: int | None = None, clock=time.time) -> None:
        self.ttl, self.max_sessions, self.max_bytes, self._clock = ttl, max_sessions, max_bytes, clock
        self.max_per_owner = max_per_owner  # None: no cap but the server's
        if path != ":memory:":
            _private(Path(path))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._deleted = False  # text left the tables in this transaction: checkpoint once it commits
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
                             "touched REAL NOT NULL)")
            if "counted" not in [row[1] for row in self._db.execute("PRAGMA table_info(sessions)")]:
                self._db.execute("ALTER TABLE sessions ADD COLUMN counted TEXT NOT NULL DEFAULT ''")
            self._db.execute("CREATE INDEX IF NOT EXISTS sessions_counted ON sessions (counted)")
            self._db.execute("CREATE TABLE IF NOT EXISTS turns (session TEXT NOT NULL, seq INTEGER NOT NULL, "
                             "speaker INTEGER NOT NULL, text TEXT NOT NULL, duration REAL NOT NULL, "
                             "frames INTEGER NOT NULL, codes BLOB NOT NULL, PRIMARY KEY (session, seq))")

    @classmethod
    def open(cls, url: str, **limits) -> "SessionStore":
        """``memory`` or ``sqlite:///path`` (``--session-store``)."""
        if url == "memory":
            return cls(":memory:", **limits)
        if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
            return cls(url[len("sqlite:///"):], **limits)
        raise ValueError(f"{url!r} is not memory or sqlite:///PATH")

    # -- sessions -------------------------------------------------------------------------------------------
    def create(self, owner: str, counted_as: str | None = None) -> str:
        """A new session of ``owner``, counted against ``max_per_owner`` under ``counted_as`` (default: owner)."""
        session, counted_as = secrets.token_urlsafe(16), counted_as or owner  # 128 random bits
        with self._tx():
            self._expire()
            (mine,) = self._db.execute("SELECT COUNT(*) FROM sessions WHERE counted = ?", (counted_as,)).fetchone()
            if self.max_per_owner is not None and mine >= self.max_per_owner:
                raise too_many(self.max_per_owner)
            (count,) = self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()
            if count >= self.max_sessions:
                raise server_full(self.max_sessions)
            self._db.execute("INSERT INTO sessions (id, owner, touched, counted) VALUES (?, ?, ?, ?)",
                             (session, owner, self._clock(), counted_as))
        return session

    def touch(self, session: str, owner: str) -> None:
        """``unknown_session`` unless it is this owner's live session, which gets ``ttl`` more (asked before a reply
        that joins it is generated)."""
        with self._tx():
            self._check(session, owner)

    def sweep(self) -> None:
        """Delete expired sessions (the service calls it periodically: expiry does not wait for a ``create``)."""
        with self._tx():
            self._expire()

    def turns(self, session: str, owner: str) -> list[StoredTurn]:
        """The session's turns, oldest first (and the session is touched); ``unknown_session`` if it is not
        this owner's live session."""
        with self._tx():
            self._check(session, owner)
            rows = self._db.execute("SELECT speaker, text, duration, frames, codes FROM turns WHERE session = ? "
                                    "ORDER BY seq", (session,)).fetchall()
        return [StoredTurn(speaker, text, duration, _codes(blob, frames)) for speaker, text, duration, frames, blob
                in rows]

    def append(self, session: str, owner: str, turn: StoredTurn) -> int:
        """Store ``turn`` (durably) and return the session's turn count; the oldest turns go past ``max_bytes``."""
        return self._add(session, owner, turn)[1]

    def _add(self, session: str, owner: str, turn: StoredTurn) -> tuple[int, int]:
        """(the turn's sequence number, the session's turn count)."""
        blob = turn.codes.astype("<i2").tobytes()
        with self._tx():
            self._check(session, owner)
            (last,) = self._db.execute("SELECT COALESCE(MAX(seq), -1) FROM turns WHERE session = ?",
                                       (session,)).fetchone()
            self._db.execute("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (session, last + 1, turn.speaker, turn.text, turn.duration_s, len(turn.codes), blob))
            self._trim(session)
            (count,) = self._db.execute("SELECT COUNT(*) FROM turns WHERE session = ?", (session,)).fetchone()
        return last + 1, count

    def extend(self, session: str, owner: str, turns: list[ContextTurn]) -> list[int]:
        """A reply's turns (as an engine produced them) into the session; their sequence numbers, for ``replace``."""
        return [self._add(session, owner, StoredTurn.of(turn))[0] for turn in turns]

    def replace(self, session: str, owner: str, seqs: list[int], turns: list[ContextTurn]) -> None:
        """The turns ``seqs`` (a reply) become ``turns`` (what was heard of it, no more of them), in place."""
        with self._tx():
            self._check(session, owner)
            doomed = list(seqs)
            if not doomed:
                return
            self._db.execute(f"DELETE FROM turns WHERE session = ? AND seq IN ({','.join('?' * len(doomed))})",
                             (session, *doomed))
            for seq, turn in zip(doomed, map(StoredTurn.of, turns)):
                self._db.execute("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (session, seq, turn.speaker, turn.text, turn.duration_s, len(turn.codes),
                                  turn.codes.astype("<i2").tobytes()))

    def delete(self, session: str, owner: str) -> None:
        with self._tx():
            self._check(session, owner)
            self._drop(session)

    # -- internals (under the lock, inside a transaction) ---------------------------------------------------
    def _check(self, session: str, owner: str) -> None:
        row = self._db.execute("SELECT owner, touched FROM sessions WHERE id = ?", (session,)).fetchone()
        now = self._clock()
        if row is None or row[0] != owner or now - row[1] > self.ttl:
            if row is not None and now - row[1] > self.ttl:
                self._drop(session)
            raise unknown(session)
        self._db.execute("UPDATE sessions SET touched = ? WHERE id = ?", (now, session))

    def _trim(self, session: str) -> None:
        sizes = self._db.execute("SELECT seq, LENGTH(codes) + LENGTH(CAST(text AS BLOB)) FROM turns WHERE session = ? "
                                 "ORDER BY seq DESC", (session,)).fetchall()
        total, keep = 0, None
        for seq, size in sizes:
            total += size
            if total > self.max_bytes:
                keep = seq
                break
        if keep is not None:
            self._db.execute("DELETE FROM turns WHERE session = ? AND seq <= ?", (session, keep))

    def _expire(self) -> None:
        for (session,) in self._db.execute("SELECT id FROM sessions WHERE touched < ?",
                                           (self._clock() - self.ttl,)).fetchall():
            self._drop(session)

    def _drop(self, session: str) -> None:
        self._db.execute("DELETE FROM turns WHERE session = ?", (session,))
        self._db.execute("DELETE FROM sessions WHERE id = ?", (session,))
        self._deleted = True

    @contextlib.contextmanager
    def _tx(self):
        """One transaction under the lock; committed (and, with synchronous=FULL, on disk) when it ends."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._deleted = False
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            if self._deleted:  # the WAL still holds the deleted text: copy the zeroed pages back, empty it
                self._deleted = False
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _private(db: Path) -> None:
    """The database file exists, mode 0600, before SQLite opens it: its ``-wal`` and ``-shm`` are then created with
    the same mode (files of an older version are made private too)."""
    db.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(db, os.O_RDWR | os.O_CREAT, 0o600))
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o600)


def _codes(blob: bytes, frames: int) -> np.ndarray:
    return np.frombuffer(blob, "<i2").reshape(frames, -1).astype(np.int64)
