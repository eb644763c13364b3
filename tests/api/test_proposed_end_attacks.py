"""Hostile sequences against a proposed end (``--turn-detector smart-turn``): the utterance stays open while its
transcript is read (``Hearing._decide``), the audio after it held back.  Each test but the no-speech one (which
guards the decision's refusal path) is a defect a hostile review reproduced over the real WebSocket, now fixed:
Smart Turn is made to say "complete" at every ask, and the recogniser is held (its gate) so that the decision waits
while the client does something else."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import pytest
import websockets

from audio_fixtures import spoken
from conftest import csm_slot, read_until, running_server, url
from test_turn_taking import RATE, send, silence, waited_for

START = {"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True}


def always_complete(monkeypatch) -> list:
    """Smart Turn says "complete" at every ask; the asks, as they come."""
    from tts_server.engines.turn_detector import SmartTurn

    asked: list = []
    monkeypatch.setattr(SmartTurn, "complete", lambda self, audio, silence_ms=None: asked.append(silence_ms) or True)
    return asked


def server(tiny_model_dir, stt, **more):
    return running_server(csm_slot(tiny_model_dir), turn_detector="smart-turn", vad_silence_ms=200, stt=stt,
                          stt_language="en", **more)


async def proposed(ws, stt, asked, words: str = "What time is it?") -> None:
    """An utterance whose end Smart Turn heard, its transcript held at the recogniser (the decision waits)."""
    stt.gate.clear()
    await send(ws, silence(0.5), spoken(words, RATE), silence(0.5))
    assert await asyncio.to_thread(waited_for, lambda: stt.calls and asked)


@contextlib.asynccontextmanager
async def deciding(tiny_model_dir, stt, asked):
    """A server and a client listening hands-free, whose utterance's end is being decided: (server, client)."""
    async with server(tiny_model_dir, stt) as running:
        await running.service.speech.loaded.wait()
        async with websockets.connect(url(running), ping_interval=None) as ws:
            await ws.send(json.dumps(START))
            await proposed(ws, stt, asked)
            yield running, ws


