"""Sessions in Redis (``--session-store redis://host:port/db``), for several replicas behind a load balancer.

The same contract as the SQLite store (``sessions.SessionStore``): a turn that was
acknowledged is in Redis (durable as far as Redis is configured to be: run it
with ``appendonly yes``).  Keys, per session: ``tts:s:<id>`` (a hash: owner),
``tts:t:<id>`` (a list of turns, oldest first, each a JSON header line and its
16-bit codes), both expiring after ``ttl`` seconds without use; ``tts:live`` (a
sorted set of ids by last use) counts sessions for ``max_sessions``, and
``tts:o:<counted_as>`` those of one key or address for ``max_per_owner``.  Each
call is one MULTI/EXEC transaction (``WATCH`` where it reads before it writes);
``create`` is one script (``CREATE``): its counts and its insert are one step,
so creates racing from many connections or replicas never pass the caps.

The client waits at most ``TIMEOUT`` s for Redis.  A command that could not be
sent (a pooled connection that Redis's restart broke) is sent again at once on
a new connection; one that was sent and not answered in time is not: a stalled
Redis carries it out when it resumes, and sending it again would store a turn
twice.  The caller is told ``store_unavailable`` (the write may yet land).
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
# KEYS: the live set, the owner's set, the session's hash; ARGV: id, now, ttl, max per owner (-1: none), max
# sessions, owner, counted key.  0: created (or already was: a resent create), 1: the owner's cap, 2: the server's.
CREATE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
if tonumber(ARGV[4]) >= 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[5]) then return 2 end
redis.call('HSET', KEYS[3], 'owner', ARGV[6], 'seq', -1, 'counted', ARGV[7])
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('EXPIRE', KEYS[2], ttl)
return 0
"""


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
                                           retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
        self._create = self._redis.register_script(CREATE)

    def create(self, owner: str, counted_as: str | None = None) -> str:
        session, mine = secrets.token_urlsafe(16), f"tts:o:{counted_as or owner}"
        refused = self._create(keys=[LIVE, mine, f"tts:s:{session}"], args=[
            session, self._clock(), int(self.ttl), -1 if self.max_per_owner is None else self.max_per_owner,
            self.max_sessions, owner, mine])
        if refused == 1:
            raise too_many(self.max_per_owner)
        if refused == 2:
            raise server_full(self.max_sessions)
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
        with self._redis.pipeline() as tx:  # deleted meanwhile: the hash this makes again expires too
            tx.hincrby(f"tts:s:{session}", "seq", 1)
            tx.expire(f"tts:s:{session}", int(self.ttl))
            seq = tx.execute()[0]
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
