"""Prometheus metrics and the per-engine statistics summarised in ``/v1/info``.

Each server owns its own ``CollectorRegistry`` (several servers can live in one
test process).  Labels are engine names and fixed status words only: nothing a
client sends, and no secret, ever becomes a label.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENGINE_STATES = ("loading", "ready", "failed")
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


@dataclass
class EngineStats:
    requests: int = 0
    failures: int = 0
    characters: int = 0
    audio_seconds: float = 0.0
    latency_total_s: float = 0.0

    def summary(self) -> dict[str, float | int]:
        done = self.requests
        return {
            "requests": self.requests, "failures": self.failures, "characters": self.characters,
            "audio_seconds": round(self.audio_seconds, 3),
            "mean_latency_s": round(self.latency_total_s / done, 4) if done else None,
        }


class Metrics:
    def __init__(self) -> None:
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
        self.queue_depth = Gauge("tts_queue_depth", "Requests waiting for the worker", registry=r)
        self.connections = Gauge("tts_active_connections", "Open WebSocket connections", registry=r)
        self.engine_state = Gauge("tts_engine_state", "1 for the engine's current state", ["engine", "state"],
                                  registry=r)
        self.stats: dict[str, EngineStats] = {}
        self.interfaces: dict[str, dict[str, int]] = {}  # interface -> status -> finished requests

    def observe(self, engine: str, status: str, characters: int, seconds: float,
                audio_seconds: float = 0.0, ttfa_seconds: float | None = None, interface: str = "websocket") -> None:
        """Record one finished request (success, error or cancelled)."""
        self.requests.labels(engine, status).inc()
        self.interface_requests.labels(interface, status).inc()
        counts = self.interfaces.setdefault(interface, {})
        counts[status] = counts.get(status, 0) + 1
        stats = self.stats.setdefault(engine, EngineStats())
        stats.requests += 1
        if status == "error":
            stats.failures += 1
        if status != "success":
            return
        self.characters.labels(engine).inc(characters)
        self.audio_seconds.labels(engine).inc(audio_seconds)
        self.generation.labels(engine).observe(seconds)
        if ttfa_seconds is not None:
            self.ttfa.labels(engine).observe(ttfa_seconds)
        stats.characters += characters
        stats.audio_seconds += audio_seconds
        stats.latency_total_s += seconds

    def set_engine_state(self, engine: str, state: str) -> None:
        for candidate in ENGINE_STATES:
            self.engine_state.labels(engine, candidate).set(1 if candidate == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
