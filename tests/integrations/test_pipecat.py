"""Pipecat (from PyPI) speaking through ``CSMTTSService`` to a real server with a tiny CSM, no network: pipelines built
with Pipecat's own test helpers (``pipecat.tests.utils.run_test``)."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
from pipecat.frames.frames import (InputAudioRawFrame, InterruptionFrame, LLMFullResponseEndFrame,
                                   LLMFullResponseStartFrame, LLMTextFrame, TranscriptionFrame, TTSAudioRawFrame,
                                   TTSStoppedFrame, TTSTextFrame, UserStartedSpeakingFrame,
                                   UserStoppedSpeakingFrame)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection
from pipecat.tests.utils import SleepFrame, run_test

from audio_fixtures import speechlike
from conftest import csm_slot, running_server, session_turns, url
from tts_server.engines.stt import Transcriber
from tts_server.integrations.pipecat import CSMTTSService, CSMUserTurns

ANSWER = ["Hello there, my friend. ", "How are you today?"]


def response(*texts: str) -> list:
    return [LLMFullResponseStartFrame(), *(LLMTextFrame(text) for text in texts), LLMFullResponseEndFrame()]


def stopped(tts: CSMTTSService):
    """A check that ``tts`` has pushed a ``TTSStoppedFrame`` downstream (its reply's audio and words are out)."""
    pushed, push = [], tts.push_frame

    async def spy(frame, direction=FrameDirection.DOWNSTREAM):
        pushed.append(frame)
        await push(frame, direction)
    tts.push_frame = spy
    return lambda: any(isinstance(frame, TTSStoppedFrame) for frame in pushed)


def then_until(frames, done, then_s: float = 0.3, limit_s: float = 60):
    """``frames``, then pauses until ``done()`` (a reply received to its end), then ``then_s`` more: for
    ``run_test``, which sends its frames lazily and ends the pipeline after the last."""
    yield from frames
    for _ in range(int(limit_s / 0.1)):
        if done():
            break
        yield SleepFrame(sleep=0.1)
    yield SleepFrame(sleep=then_s)


async def test_a_pipecat_pipeline_gets_csm_audio_at_its_rate_and_word_timestamps_for_its_context(
        tiny_model_dir, whisper_dir):
    """The server's word times reach Pipecat, which sends each word's text when its time comes; words still unsent
    when the audio ends (here the last sentence's: no output transport plays the audio in real time) go together."""
    async with running_server(csm_slot(tiny_model_dir), stt=Transcriber(str(whisper_dir), "cpu", local_only=True)) \
            as server:
        await server.service.speech.loaded.wait()
        tts = CSMTTSService(url=url(server), sample_rate=16000, options={"seed": 3, "max_audio_length_ms": 4000})
        down, _ = await run_test(tts, frames_to_send=then_until(response(*ANSWER), stopped(tts)))
        turns = await session_turns(server, tts.session_id)
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio and {f.sample_rate for f in audio} == {16000}
    spoken = [f.text for f in down if isinstance(f, TTSTextFrame)]
    assert " ".join(spoken).split() == "".join(ANSWER).split(), spoken  # all of it, in order, in the context
    assert spoken[:4] == ANSWER[0].split(), spoken  # the first sentence word by word, at its times
    # (the service pushed its TTSStoppedFrame: the run waited for it, ``stopped``)
    assert [t["text"] for t in turns] == [text.strip() for text in ANSWER]  # one reply, both sentences, stored
    seconds = sum(len(f.audio) for f in audio) / 2 / 16000  # all of it
    assert abs(seconds - sum(t["duration_s"] for t in turns)) < 0.1, (seconds, turns)


async def test_an_interruption_mid_answer_leaves_only_what_was_played_in_the_session(tiny_model_dir):
    """CSM is slowed to real time (the tiny model is faster than that): the interruption lands mid-answer, the
    cancel carries what the service pushed out, and the session keeps that, within one 80 ms frame."""
    async with running_server(csm_slot(tiny_model_dir, delay=0.08)) as server:
        tts = CSMTTSService(url=url(server), sample_rate=24000, options={"seed": 3, "max_audio_length_ms": 8000})
        answer = response("One two three four five six seven eight nine ten. ", "Eleven twelve thirteen fourteen.")
        heard = then_until(answer, lambda: any(tts.played_ms(c) > 700 for c in list(tts._played)), then_s=0)
        down, _ = await run_test(tts, frames_to_send=then_until(itertools.chain(heard, [InterruptionFrame()]),
                                                                lambda: tts.cuts))
        turns = await session_turns(server, tts.session_id)
    cut = tts.cuts[-1]
    played_s = sum(len(f.audio) for f in down if isinstance(f, TTSAudioRawFrame)) / 2 / 24000
    assert 0.7 < cut["played_ms"] / 1000 <= played_s + 0.08
    assert abs(cut["kept_s"] - cut["played_ms"] / 1000) <= 0.08
    assert abs(sum(t["duration_s"] for t in turns) - cut["kept_s"]) <= 0.08


async def test_csm_user_turns_stream_the_users_voice_into_the_session_and_the_next_reply_hears_it(tiny_model_dir):
    """A user's turn (audio frames between user-started and user-stopped speaking, and the 0.3 s just before it:
    a VAD says "started" late, with the STT's transcript) is saved in the TTS service's session; the next seeded
    reply differs from the same reply without that turn."""
    voice = (np.clip(speechlike(1.2, rate=16000), -1, 1) * 32767).astype(np.int16).tobytes()
    frames = [InputAudioRawFrame(audio=voice[i:i + 640], sample_rate=16000, num_channels=1)
              for i in range(0, len(voice), 640)]
    options = {"seed": 9, "max_audio_length_ms": 800}
    async with running_server(csm_slot(tiny_model_dir)) as server:
        tts = CSMTTSService(url=url(server), sample_rate=24000, options=options)
        turns = CSMUserTurns(tts, speaker=1)
        heard, _ = await run_test(Pipeline([turns, tts]), frames_to_send=then_until([
            *frames[:15], UserStartedSpeakingFrame(), *frames[15:], UserStoppedSpeakingFrame(),
            TranscriptionFrame("What time is it?", "user", "now"), SleepFrame(sleep=1.0),
            *response("It is noon.")], lambda: tts.finished))
        plain = CSMTTSService(url=url(server), sample_rate=24000, options=options)
        unheard, _ = await run_test(plain, frames_to_send=then_until(response("It is noon."), lambda: plain.finished))
        stored = await session_turns(server, tts.session_id)
    assert turns.saved and turns.saved[0]["text"] == "What time is it?" and turns.saved[0]["speaker"] == 1
    assert abs(turns.saved[0]["duration_s"] - 1.2) < 0.1  # all of it: 0.9 s after "started" and 0.3 s before
    assert [(t["speaker"], t["text"]) for t in stored] == [(1, "What time is it?"), (0, "It is noon.")]
    with_turn = b"".join(f.audio for f in heard if isinstance(f, TTSAudioRawFrame))
    without = b"".join(f.audio for f in unheard if isinstance(f, TTSAudioRawFrame))
    assert with_turn and without and with_turn != without


async def test_a_dropped_connection_is_resumed_on_the_same_session(tiny_model_dir):
    """The service's connection drops between replies (the server side closes it): the next reply reconnects with
    the session, and a new service given that session speaks into it too."""
    from tts_server.integrations.wire import CSMClient

    async with running_server(csm_slot(tiny_model_dir)) as server:
        client = CSMClient(url(server))
        await client.connect()
        session = client.session
        for connection in list(server.app.state.websockets):
            await connection.close(1012, "restarting")
        while client.ws is not None:
            await asyncio.sleep(0.05)
        reply = await client.speak("after-drop", "Back again.", max_audio_length_ms=400)
        await client.end("after-drop")
        ends = [item["status"] async for item in reply if isinstance(item, dict)]
        await client.close()
        again = CSMTTSService(url=url(server), session=session, sample_rate=24000,
                              options={"max_audio_length_ms": 400})
        await run_test(again, frames_to_send=then_until(response("Second reply here."), lambda: again.finished))
        stored = await session_turns(server, session)
    assert client.session == again.session_id == session and ends[-1] == "success"
    assert [t["text"] for t in stored] == ["Back again.", "Second reply here."]
