"""Prometheus metrics and the per-engine statistics summarised in ``/v1/info``.

Each server owns its own ``CollectorRegistry`` (several servers can live in one
test process).  Labels are engine names and fixed status words only: nothing a
client sends, and no secret, ever becomes a label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .jobs import EngineState

SHARED_THREADS = ("stt", "turn_encoding")
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


@dataclass
class EngineStats:
    requests: int = 0
    failures: int = 0
    fallbacks: int = 0  # requests it answered in place of an earlier engine of the chain (failed, full)
    characters: int = 0
    audio_seconds: float = 0.0
    latency_total_s: float = 0.0
    successes: int = 0
    cache_hits: int = 0  # requests answered from the cache with audio it made
    cache_misses: int = 0  # cacheable requests it had to run
    last_used: float | None = None  # unix time its last request ended (cache hits included)

    def summary(self, usd_per_million_chars: float | None = None) -> dict[str, Any]:
        looked = self.cache_hits + self.cache_misses
        summary = {
            "requests": self.requests, "failures": self.failures, "fallbacks": self.fallbacks,
            "characters": self.characters, "audio_seconds": round(self.audio_seconds, 3),
            "mean_latency_s": round(self.latency_total_s / self.successes, 4) if self.successes else None,
            "cache_hits": self.cache_hits, "cache_hit_rate": round(self.cache_hits / looked, 4) if looked else None,
            "last_used": self.last_used,
        }
        if usd_per_million_chars is not None:
            summary["usd_per_million_chars"] = usd_per_million_chars
            summary["estimated_spend_usd"] = round(self.characters * usd_per_million_chars / 1e6, 6)
        return summary


class Metrics:
    def __init__(self, prices: dict[str, float] | None = None) -> None:
        self.prices = dict(prices or {})  # engine -> USD per million characters (--engine-cost)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tts_requests", "Finished synthesis requests", ["engine", "status"], registry=r)
        self.characters = Counter("tts_characters", "Characters of text synthesized", ["engine"], registry=r)
        self.audio_seconds = Counter("tts_audio_seconds", "Seconds of audio produced", ["engine"], registry=r)
        self.generation = Histogram("tts_generation_seconds", "Wall time from start of work to last audio",
                                    ["engine"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfa = Histogram("tts_time_to_first_audio_seconds", "Wall time from start of work to first audio",
                              ["engine"], buckets=_LATENCY_BUCKETS, registry=r)
        self.interface_requests = Counter("tts_interface_requests", "Finished synthesis requests per interface",
                                          ["interface", "status"], registry=r)
        self.fallbacks = Counter("tts_engine_fallbacks", "Requests an engine answered in place of an earlier "
                                 "engine of the chain", ["engine"], registry=r)
        self.last_used = Gauge("tts_engine_last_used_timestamp_seconds", "Unix time an engine last finished a "
                               "request", ["engine"], registry=r)
        self.spend = Counter("tts_engine_spend_usd", "Estimated spend at --engine-cost prices", ["engine"], registry=r)
        self.cache_hits = Counter("tts_cache_hits", "Requests answered from the response cache", ["engine"],
                                  registry=r)
        self.cache_misses = Counter("tts_cache_misses", "Cacheable requests an engine had to generate", ["engine"],
                                    registry=r)
        self.cache_bytes = Gauge("tts_cache_bytes", "Audio bytes held by the response cache", registry=r)
        self.cache_entries = Gauge("tts_cache_entries", "Responses held by the response cache", registry=r)
        self.queue_depth = Gauge("tts_queue_depth", "Requests waiting for the worker", registry=r)
        self.connections = Gauge("tts_active_connections", "Open connections of every interface (WebSocket, HTTP, "
                                 "Wyoming), as --max-connections counts them", registry=r)
        self.engine_state = Gauge("tts_engine_state", "1 for the engine's current state", ["engine", "state"],
                                  registry=r)
        # the model threads every connection shares (speech recognition, turn encoding): fair.FairThread
        self.shared_queued = Gauge("tts_shared_thread_queued", "Items waiting for a shared model thread",
                                   ["thread"], registry=r)
        self.shared_dropped = Counter("tts_shared_thread_dropped", "Items dropped before they ran on a shared model "
                                      "thread: their request ended or their connection closed", ["thread"], registry=r)
        for thread in SHARED_THREADS:
            self.shared_queued.labels(thread)
            self.shared_dropped.labels(thread)
        self.stats: dict[str, EngineStats] = {}
        self.interfaces: dict[str, dict[str, int]] = {}  # interface -> status -> finished requests

    def observe(self, engine: str, status: str, characters: int, seconds: float, audio_seconds: float = 0.0,
                ttfa_seconds: float | None = None, interface: str = "websocket", fallback: bool = False,
                cache_miss: bool = False) -> None:
        """Record one finished run of an engine (success, error or cancelled)."""
        self.requests.labels(engine, status).inc()
        self._finished(interface, status)
        stats = self._used(engine)
        stats.requests += 1
        if status == "error":
            stats.failures += 1
        if cache_miss:
            stats.cache_misses += 1
            self.cache_misses.labels(engine).inc()
        if status != "success":
            return
        if fallback:
            stats.fallbacks += 1
            self.fallbacks.labels(engine).inc()
        self.characters.labels(engine).inc(characters)
        self.audio_seconds.labels(engine).inc(audio_seconds)
        self.generation.labels(engine).observe(seconds)
        if ttfa_seconds is not None:
            self.ttfa.labels(engine).observe(ttfa_seconds)
        if engine in self.prices:
            self.spend.labels(engine).inc(characters * self.prices[engine] / 1e6)
        stats.successes += 1
        stats.characters += characters
        stats.audio_seconds += audio_seconds
        stats.latency_total_s += seconds

    def cache_hit(self, engine: str, status: str, interface: str) -> None:
        """Record a request answered from the cache with audio ``engine`` made (no engine ran)."""
        self._finished(interface, status)
        self._used(engine).cache_hits += 1
        self.cache_hits.labels(engine).inc()

    def summary(self, engine: str) -> dict[str, Any]:
        return self.stats.get(engine, EngineStats()).summary(self.prices.get(engine))

    def _finished(self, interface: str, status: str) -> None:
        self.interface_requests.labels(interface, status).inc()
        counts = self.interfaces.setdefault(interface, {})
        counts[status] = counts.get(status, 0) + 1

    def _used(self, engine: str) -> EngineStats:
        stats = self.stats.setdefault(engine, EngineStats())
        stats.last_used = round(time.time(), 3)
        self.last_used.labels(engine).set(stats.last_used)
        return stats

    def set_engine_state(self, engine: str, state: EngineState) -> None:
        for candidate in EngineState:
            self.engine_state.labels(engine, candidate.value).set(1 if candidate == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
