"""LiveKit Agents (from PyPI) speaking through ``tts_server.integrations.livekit.TTS`` to a real server with a tiny
CSM, no network: ``synthesize()``, ``stream()``, interruptions and the user's turns."""

from __future__ import annotations

import asyncio

import numpy as np
from livekit import rtc
from livekit.agents.tts.tts import USERDATA_TIMED_TRANSCRIPT

from audio_fixtures import speechlike
from conftest import csm_slot, running_server, session_turns, url
from tts_server.engines.stt import Transcriber
from tts_server.integrations.livekit import TTS

TEXT = "Hello there, my friend. The price is 3.5 dollars today."


async def audio_and_words(events) -> tuple[bytes, list[str]]:
    audio, words = bytearray(), []
    async for event in events:
        audio += bytes(event.frame.data)
        words += [str(w).strip() for w in event.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT) or []]
    return bytes(audio), words


async def test_synthesize_and_a_stream_of_tokens_give_the_same_seeded_audio_with_aligned_words(
        tiny_model_dir, whisper_dir):
    options = {"seed": 4, "context": False, "max_audio_length_ms": 4000}
    async with running_server(csm_slot(tiny_model_dir), stt=Transcriber(str(whisper_dir), "cpu", local_only=True)) \
            as server:
        await server.service.speech.loaded.wait()
        voice = TTS(url=url(server), options=options)
        whole, whole_words = await audio_and_words(voice.synthesize(TEXT))
        stream = voice.stream()
        for at in range(0, len(TEXT), 5):  # tokens cut mid-word and mid-number
            stream.push_text(TEXT[at:at + 5])
        stream.end_input()
        streamed, streamed_words = await audio_and_words(stream)
        await voice.aclose()
    assert whole and streamed.rstrip(b"\0") == whole.rstrip(b"\0")  # LiveKit pads a last frame with silence
    assert whole_words == streamed_words == TEXT.split()


async def test_a_stream_closed_mid_answer_leaves_only_what_was_played_in_the_session(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir, delay=0.08)) as server:
        voice = TTS(url=url(server), options={"seed": 4, "max_audio_length_ms": 8000})
        stream = voice.stream()
        stream.push_text("One two three four five six seven eight nine ten. Eleven twelve thirteen fourteen.")
        stream.flush()
        heard = 0
        async for event in stream:  # played in real time, as a room would
            heard += len(bytes(event.frame.data))
            await asyncio.sleep(event.frame.duration)
            if heard / 2 / 24000 >= 1.0:
                break
        await stream.aclose()
        while not voice.cuts:
            await asyncio.sleep(0.05)
        turns = await session_turns(server, voice.session_id)
        await voice.aclose()
    cut = voice.cuts[-1]
    assert 0.5 < cut["played_ms"] / 1000 <= heard / 2 / 24000 + 0.08
    assert abs(cut["kept_s"] - cut["played_ms"] / 1000) <= 0.08
    assert abs(sum(t["duration_s"] for t in turns) - cut["kept_s"]) <= 0.08


async def test_a_users_turn_joins_the_session_and_the_next_reply_is_spoken_in_its_context(tiny_model_dir):
    pcm = (np.clip(speechlike(1.0, rate=16000), -1, 1) * 32767).astype(np.int16)
    frames = [rtc.AudioFrame(pcm[i:i + 320].tobytes(), 16000, 1, len(pcm[i:i + 320])) for i in range(0, len(pcm), 320)]
    options = {"seed": 8, "max_audio_length_ms": 800}
    async with running_server(csm_slot(tiny_model_dir)) as server:
        voice = TTS(url=url(server), options=options)
        saved = await voice.user_turn(frames, "Is it raining?")
        heard, _ = await audio_and_words(voice.synthesize("Not today."))
        fresh = TTS(url=url(server), options=options)
        unheard, _ = await audio_and_words(fresh.synthesize("Not today."))
        stored = await session_turns(server, voice.session_id)
        await voice.aclose()
        await fresh.aclose()
    assert saved["status"] == "turn_saved" and saved["text"] == "Is it raining?" and abs(saved["duration_s"] - 1) < .1
    assert [(t["speaker"], t["text"]) for t in stored] == [(1, "Is it raining?"), (0, "Not today.")]
    assert heard and unheard and heard != unheard
