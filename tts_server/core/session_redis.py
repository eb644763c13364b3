"""Sessions in Redis (``--session-store redis://host:port/db``), for several replicas behind a load balancer.

The same contract as the SQLite store (``sessions.SessionStore``): a turn that was
acknowledged is in Redis (durable as far as Redis is configured to be: run it
with ``appendonly yes``).  Keys, per session: ``tts:s:<id>`` (a hash: owner),
``tts:t:<id>`` (a list of turns, oldest first, each a JSON header line and its
16-bit codes), both expiring after ``ttl`` seconds without use; ``tts:live`` (a
sorted set of ids by last use) counts sessions for ``max_sessions``, and
``tts:o:<counted_as>`` those of one key or address for ``max_per_owner``.  Each
call is one MULTI/EXEC transaction (``WATCH`` where it reads before it writes).

The client waits at most ``TIMEOUT`` s for Redis and retries once at once (a
pooled connection that Redis's restart broke is replaced, and the call goes
through): a stalled Redis costs a call about two seconds, not ten.
"""

from __future__ import annotations

import json
import secrets
import time

import numpy as np

from ..engines.base import ContextTurn
from .sessions import StoredTurn, server_full, too_many, unknown

LIVE = "tts:live"
TIMEOUT = 1.0  # seconds, per connect and per reply


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
                 max_per_owner: int | None = None, clock=time.time) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.ttl, self.max_sessions, self.max_bytes, self._clock = ttl, max_sessions, max_bytes, clock
        self.max_per_owner = max_per_owner  # None: no cap but the server's
        self.unreachable = (redis.RedisError, OSError)  # ``store_unavailable``
        self._redis = redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
                                           retry=Retry(NoBackoff(), 1))

    def create(self, owner: str, counted_as: str | None = None) -> str:
        session, now, mine = secrets.token_urlsafe(16), self._clock(), f"tts:o:{counted_as or owner}"
        with self._redis.pipeline() as tx:
            tx.zremrangebyscore(LIVE, "-inf", now - self.ttl)
            tx.zremrangebyscore(mine, "-inf", now - self.ttl)
            tx.zcard(mine)
            tx.zcard(LIVE)
            held, total = tx.execute()[2:]
        if self.max_per_owner is not None and held >= self.max_per_owner:
            raise too_many(self.max_per_owner)
        if total >= self.max_sessions:
            raise server_full(self.max_sessions)
        with self._redis.pipeline() as tx:
            tx.hset(f"tts:s:{session}", mapping={"owner": owner, "seq": -1, "counted": mine})
            tx.expire(f"tts:s:{session}", int(self.ttl))
            tx.zadd(LIVE, {session: now})
            tx.zadd(mine, {session: now})
            tx.expire(mine, int(self.ttl))
            tx.execute()
        return session

    def touch(self, session: str, owner: str) -> None:
        self._check(session, owner)

    def sweep(self) -> None:
        """Forget expired sessions in the count (their keys expire by themselves)."""
        self._redis.zremrangebyscore(LIVE, "-inf", self._clock() - self.ttl)

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
        mine = self._check(session, owner)
        with self._redis.pipeline() as tx:
            tx.delete(f"tts:s:{session}", f"tts:t:{session}")
            tx.zrem(LIVE, session)
            if mine:
                tx.zrem(mine, session)
            tx.execute()

    def _check(self, session: str, owner: str) -> str | None:
        """``unknown_session`` unless it is this owner's live session; touches it (its keys live ``ttl`` more).
        Returns the key that counts it for ``max_per_owner``."""
        stored, mine = self._redis.hmget(f"tts:s:{session}", ["owner", "counted"])
        if stored is None or stored.decode() != owner:
            raise unknown(session)
        mine, now = mine.decode() if mine else None, self._clock()
        with self._redis.pipeline() as tx:
            tx.expire(f"tts:s:{session}", int(self.ttl))
            tx.expire(f"tts:t:{session}", int(self.ttl))
            tx.zadd(LIVE, {session: now})
            if mine:
                tx.zadd(mine, {session: now})
                tx.expire(mine, int(self.ttl))
            tx.execute()
        return mine

    def close(self) -> None:
        self._redis.close()
