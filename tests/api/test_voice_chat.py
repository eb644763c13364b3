"""Voice chat over the WebSocket: hands-free turns cut by the VAD, transcribed, answered by a chat model (a test
server speaking OpenAI's streamed wire format) and spoken by CSM while the answer is still being written."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
import websockets

from audio_fixtures import audio_bytes, pcm16, speechlike, spoken
from conftest import TERMINAL, ahttp_get, csm_slot, read_until, recv_json, reply_json, running_server, url
from fake_chat import FakeChat
from test_sessions import bind, turn, word_error_rate

SAID = "Could you tell me a short story about the sea?"
ANSWER = "Once upon a time, a boat sailed far away. It found an island of singing birds. The end."


def utterance(rate: int = 16000, before: float = 0.5, after: float = 1.2) -> np.ndarray:
    speech = spoken(SAID, rate)
    return np.concatenate([np.zeros(int(before * rate), np.float32), speech, np.zeros(int(after * rate), np.float32)])


async def send_pcm(ws, audio: np.ndarray, rate: int, piece_s: float = 0.04) -> None:
    data, step = pcm16(audio), int(rate * piece_s) * 2
    for offset in range(0, len(data), step):
        await ws.send(data[offset:offset + step])


async def until(ws, status: str, timeout: float = 120) -> tuple[dict, list[dict], bytes]:
    """Frames up to the first reply with ``status``: (it, the JSON before it, the audio before it)."""
    reply, audio, others = await read_until(ws, lambda r: r.get("status") == status, timeout)
    return reply, [other for other, _ in others], audio


def server_options(whisper_dir, chat: FakeChat | None, chat_timeout: float = 30, **more) -> dict:
    from tts_server.engines.chat import ChatModel
    from tts_server.engines.stt import Transcriber

    return {"stt": Transcriber(str(whisper_dir), "cpu", local_only=True),
            "chat": ChatModel(chat.url, "test-model", chat.key, "Answer briefly.", timeout=chat_timeout)
            if chat else None, **more}


async def test_hands_free_turns_are_transcribed_answered_and_spoken_while_the_answer_is_written(tiny_model_dir,
                                                                                                whisper_dir):
    with FakeChat(ANSWER, delay=0.25) as chat:
        async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, chat)) as server:
            async with websockets.connect(url(server)) as ws:
                session = (await bind(ws))["session"]
                await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 16000, "vad": True,
                                          "respond": {"speaker": 0, "seed": 3}}))
                await send_pcm(ws, utterance(), 16000)
                saved, events, _ = await until(ws, "turn_saved")
                started, before_start, _ = await until(ws, "start")
                done, after_start, audio = await until(ws, "success")
                await ws.send(json.dumps({"type": "turn_end"}))  # listening ends; nothing was being said
                await ws.send(json.dumps({"type": "session"}))  # a marker: turn_end sent nothing back
                marker = await recv_json(ws)
            _, listed = await ahttp_get(server.port, f"/v1/sessions/{session}")
    assert [e["status"] for e in events] == ["speech_start", "speech_end"]
    assert saved["speaker"] == 1 and word_error_rate(SAID, saved["text"]) <= 0.2
    deltas = [r["delta"] for r in before_start + after_start if r["status"] == "reply_text"]
    assert "".join(deltas) == ANSWER
    # the first audio went out while the chat model was still writing: deltas came after it
    assert any(r["status"] == "reply_text" for r in after_start)
    assert started["request_id"] == done["request_id"] and done["chunks"] >= 1 and len(audio) > 0
    assert marker["status"] == "session"
    turns = json.loads(listed)["turns"]
    assert [t["speaker"] for t in turns] == [1] + [0] * (len(turns) - 1) and len(turns) >= 2
    assert turns[0]["text"] == saved["text"]
    assert " ".join(t["text"] for t in turns[1:]) == ANSWER  # the assistant's sentences, as written
    sent = chat.requests[0]
    assert sent["stream"] is True and sent["model"] == "test-model"
    assert sent["messages"] == [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": saved["text"]}]


async def test_respond_answers_the_transcript_and_a_cancel_stops_the_chat_stream(tiny_model_dir, whisper_dir):
    with FakeChat(ANSWER, delay=0.5) as chat:
        async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, chat)) as server:
            async with websockets.connect(url(server)) as ws:
                nothing = await _respond(ws, "r0")
                await turn(ws, audio_bytes(speechlike(1.0)), "Hi there.")
                await turn(ws, audio_bytes(speechlike(1.0)), "Anyone home?")
                await ws.send(json.dumps({"type": "respond", "request_id": "r1", "speaker": 0}))
                first_delta, _, _ = await until(ws, "reply_text")
                await ws.send(json.dumps({"type": "cancel", "request_id": "r1"}))
                cancelled, _, _ = await until(ws, "cancelled")
                hung_up = await asyncio.to_thread(chat.hung_up.wait, 20)
    assert nothing["code"] == "invalid_request" and "Nothing to answer" in nothing["message"]
    assert first_delta == {"status": "reply_text", "request_id": "r1", "delta": "Once"}
    assert cancelled == {"status": "cancelled", "request_id": "r1"}
    assert hung_up  # the server closed the LLM's stream
    assert chat.requests[0]["messages"][1:] == [{"role": "user", "content": "Hi there. Anyone home?"}]


async def _respond(ws, request_id: str, **fields) -> dict:
    await ws.send(json.dumps({"type": "respond", "request_id": request_id, **fields}))
    return await recv_json(ws)


async def test_chat_failures_reach_the_user_as_errors_that_say_what_to_fix(tiny_model_dir, whisper_dir):
    from conftest import free_port

    with FakeChat(ANSWER, key="right-key") as chat:
        dead = f"http://127.0.0.1:{free_port()}/v1"
        wrong_key = FakeChat.__new__(FakeChat)
        wrong_key.url, wrong_key.key = chat.url, "wrong-key"
        cases = {"none": None, "dead": type("Dead", (), {"url": dead, "key": None})(), "key": wrong_key}
        replies = {}
        for name, remote in cases.items():
            async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, remote)) as server:
                async with websockets.connect(url(server)) as ws:
                    await turn(ws, audio_bytes(speechlike(1.0)), "Hello?")
                    replies[name] = await _respond(ws, name)
                    if name == "none":
                        await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "vad": True,
                                                  "respond": {"speaker": 0}}))
                        replies["listen"] = await recv_json(ws)
                    replies[name + "-after"] = await turn(ws, audio_bytes(speechlike(1.0)), "Still there?")
    assert replies["none"]["code"] == replies["listen"]["code"] == "invalid_request"
    assert "--chat-url" in replies["none"]["message"]
    assert replies["dead"]["code"] == "model_unavailable" and dead in replies["dead"]["message"]
    assert replies["key"]["code"] == "model_unavailable" and "TTS_CHAT_API_KEY" in replies["key"]["message"]
    assert all(replies[f"{name}-after"]["status"] == "turn_saved" for name in cases)  # the connection lives on


@pytest.mark.parametrize("rate", [16000, 48000])
async def test_silence_and_noise_between_utterances_are_never_kept(tiny_model_dir, whisper_dir, rate):
    """Two utterances with a pause between them become two turns; the silence is not a turn."""
    async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, None)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "turn_start", "speaker": 2, "sample_rate": rate, "vad": True}))
            quiet = np.random.default_rng(0).normal(0, 0.002, rate * 2).astype(np.float32)
            await send_pcm(ws, np.concatenate([quiet, utterance(rate), utterance(rate)]), rate, piece_s=0.1)
            first, _, _ = await until(ws, "turn_saved")
            second, events, _ = await until(ws, "turn_saved")
    assert [e["status"] for e in events] == ["speech_start", "speech_end"]
    for saved in (first, second):
        assert word_error_rate(SAID, saved["text"]) <= 0.2
        # the turn is the speech plus its padding and the pause that ended it, not the silence before it
        assert len(spoken(SAID)) / 16000 < saved["duration_s"] < len(spoken(SAID)) / 16000 + 1.2


async def test_an_endless_answer_is_cut_at_the_text_limit_and_its_stream_closed(tiny_model_dir, whisper_dir):
    with FakeChat(" ".join(["Words keep coming."] * 3000)) as chat:
        async with running_server(csm_slot(tiny_model_dir), max_text_chars=120,
                                  **server_options(whisper_dir, chat)) as server:
            async with websockets.connect(url(server)) as ws:
                await turn(ws, audio_bytes(speechlike(1.0)), "Talk forever.")
                await ws.send(json.dumps({"type": "respond", "max_audio_length_ms": 400}))
                done, seen, _ = await until(ws, "success")
        hung_up = await asyncio.to_thread(chat.hung_up.wait, 20)
    written = "".join(r["delta"] for r in seen if r["status"] == "reply_text")
    assert len(written) == 120 and done["truncated"] is True
    assert hung_up


async def test_a_chat_model_that_trickles_words_without_finishing_a_sentence_is_stopped(tiny_model_dir,
                                                                                        whisper_dir):
    """A trickle (a word every 0.4 s, never a sentence's end) would hold the engine's worker between sentences:
    the answer stops at the chat timeout with an error naming the model, its stream is closed, the connection
    serves on."""
    trickle = "Well. " + " ".join(["and"] * 40)  # one short sentence, then words that never end one
    with FakeChat(trickle, delay=0.4) as chat:
        async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, chat, chat_timeout=2)) \
                as server:
            async with websockets.connect(url(server)) as ws:
                await turn(ws, audio_bytes(speechlike(1.0)), "Say something.")
                await ws.send(json.dumps({"type": "respond", "request_id": "t", "max_audio_length_ms": 160}))
                ended, seen, _ = await until(ws, "error")
                alive = await turn(ws, audio_bytes(speechlike(1.0)), "Still there?")
        hung_up = await asyncio.to_thread(chat.hung_up.wait, 20)
    assert ended["code"] == "model_unavailable" and "no complete sentence for 2 s" in ended["message"]
    assert chat.url in ended["message"] and ended["request_id"] == "t"
    assert 3 <= sum(r["status"] == "reply_text" for r in seen) < 40 and hung_up
    assert alive["status"] == "turn_saved"


async def test_a_flood_of_tiny_pcm_frames_while_listening_is_taken_and_the_connection_serves_on(tiny_model_dir,
                                                                                               whisper_dir):
    """Thousands of frames of one or two bytes (odd ones split samples) in hands-free mode: no reply for any of
    them, nothing queued without bound, and a message after them is answered."""
    async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, None)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "turn_start", "speaker": 1, "sample_rate": 16000, "vad": True}))
            for i in range(3000):
                await ws.send(b"\x00" * (1 + i % 2))
            await ws.send(json.dumps({"type": "cancel", "request_id": "marker"}))  # answered after every frame
            marker = await recv_json(ws)
            await ws.send(json.dumps({"type": "turn_end"}))
            await ws.send(json.dumps({"type": "session"}))
            after = await recv_json(ws)
    assert marker["code"] == "unknown_request" and marker["request_id"] == "marker"  # nothing else came first
    assert after["status"] == "session"  # turn_end closed listening without a reply: nothing was being said


async def test_a_flood_of_respond_requests_is_limited_and_every_accepted_one_ends(tiny_model_dir, whisper_dir):
    with FakeChat(ANSWER, delay=0.2) as chat:
        async with running_server(csm_slot(tiny_model_dir), rate_limit=30, max_queued_per_connection=3,
                                  **server_options(whisper_dir, chat)) as server:
            async with websockets.connect(url(server)) as ws:
                await turn(ws, audio_bytes(speechlike(1.0)), "Answer me, many times.")
                for i in range(60):
                    await ws.send(json.dumps({"type": "respond", "request_id": f"r{i}", "max_audio_length_ms": 160}))
                codes, ended = {}, {}
                while len(codes) + len(ended) < 60:
                    reply = reply_json(frame) if isinstance(frame := await asyncio.wait_for(ws.recv(), 120), str) \
                        else {}
                    if reply.get("status") == "error" and reply["request_id"] not in ended:
                        codes[reply["request_id"]] = reply["code"]
                    elif reply.get("status") in ("success", "cancelled"):
                        ended[reply["request_id"]] = reply["status"]
                await asyncio.sleep(60 / 30)  # one request's worth of the rate (30 a minute) comes back
                saved = await turn(ws, audio_bytes(speechlike(1.0)), "Still listening?")
    assert set(codes.values()) == {"too_many_queued", "rate_limited"}
    assert 3 <= len(ended) and set(ended.values()) == {"success"}  # each accepted one was answered
    assert saved["status"] == "turn_saved", saved


@pytest.mark.parametrize("detector, first", [("vad", 0.0), ("smart-turn", 0.3)])
def test_hostile_voice_chat_sequences_end_every_accepted_answer_and_the_connection_lives(tiny_model_dir,
                                                                                         whisper_dir, detector, first):
    """Generated sequences of respond (any fields), hands-free or streamed turn_start (any rate, any respond),
    PCM of speech or noise in odd pieces, turn_end and barge-in cancels, session creates (beyond the per-owner cap)
    and deletes, against a chat model that in some runs sends only empty deltas and keep-alives after its answer:
    nothing is an internal error, every error has a stable code, every answer that began ends with one terminal
    reply, the connection serves on, and no chat stream outlives it.  Under each turn detector; with Smart Turn the
    chat model is slow to its first token, so that answers begun at a proposed end meet resumes at every moment."""
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st
    from websockets.sync.client import connect

    from conftest import server_in_thread
    from test_fuzz import json_values
    from tts_server.core.replies import ErrorCode

    stable = {code.value for code in ErrorCode} - {"internal_error", "generation_failed"}

    speech = pcm16(spoken(SAID, 16000))
    respond_fields = st.fixed_dictionaries({}, optional={
        "speaker": st.integers(-1, 3) | json_values, "format": st.sampled_from(["pcm", "wav", "mp3"]) | json_values,
        "temperature": st.floats(allow_nan=True) | json_values, "max_audio_length_ms": st.sampled_from([80, 160, -1]),
        "seed": st.integers(-1, 5)})
    steps = st.lists(st.one_of(
        respond_fields.map(lambda f: {"type": "respond", **f}),
        st.builds(lambda rate, vad, answer: {"type": "turn_start", "speaker": 1, "sample_rate": rate, "vad": vad,
                                             **({"respond": answer} if answer is not None else {})},
                  st.sampled_from([16000, 44100]) | st.integers(-5, 10**6), st.booleans() | json_values,
                  st.none() | respond_fields | json_values),
        st.binary(min_size=1, max_size=5000),
        st.integers(0, len(speech) // 4000).map(lambda i: speech[i * 4000:(i + 1) * 4000 + i % 2]),
        st.just(bytes(32000)),  # a second of silence at 16 kHz: an utterance in progress ends
        st.builds(lambda text: {"type": "turn_end", **({"text": text} if text else {})}, st.none() | st.text(max_size=8)),
        st.builds(lambda ms: {"type": "cancel", "request_id": "answer", "played_ms": ms}, st.floats(0, 2000)),
        st.sampled_from([{"type": "session"}, {"type": "session_delete"}]),  # a flood of sessions, capped at 3
    ), min_size=1, max_size=10)
    markers, codes = iter(range(10**6)), set()

    with FakeChat("Fine. Thanks for asking.", delay=0.01, first=first) as chat, \
            server_in_thread(csm_slot(tiny_model_dir), rate_limit=10**6, max_sessions_per_owner=3,
                             turn_detector=detector, **server_options(whisper_dir, chat, chat_timeout=3)) as server:
        with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as ws:
            ws.send(json.dumps({"type": "turn", "speaker": 1, "text": "Hello there."}))
            ws.send(audio_bytes(speechlike(1.0)))
            assert reply_json(ws.recv(timeout=60))["status"] == "turn_saved"

            @seed(20261201)
            @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(steps, st.booleans())
            def one(sequence, idle):
                chat.idle = 0.05 if idle else None  # after its answer, empty deltas and keep-alives until hung up
                for step in sequence:
                    if isinstance(step, dict) and step["type"] == "respond":
                        step = {**step, "request_id": "answer"}
                    ws.send(step if isinstance(step, bytes) else json.dumps(step))
                ws.send(json.dumps({"type": "turn_end"}))  # whatever was open is closed
                ws.send(json.dumps({"type": "cancel", "request_id": "answer"}))
                marker_id = f"marker-{next(markers)}"
                ws.send(json.dumps({"type": "cancel", "request_id": marker_id}))  # answered unknown_request at once
                open_answers, marker = set(), False
                while not marker or open_answers:
                    frame = ws.recv(timeout=60)
                    if isinstance(frame, bytes):
                        continue
                    reply = reply_json(frame)
                    assert isinstance(reply.get("status"), str), reply
                    assert reply["status"] != "error" or reply["code"] in stable, reply
                    codes.add(reply.get("code"))
                    if reply["status"] in ("reply_text", "start"):
                        open_answers.add(reply["request_id"])
                        if reply["request_id"] != "answer":  # a hands-free turn's own answer: stop it too
                            ws.send(json.dumps({"type": "cancel", "request_id": reply["request_id"]}))
                    elif reply["status"] in TERMINAL and reply.get("request_id"):
                        open_answers.discard(reply["request_id"])
                    marker = marker or reply.get("request_id") == marker_id

            one()
            chat.idle = None
            ws.send(json.dumps({"type": "turn", "speaker": 1, "text": "Are you still there?"}))
            ws.send(audio_bytes(speechlike(1.0)))
            assert reply_json(ws.recv(timeout=60))["status"] == "turn_saved"
            # However the generated runs went, one answer surely meets a chat model that keeps the stream open.
            chat.idle = 0.05
            ws.send(json.dumps({"type": "respond", "request_id": "kept-open", "max_audio_length_ms": 80}))
            while (reply := reply_json(frame) if isinstance(frame := ws.recv(timeout=60), str) else {}).get(
                    "request_id") != "kept-open" or reply["status"] not in ("reply_text", *TERMINAL):
                pass
            assert reply["status"] == "reply_text", reply
            ws.send(json.dumps({"type": "cancel", "request_id": "kept-open"}))
            while (reply := reply_json(frame) if isinstance(frame := ws.recv(timeout=60), str) else {}).get(
                    "request_id") != "kept-open" or reply["status"] not in TERMINAL:
                pass
            chat.idle = None
            ws.send(json.dumps({"type": "respond", "request_id": "last", "max_audio_length_ms": 160}))
            while (reply := reply_json(frame) if isinstance(frame := ws.recv(timeout=60), str) else {}).get(
                    "request_id") != "last" or reply["status"] not in TERMINAL:  # (a straggler's may come first)
                pass
            assert reply["status"] == "success" and reply["request_id"] == "last"
        for _ in range(300):  # the connection closed: every chat stream it opened is closed too (or ended)
            if len(chat.started) == len(chat.finished) + chat.hangups:
                break
            threading.Event().wait(0.1)
    assert len(chat.started) == len(chat.finished) + chat.hangups, (len(chat.started), len(chat.finished),
                                                                    chat.hangups)
    assert chat.hangups > 0  # the answers whose chat model kept its stream open were cancelled and it was closed
    assert "too_many_sessions" in codes, codes  # the session flood reached the cap

