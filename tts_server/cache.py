"""The response cache: audio already made for a request whose audio its inputs determine.

Only a request with a ``seed`` and ``context`` off is determined by its inputs,
and only on an engine that is ``seedable`` (CSM; Piper and remote engines are
not).  The key is every request field that shapes the audio or its bytes, plus
a ``salt`` from the front door for prompt state the request does not show (the
speaker's default voice an HTTP request is given).  An entry holds the exact
bytes that were sent, so a hit answers byte for byte what the first request
got.  Least recently used entries go first once the entries' bytes would pass
``max_bytes``.  Entries are put from worker threads, looked up on the loop:
one lock guards the map.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, Hashable

from .protocol import SynthesisRequest


@dataclass(frozen=True)
class Entry:
    audio: bytes  # every audio byte the first request was sent (a whole file, or the stream, header included)
    engine: str
    meta: dict[str, Any]  # what its replies said: engine, voice, duration_s, truncated, chunks


def key(request: SynthesisRequest, salt: Hashable) -> tuple | None:
    """The cache key of ``request``, or ``None`` when its audio is not determined by its inputs."""
    if request.seed is None or request.context:
        return None
    return (request.engine, request.text, request.speaker, request.seed, request.temperature, request.top_k,
            request.max_audio_length_ms, request.format, request.stream, request.emotion, request.speed,
            request.language, salt)


class AudioCache:
    """An LRU map from request keys to ``Entry``, bounded by the entries' audio bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: collections.OrderedDict[tuple, Entry] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, cache_key: tuple) -> Entry | None:
        """The entry for ``cache_key`` (now the most recently used), counting a hit or a miss."""
        with self._lock:
            entry = self._entries.get(cache_key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(cache_key)
            self.hits += 1
            return entry

    def put(self, cache_key: tuple, entry: Entry) -> bool:
        """Keep ``entry``, dropping the least recently used ones to stay within ``max_bytes``."""
        size = len(entry.audio)
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(cache_key, None)
            if old is not None:
                self.bytes -= len(old.audio)
            while self._entries and self.bytes + size > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= len(dropped.audio)
                self.evictions += 1
            self._entries[cache_key] = entry
            self.bytes += size
            return True

    def describe(self) -> dict[str, Any]:
        looked = self.hits + self.misses
        return {"max_bytes": self.max_bytes, "bytes": self.bytes, "entries": len(self._entries), "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions,
                "hit_rate": round(self.hits / looked, 4) if looked else None}
