"""Sessions in Redis (``--session-store redis://host:port/db``), for several replicas behind a load balancer.

The same contract as the SQLite store (``sessions.SessionStore``): a turn that was
acknowledged is in Redis (durable as far as Redis is configured to be: run it
with ``appendonly yes``).  Keys, per session: ``tts:s:<id>`` (a hash: owner),
``tts:t:<id>`` (a list of turns, oldest first, each a JSON header line and its
16-bit codes), both expiring after ``ttl`` seconds without use; ``tts:live`` (a
sorted set of ids by last use) counts sessions for ``max_sessions``.  Each call
is one MULTI/EXEC transaction (``WATCH`` where it reads before it writes).
"""

from __future__ import annotations

import json
import secrets
import time

import numpy as np

from ..engines.base import ContextTurn
from . import replies as r
from .sessions import StoredTurn, unknown

LIVE = "tts:live"


def _pack(seq: int, turn: StoredTurn) -> bytes:
    header = {"seq": seq, "speaker": turn.speaker, "text": turn.text, "duration": turn.duration_s,
              "frames": len(turn.codes)}
    return json.dumps(header).encode() + b"\n" + turn.codes.astype("<i2").tobytes()


def _unpack(entry: bytes) -> tuple[int, StoredTurn]:
    header, _, blob = entry.partition(b"\n")
    meta = json.loads(header)
    codes = np.frombuffer(blob, "<i2").reshape(meta["frames"], -1).astype(np.int64)
    return meta["seq"], StoredTurn(meta["speaker"], meta["text"], meta["duration"], codes)


class RedisSessionStore:
    def __init__(self, url: str, ttl: float = 86400, max_sessions: int = 10000, max_bytes: int = 4 * 2**20,
                 clock=time.time) -> None:
        import redis

        self.ttl, self.max_sessions, self.max_bytes, self._clock = ttl, max_sessions, max_bytes, clock
        self._redis = redis.Redis.from_url(url, socket_timeout=10)

    def create(self, owner: str) -> str:
        session, now = secrets.token_urlsafe(16), self._clock()
        self._redis.zremrangebyscore(LIVE, "-inf", now - self.ttl)
        if self._redis.zcard(LIVE) >= self.max_sessions:
            raise r.ProtocolError(r.ErrorCode.BUSY, f"The server holds its maximum of {self.max_sessions} sessions; "
                                                    "retry later")
        with self._redis.pipeline() as tx:
            tx.hset(f"tts:s:{session}", mapping={"owner": owner, "seq": -1})
            tx.expire(f"tts:s:{session}", int(self.ttl))
            tx.zadd(LIVE, {session: now})
            tx.execute()
        return session

    def turns(self, session: str, owner: str) -> list[StoredTurn]:
        self._check(session, owner)
        return [_unpack(entry)[1] for entry in self._redis.lrange(f"tts:t:{session}", 0, -1)]

    def append(self, session: str, owner: str, turn: StoredTurn) -> int:
        return self._add(session, owner, turn)[1]

    def _add(self, session: str, owner: str, turn: StoredTurn) -> tuple[int, int]:
        self._check(session, owner)
        seq = self._redis.hincrby(f"tts:s:{session}", "seq", 1)
        entries = f"tts:t:{session}"
        with self._redis.pipeline() as tx:
            tx.rpush(entries, _pack(seq, turn))
            tx.expire(entries, int(self.ttl))
            tx.execute()
        total = sum(_unpack(e)[1].size for e in self._redis.lrange(entries, 0, -1))  # codes and text, as SQLite
        while total > self.max_bytes and (dropped := self._redis.lpop(entries)) is not None:
            total -= _unpack(dropped)[1].size
        return seq, int(self._redis.llen(entries))

    def extend(self, session: str, owner: str, turns: list[ContextTurn]) -> list[int]:
        return [self._add(session, owner, StoredTurn.of(turn))[0] for turn in turns]

    def replace(self, session: str, owner: str, seqs: list[int], turns: list[ContextTurn]) -> None:
        """The turns ``seqs`` (a reply) become ``turns`` (what was heard of it), in place."""
        import redis

        self._check(session, owner)
        entries, new = f"tts:t:{session}", list(zip(seqs, map(StoredTurn.of, turns)))
        with self._redis.pipeline() as tx:
            while True:
                try:
                    tx.watch(entries)
                    kept = []
                    for entry in tx.lrange(entries, 0, -1):
                        seq, _ = _unpack(entry)
                        if seq not in seqs:
                            kept.append(entry)
                        elif new and seq == new[0][0]:
                            kept.append(_pack(*new.pop(0)))
                    tx.multi()
                    tx.delete(entries)
                    if kept:
                        tx.rpush(entries, *kept)
                        tx.expire(entries, int(self.ttl))
                    tx.execute()
                    return
                except redis.WatchError:
                    continue

    def delete(self, session: str, owner: str) -> None:
        self._check(session, owner)
        self._redis.delete(f"tts:s:{session}", f"tts:t:{session}")
        self._redis.zrem(LIVE, session)

    def _check(self, session: str, owner: str) -> None:
        """``unknown_session`` unless it is this owner's live session; touches it (its keys live ``ttl`` more)."""
        stored = self._redis.hget(f"tts:s:{session}", "owner")
        if stored is None or stored.decode() != owner:
            raise unknown(session)
        with self._redis.pipeline() as tx:
            tx.expire(f"tts:s:{session}", int(self.ttl))
            tx.expire(f"tts:t:{session}", int(self.ttl))
            tx.zadd(LIVE, {session: self._clock()})
            tx.execute()

    def close(self) -> None:
        self._redis.close()
