"""Conversation sessions over the WebSocket and HTTP: the other side's turns in CSM's context, kept in a session
that another connection (or a restarted server) resumes, with the same audio as one unbroken connection."""

from __future__ import annotations

import asyncio
import json
import logging
import signal

import numpy as np
import pytest
import websockets

from audio_fixtures import audio_bytes, pcm16, speechlike
from conftest import ServerProcess, ahttp_get, collect, csm_slot, recv_json, reply_json, running_server, url
from tts_server.core.security import Gate

USER_A = audio_bytes(speechlike(2.0, seed=1))
USER_B = audio_bytes(speechlike(1.5, seed=2))
KEYS = ("key-one-0123456789", "key-two-0123456789")


async def turn(ws, audio: bytes, text: str, speaker: int = 1) -> dict:
    await ws.send(json.dumps({"type": "turn", "speaker": speaker, "text": text}))
    await ws.send(audio)
    return await recv_json(ws)


async def reply(ws, seed: int, text: str) -> bytes:
    await ws.send(json.dumps({"text": text, "seed": seed, "speaker": 0, "max_audio_length_ms": 400,
                              "format": "pcm"}))
    final, audio, _ = await collect(ws)
    assert final["status"] == "success", final
    return audio


async def bind(ws, session: str | None = None) -> dict:
    await ws.send(json.dumps({"type": "session", **({"session": session} if session else {})}))
    return await recv_json(ws)


async def test_a_session_resumed_on_a_new_connection_gives_the_audio_of_one_unbroken_connection(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            created = await bind(ws)
            saved = await turn(ws, USER_A, "Hello, how are you?")
            first = await reply(ws, 7, "I am fine, thank you.")
        session = created["session"]
        async with websockets.connect(url(server)) as ws:  # the connection dropped; a new one resumes
            resumed = await bind(ws, session)
            await turn(ws, USER_B, "Tell me more.")
            resumed_audio = await reply(ws, 8, "There is not much more to tell.")
        async with websockets.connect(url(server)) as ws:  # the same turns on one plain connection
            await turn(ws, USER_A, "Hello, how are you?")
            plain_first = await reply(ws, 7, "I am fine, thank you.")
            await turn(ws, USER_B, "Tell me more.")
            plain_audio = await reply(ws, 8, "There is not much more to tell.")
        async with websockets.connect(url(server)) as ws:  # and without the user's turns, another answer
            await reply(ws, 7, "I am fine, thank you.")
            alone = await reply(ws, 8, "There is not much more to tell.")
    assert created["status"] == "session" and created["turns"] == 0 and len(session) >= 22
    assert saved == {"status": "turn_saved", "speaker": 1, "text": "Hello, how are you?", "duration_s": 2.0,
                     "turns": 1}
    assert resumed == {"status": "session", "session": session, "turns": 2}  # the user's turn and the reply
    assert first == plain_first and resumed_audio == plain_audio
    assert alone != plain_audio  # the user's turns did shape the reply


async def test_sessions_belong_to_their_key_and_unknown_ids_are_refused(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO)  # what a server logs by default: no session id, no turn text
    async with running_server(csm_slot(tiny_model_dir), gate=Gate(KEYS)) as server:
        one = {"Authorization": f"Bearer {KEYS[0]}"}
        async with websockets.connect(url(server), additional_headers=one) as ws:
            session = (await bind(ws))["session"]
            await turn(ws, USER_A, "Mine.")
        async with websockets.connect(f"{url(server)}/?session={session}", additional_headers=one) as ws:
            assert await recv_json(ws) == {"status": "session", "session": session, "turns": 1}  # right away
        async with websockets.connect(url(server), additional_headers={"Authorization": f"Bearer {KEYS[1]}"}) as ws:
            other = await bind(ws, session)
            unknown = await bind(ws, "no-such-session")
        status, body = await ahttp_get(server.port, f"/v1/sessions/{session}", one)
        assert status == 200 and json.loads(body) == {
            "session": session, "turns": [{"speaker": 1, "text": "Mine.", "duration_s": 2.0}]}
        foreign, _ = await ahttp_get(server.port, f"/v1/sessions/{session}", {"Authorization": f"Bearer {KEYS[1]}"})
    assert other["code"] == unknown["code"] == "unknown_session"
    assert foreign == 404
    server_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("websockets.client"))
    assert "session=***" in server_log and session not in server_log and "Mine." not in server_log


