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

from audio_fixtures import audio_bytes, speechlike
from conftest import ServerProcess, ahttp_get, collect, csm_slot, recv_json, running_server, url
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


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).round().astype("<i2").tobytes()


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
        client = client_for(server)

        def speak(**extra) -> bytes:
            return client.audio.speech.create(model="csm", voice="alloy", input="I am fine, thank you.",
                                              response_format="pcm", extra_body={"seed": 7, "max_audio_length_ms": 400,
                                                                                 **extra}).read()
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
