"""Wire settings to engines and the server; the body of ``run_server.py``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Sequence

from .api.server import TTSServer
from .core.context import ReferenceLibrary
from .core.jobs import EngineSlot
from .core.security import Gate, redact_logs
from .engines import registry
from .engines.model_source import ModelSourceError
from .engines.addresses import url_secrets
from .engines.chat import ChatModel
from .engines.stt import Transcriber
from .settings import Settings, load_settings

log = logging.getLogger("tts_server")


def engine_slot(name: str, settings: Settings) -> EngineSlot:
    """One engine of the chain, made by its registry entry (a bad CSM ``--model-path`` raises
    ``ModelSourceError`` here, at the start, not when it loads)."""
    return EngineSlot(registry.build(name, settings))


def build_server(settings: Settings) -> TTSServer:
    """The engine chain per ``--engines`` (or its shorthands ``--engine`` / ``--fallback``; see the README)."""
    engines = [engine_slot(name, settings) for name in settings.chain()]
    return TTSServer(*engines, overflow_engine=settings.overflow_engine, cache_bytes=int(settings.cache_mb * 2**20),
                     engine_costs=settings.costs(), host=settings.host, port=settings.port,
                     max_queue=settings.max_queue,
                     max_text_chars=settings.max_text_chars, sample_rate=settings.sample_rate,
                     stream_buffer_seconds=settings.stream_buffer_seconds,
                     library=ReferenceLibrary(settings.references, settings.pin_voices == "on"),
                     max_context_turns=settings.max_context_turns,
                     gate=Gate(_split(settings.api_key), _split(settings.allowed_origins)),
                     max_connections=settings.max_connections,
                     max_connections_per_address=settings.max_connections_per_address,
                     rate_limit=settings.rate_limit, max_queued_per_connection=settings.max_queued_per_connection,
                     max_frame_bytes=settings.max_frame_bytes, max_voice_bytes=settings.max_voice_bytes,
                     max_voice_seconds=settings.max_voice_seconds, generation_timeout=settings.generation_timeout,
                     text_timeout=settings.text_timeout,
                     trusted_proxies=_split(settings.trusted_proxies), wyoming_uri=settings.wyoming_uri,
                     wyoming_zeroconf=settings.wyoming_zeroconf, request_timeout=settings.request_timeout,
                     write_timeout=settings.write_timeout, session_store=settings.session_store,
                     session_ttl=settings.session_ttl, max_sessions=settings.max_sessions,
                     max_sessions_per_owner=settings.max_sessions_per_owner,
                     max_session_bytes=settings.max_session_bytes,
                     stt=Transcriber(settings.stt_model, settings.device, local_only=settings.mode == "reuse")
                     if settings.stt_model else None, vad_silence_ms=settings.vad_silence_ms,
                     turn_detector=settings.turn_detector, turn_max_silence_ms=settings.turn_max_silence_ms,
                     stt_language=settings.stt_language,
                     chat=ChatModel(settings.chat_url, settings.chat_model, settings.chat_api_key,
                                    settings.chat_system_prompt) if settings.chat_url else None)


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


async def serve(settings: Settings) -> None:
    server = build_server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown(settings.shutdown_grace)
    log.info("Stopped")


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread heaps: worker threads otherwise grow resident memory under long load.

    Measured with bench/load.py (Piper, 64 connections): resident memory kept creeping up round after round
    with glibc's default arena count and settled with two. No effect (and no error) on other C libraries.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8 = M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    limit_malloc_arenas()
    settings = load_settings(argv)
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logs((*_split(settings.api_key), *(s for s in (settings.hf_token, settings.remote_api_key, settings.chat_api_key) if s),
                 *url_secrets(settings.remote_url), *url_secrets(settings.chat_url)))  # an address's password, query
    try:
        asyncio.run(serve(settings))
    except ModelSourceError as exc:
        log.error("Cannot start: %s", exc)
        return 2
    return 0
