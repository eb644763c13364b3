"""The session store as the event loop calls it: on threads of its own, with a deadline, its failures coded.

Store calls block (SQLite's disk, Redis's network).  They run on a small pool of
their own, never on asyncio's default executor (the OpenAI endpoint encodes
audio there) nor on an engine's worker (a reply's turns are stored after its
generation, by the scheduler, on the loop): a stalled store holds up the
requests that need it and no others.  A call that does not answer within
``deadline`` seconds, or that fails because the store cannot be reached, is
``store_unavailable`` (HTTP 503); every call tries the store again, so one that
comes back is used at once, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from ..engines.base import ContextTurn
from . import replies as r
from .session_redis import RedisSessionStore
from .sessions import SessionStore, StoredTurn

log = logging.getLogger(__name__)
DEADLINE = 2.0  # seconds a store call may take
THREADS = 4


STORES = "sqlite:///PATH, redis://HOST:PORT/DB or memory"  # what --session-store takes


def store_kind(url: str) -> str:
    """``memory``, ``sqlite`` or ``redis`` for a ``--session-store`` value; ``ValueError`` naming what it takes."""
    parsed = urlparse(url)
    if url == "memory":
        return "memory"
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return "sqlite"
    if parsed.scheme == "redis" and parsed.hostname:
        return "redis"
    raise ValueError(f"{url!r} is not {STORES}")


def open_store(url: str, **limits):
    """The one place that picks the store for ``--session-store`` (``limits``: ttl, max_sessions, max_bytes,
    max_per_owner): SQLite (a file, or memory) in this process, or Redis shared by replicas."""
    if store_kind(url) == "redis":
        return RedisSessionStore(url, **limits)
    return SessionStore.open(url, **limits)


class Sessions:
    """Async front of a ``SessionStore`` or ``RedisSessionStore`` (the same methods, awaited)."""

    @classmethod
    def open(cls, url: str, **limits) -> "Sessions":
        return cls(open_store(url, **limits))

    def __init__(self, store, deadline: float = DEADLINE, threads: int = THREADS) -> None:
        self.store = store
        self.deadline = deadline
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="session-store")
        self._down: str | None = None  # why the last call failed (logged once per outage)

    async def create(self, owner: str, counted_as: str | None = None) -> str:
        return await self._call("create", owner, counted_as)

    async def touch(self, session: str, owner: str) -> None:
        """The session is this owner's and the store answers: asked before a reply that joins it is generated, so a
        refusal comes before the audio, not after it."""
        await self._call("touch", session, owner)

    async def turns(self, session: str, owner: str) -> list[StoredTurn]:
        return await self._call("turns", session, owner)

    async def append(self, session: str, owner: str, turn: StoredTurn) -> int:
        return await self._call("append", session, owner, turn)

    async def extend(self, session: str, owner: str, turns: list[ContextTurn]) -> list[int]:
        return await self._call("extend", session, owner, list(turns))

    async def replace(self, session: str, owner: str, seqs: list[int], turns: list[ContextTurn]) -> None:
        await self._call("replace", session, owner, seqs, turns)

    async def delete(self, session: str, owner: str) -> None:
        await self._call("delete", session, owner)

    async def sweep_every(self, seconds: float) -> None:
        """Delete expired sessions every ``seconds`` (a background task): expiry does not wait for a new session."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self._call("sweep")
            except r.Refusal as exc:  # the store is down (``_call`` logged the outage): the next sweep retries
                log.debug("Sweep skipped: %s", exc.message)
            except Exception:
                log.exception("Sweeping expired sessions failed")

    async def _call(self, method: str, *args: Any) -> Any:
        future = self._pool.submit(getattr(self.store, method), *args)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), self.deadline)
        except asyncio.TimeoutError:  # a call still waiting for a thread is dropped (wait_for cancelled it)
            raise self._unavailable(f"it did not answer within {self.deadline:g} s") from None
        except self.store.unreachable as exc:  # the client is told the kind; the log has the details
            raise self._unavailable(type(exc).__name__, str(exc)) from None
        if self._down is not None:
            log.info("The session store answers again")
            self._down = None
        return result

    def _unavailable(self, why: str, detail: str = "") -> r.Refusal:
        if self._down is None:
            log.warning("The session store is unavailable: %s %s", why, detail)
        self._down = why
        return r.Refusal(r.ErrorCode.STORE_UNAVAILABLE, f"The session store is unavailable ({why}); what was "
                                                        "stored before is kept: retry shortly")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()
