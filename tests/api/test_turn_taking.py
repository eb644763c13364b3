"""Turn-taking: what ends a hands-free turn (Smart Turn or a fixed silence), answers begun before the turn is
confirmed, and what may interrupt an answer.  Real server, real WebSocket client, Piper speech, tiny CSM, Whisper
base, Silero VAD, Smart Turn v3.2 from the pipecat-ai wheel, a chat server speaking OpenAI's wire format."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import websockets

from audio_fixtures import pcm16, spoken, steady
from conftest import ahttp_get, csm_slot, read_until, recv_json, running_server, url
from fake_chat import FakeChat
from test_voice_chat import ANSWER, server_options, until

RATE = 16000


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


async def send(ws, *parts: np.ndarray) -> None:
    data = pcm16(np.concatenate(parts))
    for offset in range(0, len(data), 1280):
        await ws.send(data[offset:offset + 1280])


async def saved_turns(ws) -> list[dict]:
    """After ``turn_end``: every ``turn_saved`` until a marker's reply."""
    await ws.send(json.dumps({"type": "turn_end"}))
    await ws.send(json.dumps({"type": "cancel", "request_id": "marker"}))
    _, _, seen = await read_until(ws, lambda r: r.get("request_id") == "marker", 120)
    return [reply for reply, _ in seen if reply.get("status") == "turn_saved"]


SENTENCES = [("I went to the shop and", "bought some bread."),  # Smart Turn hears it go on
             ("I would like to book a table for", "two people tonight.")]  # it hears an end; the words say no


@pytest.mark.parametrize("first, rest", SENTENCES)
@pytest.mark.parametrize("detector, silence_ms, turns", [("smart-turn", 200, 1), ("vad", 200, 2)])
async def test_a_mid_sentence_pause_ends_the_turn_under_a_fixed_silence_but_not_under_smart_turn(
        tiny_model_dir, whisper_dir, detector, silence_ms, turns, first, rest):
    """Half a sentence, 0.7 s of silence, then the rest: under smart-turn the utterance goes on, whether Smart Turn
    hears that or its transcript so far ends on "for"; a fixed 200 ms silence cuts it in two."""
    async with running_server(csm_slot(tiny_model_dir), turn_detector=detector, vad_silence_ms=silence_ms,
                              stt_language="en", **server_options(whisper_dir, None)) as server:
        _, info = await ahttp_get(server.port, "/v1/info")
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True}))
            await send(ws, silence(0.5), steady(first, RATE), silence(0.7), steady(rest, RATE), silence(1.0))
            saved = await saved_turns(ws)
    described = json.loads(info)["conversation"]
    assert (described["turn_detector"], described["vad_silence_ms"]) == (detector, silence_ms)
    assert len(saved) == turns, saved
    said = " ".join(turn["text"] for turn in saved).lower()
    assert first.split()[-2].lower() in said and rest.split()[-1].strip(".").lower() in said
    if turns == 1:
        assert described["turn_max_silence_ms"] == 3000



async def test_speech_that_resumes_while_a_proposed_end_is_being_transcribed_goes_on_in_the_same_turn(
        tiny_model_dir, whisper_dir, monkeypatch):
    """Smart Turn hears an end after "What time is it?" and those words read finished, but the speaker went on
    while they were being transcribed (the recogniser is held meanwhile): the audio that came in the meantime is
    heard, the speech resumed, and the utterance is one turn, not two."""
    from test_fair_sharing import recording_transcriber
    from tts_server.engines.turn_detector import SmartTurn

    verdicts, complete = [], SmartTurn.complete
    monkeypatch.setattr(SmartTurn, "complete", lambda self, *args: verdicts.append(complete(self, *args)) or
                        verdicts[-1])
    stt = recording_transcriber(whisper_dir)
    async with running_server(csm_slot(tiny_model_dir), turn_detector="smart-turn", vad_silence_ms=200, stt=stt,
                              stt_language="en") as server:
        await server.service.speech.loaded.wait()
        async with websockets.connect(url(server), ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True}))
            stt.gate.clear()  # the piece before the pause waits for the recogniser
            await send(ws, silence(0.5), spoken("What time is it?", RATE), silence(0.8))
            assert await asyncio.to_thread(waited_for, lambda: stt.calls and True in verdicts)
            await send(ws, spoken("In London, I mean.", RATE), silence(3.5))
            stt.gate.set()
            saved = await saved_turns(ws)
    assert len(saved) == 1, saved
    assert "time" in saved[0]["text"].lower() and "london" in saved[0]["text"].lower()