async def test_deleting_a_session_over_http_or_the_websocket_forgets_it(tiny_model_dir):
    import urllib.request

    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            first = (await bind(ws))["session"]
            await ws.send(json.dumps({"type": "session_delete"}))
            deleted = await recv_json(ws)
            second = (await bind(ws))["session"]
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/sessions/{second}", method="DELETE")
        answer = await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(request, timeout=10).read()))
        async with websockets.connect(url(server)) as ws:
            gone = [await bind(ws, s) for s in (first, second)]
        status, body = await ahttp_get(server.port, f"/v1/sessions/{second}")
    assert deleted == {"status": "session_deleted", "session": first}
    assert answer == {"session": second, "deleted": True}
    assert [g["code"] for g in gone] == ["unknown_session", "unknown_session"]
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_session"


async def test_bad_turns_get_clear_errors_and_the_connection_lives(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "turn", "speaker": 1}))
            no_text = await recv_json(ws)
            await ws.send(json.dumps({"type": "turn", "speaker": 1, "text": "Where is my audio?"}))
            await ws.send(json.dumps({"type": "reset"}))
            abandoned, reset = await recv_json(ws), await recv_json(ws)
            silent = await turn(ws, audio_bytes(np.zeros(48000, np.float32)), "Silence.")
            fine = await turn(ws, USER_A, "Now it works.")
    assert no_text["code"] == "invalid_request" and "'text'" in no_text["message"]
    assert abandoned["code"] == "invalid_request" and "abandoned" in abandoned["message"] and reset["status"] == "reset"
    assert silent["code"] == "invalid_voice"
    assert fine["status"] == "turn_saved" and fine["turns"] == 1


@pytest.mark.timeout(300)
async def test_acknowledged_turns_survive_sigkill_and_the_restarted_server_answers_as_one_that_never_died(
        tiny_model_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    args = ["--mode", "reuse", "--model-path", str(tiny_model_dir), "--engine", "csm", "--session-store", store]

    async def converse(port: int, session: str | None = None) -> str:
        async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
            session = (await bind(ws, session))["session"]
            await turn(ws, USER_A, "Hello, how are you?")
            await reply(ws, 7, "I am fine, thank you.")
        return session

    async def last_reply(port: int, session: str | None) -> tuple[dict, bytes]:
        async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
            bound = await bind(ws, session)
            await turn(ws, USER_B, "Tell me more.")
            return bound, await reply(ws, 8, "There is not much more to tell.")

    (tmp_path / "dying").mkdir()
    (tmp_path / "steady").mkdir()
    dying = ServerProcess(tmp_path / "dying", args)
    try:
        dying.wait_for_log("csm ready")
        session = await converse(dying.port)
        dying.proc.send_signal(signal.SIGKILL)
        dying.proc.wait(30)
    finally:
        dying.stop()
    restarted = ServerProcess(tmp_path / "dying", args)
    steady = ServerProcess(tmp_path / "steady", ["--mode", "reuse", "--model-path", str(tiny_model_dir), "--engine",
                                                 "csm", "--session-store", "memory"])
    try:
        restarted.wait_for_log("csm ready")
        steady.wait_for_log("csm ready")
        bound, after_restart = await last_reply(restarted.port, session)
        steady_session = await converse(steady.port)
        _, never_died = await last_reply(steady.port, steady_session)
    finally:
        restarted.stop()
        steady.stop()
    assert bound == {"status": "session", "session": session, "turns": 2}
    assert after_restart == never_died


async def stream_turn(ws, audio: np.ndarray, rate: int, text: str | None, piece: int = 2401) -> dict:
    await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": rate}))
    data = pcm16(audio)
    for start in range(0, len(data), piece):  # odd sizes: samples split across frames
        await ws.send(data[start:start + piece])
    await ws.send(json.dumps({"type": "turn_end", **({"text": text} if text else {})}))
    return await recv_json(ws)


async def test_a_turn_streamed_while_spoken_is_the_turn_sent_whole(tiny_model_dir):
    """The same 24 kHz speech streamed in odd-sized PCM pieces or sent as one WAV file: the same context, so the
    same seeded reply; a 16 kHz stream is resampled and keeps its length."""
    speech = np.round(speechlike(2.3, seed=3) * 32767) / 32767  # exactly representable in 16 bits
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            streamed = await stream_turn(ws, speech, 24000, "Streamed words.")
            after_stream = await reply(ws, 9, "And my answer.")
        async with websockets.connect(url(server)) as ws:
            whole = await turn(ws, audio_bytes(speech), "Streamed words.")
            after_whole = await reply(ws, 9, "And my answer.")
        async with websockets.connect(url(server)) as ws:
            slower = await stream_turn(ws, speechlike(1.5, rate=16000, seed=4), 16000, "At sixteen kilohertz.")
            no_text = await stream_turn(ws, speechlike(1.0, seed=4), 24000, None)
            await ws.send(json.dumps({"type": "turn_end", "text": "Nothing was started."}))
            unopened = await recv_json(ws)
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 4000}))
            bad_rate = await recv_json(ws)
    assert streamed["status"] == whole["status"] == "turn_saved" and streamed["duration_s"] == whole["duration_s"]
    assert after_stream == after_whole
    assert slower["status"] == "turn_saved" and slower["duration_s"] == pytest.approx(1.5, abs=0.01)
    assert no_text["code"] == "invalid_request" and "'text'" in no_text["message"]
    assert unopened["code"] == "invalid_request" and "turn_start" in unopened["message"]
    assert bad_rate["code"] == "invalid_request" and "'sample_rate'" in bad_rate["message"]


