"""The response cache: audio already made for a request whose audio its inputs determine.

Only a request with a ``seed`` and ``context`` off is determined by its inputs,
and only on an engine that is ``seedable`` (CSM; Piper and remote engines are
not).  A request that asks for ``timestamps`` or ``progress`` is never answered
from the cache: an entry holds audio, not the replies that come beside it.  The key is every request field
marked as shaping the audio or the replies (``SHAPING_FIELDS``: all but ``request_id``), so a new field is in it
unless it says otherwise, plus a ``salt`` from the front door for prompt state the request does not show (the
speaker's default voice an HTTP request is given).  An entry holds the exact
bytes that were sent, so a hit answers byte for byte what the first request
got.  Least recently used entries go first once the entries' bytes would pass
``max_bytes``, counted with their keys (a 4,000-character text weighs more than
a short clip) by cachetools' ``LRUCache``.  Entries are put from worker threads, looked up on the loop:
one lock guards the map.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, fields
from typing import Any, Hashable

import cachetools

from ..engines.request import SHAPING_FIELDS, SynthesisRequest
from .events import Succeeded


@dataclass(frozen=True)
class Entry:
    audio: bytes  # every audio byte the first request was sent (a whole file, or the stream, header included)
    engine: str
    success: Succeeded  # what its reply said (engine, voice, duration_s, truncated, chunks): a hit says it again


def key(request: SynthesisRequest, salt: Hashable) -> tuple | None:
    """The cache key of ``request``, or ``None`` when its audio is not determined by its inputs, or when it asks for
    replies beside the audio (word times, progress) that an entry does not hold: those are always made afresh."""
    if request.seed is None or request.context or request.timestamps or request.progress:
        return None
    return (*(getattr(request, name) for name in SHAPING_FIELDS), salt)


class _Lru(cachetools.LRUCache):
    """cachetools' LRU map, counting what it evicts."""

    evictions = 0

    def popitem(self):
        self.evictions += 1
        return super().popitem()


def _size(cache_key: tuple, entry: Entry) -> int:
    """What an entry holds in memory: its audio, its key (a long text can outweigh short audio) and its replies."""
    said = entry.success
    return len(entry.audio) + sys.getsizeof(cache_key) + sum(sys.getsizeof(part) for part in cache_key) + \
        sys.getsizeof(said) + sum(sys.getsizeof(getattr(said, field.name)) for field in fields(said))


class AudioCache:
    """An LRU map from request keys to ``Entry``, bounded by the bytes of entries and keys together."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries = _Lru(max(max_bytes, 1), getsizeof=lambda item: item[1])
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes(self) -> int:
        return int(self._entries.currsize)

    @property
    def evictions(self) -> int:
        return self._entries.evictions

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, cache_key: tuple) -> Entry | None:
        """The entry for ``cache_key`` (now the most recently used), counting a hit or a miss."""
        with self._lock:
            item = self._entries.get(cache_key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            return item[0]

    def put(self, cache_key: tuple, entry: Entry) -> bool:
        """Keep ``entry``, dropping the least recently used ones to stay within ``max_bytes``."""
        size = _size(cache_key, entry)
        if size > self.max_bytes:
            return False
        with self._lock:
            self._entries[cache_key] = (entry, size)
            return True

    def describe(self) -> dict[str, Any]:
        looked = self.hits + self.misses
        return {"max_bytes": self.max_bytes, "bytes": self.bytes, "entries": len(self._entries), "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions,
                "hit_rate": round(self.hits / looked, 4) if looked else None}