def waited_for(condition, timeout: float = 60) -> bool:
    """Wait (in a thread) until ``condition()`` holds; whether it did."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(condition())


def started_chats(chat: FakeChat, count: int) -> bool:
    """Wait (in a thread) until the chat server has begun ``count`` streams."""
    return waited_for(lambda: len(chat.started) >= count)


async def test_an_answer_begun_at_a_pause_is_dropped_when_the_speaker_goes_on_and_nothing_of_it_is_kept(
        tiny_model_dir, whisper_dir):
    """The VAD proposes the end at 200 ms of silence; the piece is transcribed and the chat model asked at once,
    unseen.  The speaker goes on: that stream is closed (the chat server sees the hang-up), no reply_text of it was
    sent, and the answer that follows is to the whole turn, the only one stored."""
    with FakeChat(ANSWER, delay=0.3, first=0.5) as chat:
        async with running_server(csm_slot(tiny_model_dir), turn_detector="vad", vad_silence_ms=600,
                                  stt_language="en", **server_options(whisper_dir, chat)) as server:
            async with websockets.connect(url(server)) as ws:
                session = (await _bind(ws))["session"]
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True,
                                          "respond": {"speaker": 0, "seed": 1, "max_audio_length_ms": 240}}))
                await send(ws, silence(0.5), spoken("My favourite colour is green.", RATE), silence(0.4))
                begun = await asyncio.to_thread(started_chats, chat, 1)  # no audio comes meanwhile: the VAD waits
                await send(ws, spoken("What is yours?", RATE), silence(1.0))
                hung_up = await asyncio.to_thread(chat.hung_up.wait, 30)
                saved, before, _ = await until(ws, "turn_saved")
                done, answered, _ = await until(ws, "success")
            _, listed = await ahttp_get(server.port, f"/v1/sessions/{session}")
    assert begun and hung_up
    assert [r["status"] for r in before] == ["speech_start", "speech_end"]  # nothing of the dropped answer
    assert "green" in saved["text"].lower() and "yours" in saved["text"].lower()
    preempted, final = chat.requests[0]["messages"][-1]["content"], chat.requests[1]["messages"][-1]["content"]
    assert "green" in preempted.lower() and "yours" not in preempted.lower()
    assert final == saved["text"] and len(chat.requests) == 2
    assert {r["request_id"] for r in answered if r["status"] == "reply_text"} == {done["request_id"]}
    turns = json.loads(listed)["turns"]
    assert [t["text"] for t in turns if t["speaker"] == 1] == [saved["text"]]


async def test_an_answer_begun_at_the_proposed_end_is_the_one_spoken_when_the_turn_is_confirmed(tiny_model_dir,
                                                                                                  whisper_dir):
    """The chat model is asked once, at the pause; when the silence then ends the turn with the same transcript,
    that stream is the answer: every delta of it is spoken and sent, none is lost or asked again."""
    with FakeChat(ANSWER, delay=0.05, first=0.3) as chat:
        async with running_server(csm_slot(tiny_model_dir), turn_detector="vad", vad_silence_ms=600,
                                  stt_language="en", **server_options(whisper_dir, chat)) as server:
            async with websockets.connect(url(server)) as ws:
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True,
                                          "respond": {"speaker": 0, "seed": 1}}))
                await send(ws, silence(0.5), spoken("Could you tell me a story?", RATE), silence(0.3))
                begun = await asyncio.to_thread(started_chats, chat, 1)
                await asyncio.sleep(1.0)  # the chat model writes meanwhile: those deltas are kept, unseen
                await send(ws, silence(0.6))
                saved, _, _ = await until(ws, "turn_saved")
                done, answered, audio = await until(ws, "success")
    assert begun and len(chat.requests) == 1 and chat.requests[0]["messages"][-1]["content"] == saved["text"]
    assert "".join(r["delta"] for r in answered if r["status"] == "reply_text") == ANSWER
    assert done["chunks"] >= 1 and len(audio) > 0


async def test_a_cough_during_the_answer_does_not_interrupt_it_while_speech_does(tiny_model_dir, whisper_dir):
    """A client that barges in at ``speech_start`` (as the page does): 200 ms of sound is no utterance (the VAD
    wants 250 ms of speech), so the answer plays on to its end; a real sentence starts one, and cuts the next
    answer off."""
    with FakeChat(ANSWER, delay=0.2) as chat:
        async with running_server(csm_slot(tiny_model_dir), turn_detector="vad", vad_silence_ms=600,
                                  stt_language="en", **server_options(whisper_dir, chat)) as server:
            async with websockets.connect(url(server)) as ws:
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True,
                                          "respond": {"speaker": 0, "seed": 1}}))
                await send(ws, silence(0.5), spoken("Tell me a story.", RATE), silence(1.0))
                first, _, _ = await until(ws, "start")
                cough = spoken("Hey there, listen.", RATE)[int(0.1 * RATE):int(0.3 * RATE)]
                await send(ws, cough, silence(1.0))
                done, during, _ = await until(ws, "success")
                await send(ws, spoken("Tell me another one.", RATE), silence(1.0))
                second, _, _ = await until(ws, "start")
                await send(ws, spoken("Stop, that is enough.", RATE))
                heard, _, _ = await until(ws, "speech_start")
                await ws.send(json.dumps({"type": "cancel", "request_id": second["request_id"], "played_ms": 100}))
                stopped, _, _ = await read_until(ws, lambda r: r.get("request_id") == second["request_id"] and
                                                 r.get("status") in ("cancelled", "success", "error"), 60)
    assert done["request_id"] == first["request_id"]
    assert "speech_start" not in [r["status"] for r in during]  # the cough started no utterance
    assert heard["status"] == "speech_start" and stopped["status"] == "cancelled"


async def _bind(ws) -> dict:
    await ws.send(json.dumps({"type": "session"}))
    return await recv_json(ws)


async def test_a_resume_while_the_pause_is_still_being_transcribed_keeps_the_piece_and_the_connection(
        tiny_model_dir, whisper_dir):
    """The speaker goes on while the piece before the pause is still waiting for the recogniser (the answer begun
    on it is waiting too): dropping that answer must not drop the piece; the turn is saved whole, and answered."""
    from test_fair_sharing import recording_transcriber

    stt = recording_transcriber(whisper_dir)
    with FakeChat(ANSWER, delay=0.02) as chat:
        async with running_server(csm_slot(tiny_model_dir), turn_detector="vad", vad_silence_ms=600, stt=stt,
                                  stt_language="en", chat=server_options(whisper_dir, chat)["chat"]) as server:
            await server.service.speech.loaded.wait()
            async with websockets.connect(url(server), ping_interval=None) as ws:
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": RATE, "vad": True,
                                          "respond": {"speaker": 0, "seed": 1, "max_audio_length_ms": 240}}))
                stt.gate.clear()  # the piece at the pause waits
                await send(ws, silence(0.5), spoken("My favourite colour is green.", RATE), silence(0.4))
                assert await asyncio.to_thread(waited_for, lambda: stt.calls)  # the piece holds the recogniser
                await send(ws, spoken("What is yours?", RATE), silence(1.0))  # resumed: the begun answer goes
                stt.gate.set()
                saved, _, _ = await until(ws, "turn_saved")
                done, _, _ = await until(ws, "success")
    assert "green" in saved["text"].lower() and "yours" in saved["text"].lower()
    assert done["status"] == "success" and chat.requests[-1]["messages"][-1]["content"] == saved["text"]


async def test_turn_start_takes_a_language_whisper_knows_and_refuses_others_clearly(tiny_model_dir, whisper_dir):
    async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, None)) as server:
        _, info = await ahttp_get(server.port, "/v1/info")
        async with websockets.connect(url(server)) as ws:
            refusals = []
            for language in ("xx", 5, "", "e" * 100_000, "EN", [], {}, True, "en\x00", "haw "):
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "vad": True, "language": language}))
                refusals.append(await recv_json(ws))
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "vad": True, "language": "de"}))
            await ws.send(json.dumps({"type": "cancel", "request_id": "marker"}))
            accepted = await recv_json(ws)
    assert {"en", "de", "fr"} <= set(json.loads(info)["conversation"]["languages"])
    assert all(r["status"] == "error" and r["code"] == "invalid_request" and "language" in r["message"]
               for r in refusals), refusals
    assert accepted["request_id"] == "marker"  # the turn_start with a known language was taken without a reply