async def test_the_openai_api_reads_and_extends_a_session(tiny_model_dir):
    """``session`` on POST /v1/audio/speech (our extra field, through the official SDK): the session's turns are
    the context (the same audio as the WebSocket with the same turns) and the reply joins the session."""
    from test_openai import client_for

    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            session = (await bind(ws))["session"]
            await turn(ws, USER_A, "Hello, how are you?")

        def speak(**extra) -> bytes:
            with client_for(server) as client:
                return client.audio.speech.create(model="csm", voice="alloy", input="I am fine, thank you.",
                                                  response_format="pcm",
                                                  extra_body={"seed": 7, "max_audio_length_ms": 400, **extra}).read()
        over_http = await asyncio.to_thread(speak, session=session)
        without = await asyncio.to_thread(speak)
        async with websockets.connect(url(server)) as ws:
            await turn(ws, USER_A, "Hello, how are you?")
            await ws.send(json.dumps({"text": "I am fine, thank you.", "seed": 7, "speaker": 0,
                                      "max_audio_length_ms": 400, "format": "pcm"}))
            _, over_ws, _ = await collect(ws)
        _, listed = await ahttp_get(server.port, f"/v1/sessions/{session}")
        from openai import NotFoundError

        with pytest.raises(NotFoundError) as refused:
            await asyncio.to_thread(speak, session="no-such-session")
    assert over_http == over_ws and over_http != without
    assert [t["speaker"] for t in json.loads(listed)["turns"]] == [1, 0]  # the user's turn, then the reply
    assert refused.value.body["code"] == "unknown_session"