async def saved_or_none(ws, timeout: float = 10) -> tuple[dict | None, list[str]]:
    """The next ``turn_saved`` (None if none comes in ``timeout`` s: the transcript takes well under one), and the
    statuses before it."""
    statuses: list[str] = []

    def saved(reply: dict) -> bool:
        statuses.append(reply.get("status"))
        return reply.get("status") == "turn_saved"
    try:
        reply, _, _ = await read_until(ws, saved, timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return None, statuses
    return reply, statuses[:-1]


@pytest.mark.parametrize("message", [START, {"type": "reset"}, {"type": "session"}],
                         ids=["turn_start", "reset", "session"])
async def test_a_message_after_a_finished_utterance_waits_for_its_turn_to_be_saved(tiny_model_dir, whisper_dir,
                                                                                  monkeypatch, message):
    """Smart Turn heard "What time is it?" end; while its transcript is still being made (its end not yet
    decided) the client sends ``turn_start`` (a new answer voice, say), ``reset`` or ``session`` (a new one).  The
    utterance came first: its turn is saved first (not dropped with the old listening, not put into the fresh
    history or the new session), and only then is the message answered."""
    from test_fair_sharing import recording_transcriber

    asked, stt = always_complete(monkeypatch), recording_transcriber(whisper_dir)
    async with deciding(tiny_model_dir, stt, asked) as (running, ws):
        await ws.send(json.dumps(message))
        stt.gate.set()
        await send(ws, silence(0.5))
        saved, statuses = await saved_or_none(ws)
    assert saved is not None and "time" in saved["text"].lower(), statuses
    assert message["type"] not in statuses, statuses  # (its reply, if any, comes after the turn before it)


async def test_a_client_that_leaves_while_its_proposed_end_is_kept_is_no_internal_error(tiny_model_dir, whisper_dir,
                                                                                       monkeypatch, caplog):
    """The client disconnects while the turn ended at its proposed end is being kept (its ``turn_saved`` cannot be
    sent): a closed connection, ended quietly as on a frame's path, never logged as an internal error."""
    from test_fair_sharing import recording_transcriber
    from tts_server.core.conversation import Conversation

    asked, stt = always_complete(monkeypatch), recording_transcriber(whisper_dir)
    keeping, left = asyncio.Event(), asyncio.Event()
    keep = Conversation._keep

    async def slow_keep(self, turn):
        keeping.set()
        await left.wait()  # the client is gone by the time the turn is kept
        await asyncio.sleep(0.5)
        return await keep(self, turn)

    monkeypatch.setattr(Conversation, "_keep", slow_keep)
    caplog.set_level(logging.ERROR)
    async with server(tiny_model_dir, stt) as running:
        await running.service.speech.loaded.wait()
        async with websockets.connect(url(running), ping_interval=None) as ws:  # left before the turn is kept
            await ws.send(json.dumps(START))
            await proposed(ws, stt, asked)
            stt.gate.set()
            await asyncio.wait_for(keeping.wait(), 60)
        left.set()
        await asyncio.sleep(1.5)
    errors = [f"{record.getMessage()} ({record.exc_info and record.exc_info[0].__name__})"
              for record in caplog.records if record.levelno >= logging.ERROR]
    assert not any("internal error" in message for message in errors), errors


async def test_an_utterance_without_words_at_its_proposed_end_is_refused_and_listening_goes_on(
        tiny_model_dir, whisper_dir, monkeypatch):
    """The recogniser hears nothing in an utterance Smart Turn heard end: the decision ends it with
    ``speech_end`` and the no-speech refusal (never an internal error), and the next utterance is heard and saved."""
    from test_fair_sharing import recording_transcriber

    asked, stt = always_complete(monkeypatch), recording_transcriber(whisper_dir)
    recognize, silent = stt.recognize, [True]
    stt.recognize = lambda audio, rate=24000, language=None: (lambda heard: ("", language) if silent[0] else heard)(
        recognize(audio, rate, language))  # (recorded and held at the gate as any call)
    async with deciding(tiny_model_dir, stt, asked) as (running, ws):
        stt.gate.set()
        refused, _, before = await read_until(ws, lambda r: r.get("status") in ("error", "turn_saved"), 60)
        silent[0] = False
        await send(ws, spoken("What time is it?", RATE), silence(0.6))
        saved, _, _ = await read_until(ws, lambda r: r.get("status") in ("error", "turn_saved"), 60)
    assert [reply.get("status") for reply, _ in before] == ["speech_start", "speech_end"]
    assert refused["code"] == "invalid_request" and "No speech" in refused["message"], refused
    assert saved["status"] == "turn_saved" and "time" in saved["text"].lower(), saved


async def test_a_streamed_turn_opened_while_a_proposed_end_is_being_ended_still_times_out(tiny_model_dir,
                                                                                          whisper_dir, monkeypatch):
    """``turn_start`` (a streamed turn) reaches the server while the decision ends the utterance (its ``finish``
    waits its turn on the busy turn-encoding thread): the utterance is kept first, and the new streamed turn, left
    open and silent, is still timed out (the decision must not close the new turn's guard)."""
    import threading
    import time

    from test_fair_sharing import recording_transcriber
    from tts_server.core.listening import Listener

    asked, stt = always_complete(monkeypatch), recording_transcriber(whisper_dir)
    finishing, finish = threading.Event(), Listener.finish
    monkeypatch.setattr(Listener, "finish", lambda self, turn: finishing.set() or time.sleep(1.0) or
                        finish(self, turn))
    async with server(tiny_model_dir, stt, turn_timeout=1.5) as running:
        await running.service.speech.loaded.wait()
        async with websockets.connect(url(running), ping_interval=None) as ws:
            await ws.send(json.dumps(START))
            await proposed(ws, stt, asked)
            stt.gate.set()
            assert await asyncio.to_thread(finishing.wait, 60)
            await ws.send(json.dumps({**START, "vad": False}))
            await send(ws, silence(0.2))  # and nothing more: the streamed turn is left open
            saved, _ = await saved_or_none(ws)
            try:  # (the streamed turn's timeout is 1.5 s)
                timed_out, _, _ = await read_until(ws, lambda r: r.get("status") == "error", 6)
            except (asyncio.TimeoutError, TimeoutError):
                timed_out = None
    assert saved is not None
    assert timed_out is not None and timed_out["code"] == "client_too_slow", timed_out
