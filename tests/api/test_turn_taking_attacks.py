"""Hostile and busy sequences against the turn-taking paths (known-language transcription, preemptive answers), each
a defect a hostile review reproduced: audio without speech made up a sentence once the language was known, and a
preemptive answer refused at the queue kept its chat stream open."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from audio_fixtures import audio_bytes, speechlike, spoken
from conftest import csm_slot, recv_json, running_server, url
from fake_chat import FakeChat
from test_turn_taking import send, silence, started_chats
from test_voice_chat import ANSWER, server_options, until

RATE = 16000


@pytest.mark.parametrize("language", [None, "en"])
async def test_a_turn_without_speech_is_refused_whether_or_not_its_language_is_known(tiny_model_dir, whisper_dir,
                                                                                    language):
    """Whisper, heard through a short window in a known language, makes up "I'm sorry." for a tone: the no-speech
    check (its no-speech probability and confidence, as faster-whisper's own path) refuses it as before."""
    async with running_server(csm_slot(tiny_model_dir), stt_language=language,
                              **server_options(whisper_dir, None)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "turn", "speaker": 1}))  # no text: the server transcribes it
            await ws.send(audio_bytes(speechlike(1.0)))  # a voiced tone: no words in it
            reply = await recv_json(ws)
    assert reply["status"] == "error" and "No speech was recognized" in reply["message"], reply


async def test_an_answer_refused_at_the_queue_hangs_up_the_chat_stream_begun_for_it(tiny_model_dir, whisper_dir):
    """One request may wait per connection: the first turn's answer holds it (its chat stream idles after the
    answer, so the job waits for more).  The second turn's answer is begun at its pause, then refused at its end:
    that chat stream must be hung up, at the latest when the connection closes."""
    with FakeChat(ANSWER, delay=0.05, idle=0.5) as chat:
        async with running_server(csm_slot(tiny_model_dir), turn_detector="vad", vad_silence_ms=600,
                                  max_queued_per_connection=1, stt_language="en",
                                  **server_options(whisper_dir, chat)) as server:
            async with websockets.connect(url(server)) as ws:
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True,
                                          "respond": {"speaker": 0, "seed": 1}}))
                await send(ws, silence(0.5), spoken("Tell me a story.", RATE), silence(1.0))
                await until(ws, "start")
                await send(ws, spoken("My favourite colour is green.", RATE), silence(0.4))
                begun = await asyncio.to_thread(started_chats, chat, 2)
                await send(ws, silence(0.6))
                refused, _, _ = await until(ws, "error")
            for _ in range(100):  # the connection has closed: every stream it began is hung up
                if chat.hangups >= len(chat.started):
                    break
                await asyncio.sleep(0.1)
            started, hung_up = len(chat.started), chat.hangups
    assert begun and refused["code"] == "too_many_queued"
    assert hung_up == started == 2