async def test_barge_in_keeps_only_what_was_heard_of_a_finished_or_running_reply(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            session = (await bind(ws))["session"]
            await turn(ws, USER_A, "Hello, how are you?")
            await ws.send(json.dumps({"text": "I am fine, thank you very much for asking me.", "seed": 7,
                                      "request_id": "done", "max_audio_length_ms": 1200, "format": "pcm"}))
            finished, _, _ = await collect(ws, "done")
            await ws.send(json.dumps({"type": "cancel", "request_id": "done", "played_ms": 500}))
            cut = await recv_json(ws)
            _, listed = await ahttp_get(server.port, f"/v1/sessions/{session}")
            await ws.send(json.dumps({"text": "One. Two. Three. Four. Five. Six.", "seed": 3, "stream": True,
                                      "request_id": "running"}))
            assert (await recv_json(ws))["status"] == "start"
            await ws.send(json.dumps({"type": "cancel", "request_id": "running", "played_ms": 100}))
            ended, _, _ = await collect(ws, "running")
            running_cut = await recv_json(ws)
            await ws.send(json.dumps({"type": "cancel", "request_id": "never", "played_ms": 100}))
            unknown = await recv_json(ws)
    turns = json.loads(listed)["turns"]
    assert finished["status"] == "success" and finished["duration_s"] > 0.5
    assert cut == {"status": "truncated", "request_id": "done", "kept_s": 0.48}  # 6 whole frames of 80 ms
    assert [t["speaker"] for t in turns] == [1, 0] and turns[1]["duration_s"] == 0.48
    spoken = "I am fine, thank you very much for asking me.".split()
    assert 1 <= len(turns[1]["text"].split()) < len(spoken) and spoken[0] == turns[1]["text"].split()[0]
    assert ended["status"] == "cancelled" and running_cut["status"] == "truncated"
    assert running_cut["request_id"] == "running" and running_cut["kept_s"] <= 0.1
    assert unknown["code"] == "unknown_request"


def test_hostile_streamed_turns_end_in_turn_saved_or_an_error_and_the_connection_lives(tiny_model_dir):
    """Generated sequences of turn_start (any rate), PCM pieces of any size (odd ones too) and turn_end (with or
    without text): every turn_end is answered, nothing is an internal error, and the connection serves on."""
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st
    from websockets.sync.client import connect

    from conftest import server_in_thread

    steps = st.lists(st.one_of(
        st.builds(lambda rate, speaker: {"type": "turn_start", "speaker": speaker, "sample_rate": rate},
                  st.sampled_from([8000, 16000, 24000, 44100, 48000]) | st.integers(-5, 10**6), st.integers(-1, 3)),
        st.binary(min_size=1, max_size=9000),
        st.builds(lambda text: {"type": "turn_end", **({"text": text} if text is not None else {})},
                  st.none() | st.text(max_size=12)),
    ), min_size=1, max_size=8)

    with server_in_thread(csm_slot(tiny_model_dir), rate_limit=10**6) as server:
        with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
            @seed(20261130)
            @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(steps)
            def one(sequence):
                ends = 0
                for step in sequence:
                    ws.send(step if isinstance(step, bytes) else json.dumps(step))
                    ends += isinstance(step, dict) and step["type"] == "turn_end"
                ws.send(json.dumps({"type": "reset"}))
                answers = []
                while (answer := reply_json(ws.recv(timeout=60))) != {"status": "reset"}:
                    answers.append(answer)
                assert all(a.get("code") not in ("internal_error", "generation_failed") for a in answers), answers
                saved = [a for a in answers if a["status"] == "turn_saved"]
                assert len(saved) <= ends and all(a["status"] in ("turn_saved", "error") for a in answers), answers

            one()
            ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 16000}))
            ws.send(pcm16(speechlike(1.0, rate=16000)))
            ws.send(json.dumps({"type": "turn_end", "text": "Still here."}))
            assert reply_json(ws.recv(timeout=60))["status"] == "turn_saved"


def word_error_rate(said: str, heard: str) -> float:
    import re

    a, b = (re.findall(r"[a-z']+", text.lower()) for text in (said, heard))
    distance = list(range(len(b) + 1))
    for i, word in enumerate(a, 1):
        previous, distance[0] = distance[0], i
        for j, other in enumerate(b, 1):
            previous, distance[j] = distance[j], min(distance[j] + 1, distance[j - 1] + 1, previous + (word != other))
    return distance[-1] / max(len(a), 1)


async def test_turns_without_text_are_transcribed_when_the_server_has_speech_recognition(tiny_model_dir,
                                                                                         whisper_dir):
    """Piper speaks a known sentence; sent as a whole turn and as a streamed one without text, the packaged
    Whisper base (``--stt-model``) transcribes it, and the transcript is what the session stores."""
    from conftest import piper_slot
    from tts_server.audio.codec import resample
    from tts_server.engines.base import SynthesisTask, audio_only
    from tts_server.engines.request import SynthesisRequest
    from tts_server.engines.stt import Transcriber

    said = "The quick brown fox jumps over the lazy dog."
    voice = piper_slot().engine
    voice.load()
    speech = np.concatenate(list(audio_only(voice.synthesize(SynthesisTask(SynthesisRequest(text=said, request_id="p"))))))
    speech = resample(speech, voice.sample_rate, 24000)
    async with running_server(csm_slot(tiny_model_dir), stt=Transcriber(str(whisper_dir), "cpu", local_only=True)) \
            as server:
        async with websockets.connect(url(server)) as ws:
            session = (await bind(ws))["session"]
            await ws.send(json.dumps({"type": "turn", "speaker": 1}))
            await ws.send(audio_bytes(speech))
            whole = await recv_json(ws)
            streamed = await stream_turn(ws, resample(speech, 24000, 16000), 16000, None)
            silent = await stream_turn(ws, np.zeros(24000, np.float32), 24000, None)
        _, listed = await ahttp_get(server.port, f"/v1/sessions/{session}")
    assert whole["status"] == streamed["status"] == "turn_saved"
    assert word_error_rate(said, whole["text"]) <= 0.2 and word_error_rate(said, streamed["text"]) <= 0.2
    assert [t["text"] for t in json.loads(listed)["turns"]] == [whole["text"], streamed["text"]]
    assert silent["code"] == "invalid_request" and "No speech" in silent["message"]
