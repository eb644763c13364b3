"""Word timestamps, progress and speed over the WebSocket: Piper's exact times, CSM's aligned ones (Whisper base
as --stt-model), and CSM's time-stretched speed."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import websockets

from conftest import csm_slot, piper_slot, read_until, running_server, url

TEXT = "The quick brown fox jumps over the lazy dog. I have 42 apples, and a well-known dog named Rex!"


async def ask(ws, **request) -> tuple[dict, bytes, list[tuple[dict, int]]]:
    """Send one request; (terminal reply, audio, [(each other reply, audio bytes received before it)])."""
    await ws.send(json.dumps(request))
    return await read_until(ws, lambda r: r["status"] in ("success", "error", "cancelled"))


def check_words(words: list[dict], text: str, duration: float) -> None:
    """Every word of the text exactly once, in order; times non-decreasing and inside the audio."""
    assert [w["word"] for w in words] == text.split()
    times = [t for w in words for t in (w["start_s"], w["end_s"])]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= duration + 1e-6


def streamed_words(others: list[tuple[dict, int]], rate: int = 24000) -> list[dict]:
    words = []
    for reply, received in others:
        if reply["status"] == "words":
            # each word is sent only once the audio holding it has been sent
            assert all(w["end_s"] <= received / 2 / rate + 1e-6 for w in reply["words"]), (reply, received)
            words += reply["words"]
    return words


async def test_piper_gives_exact_word_times_streamed_and_whole_that_an_independent_aligner_agrees_with(
        whisper_dir):
    async with running_server(piper_slot()) as server:
        async with websockets.connect(url(server)) as ws:
            streamed, audio, others = await ask(ws, text=TEXT, stream=True, format="pcm", timestamps=True,
                                                progress=True)
            whole, wav, _ = await ask(ws, text=TEXT, timestamps=True)
    words = streamed_words(others)
    check_words(words, TEXT, streamed["duration_s"])
    check_words(whole["words"], TEXT, whole["duration_s"])
    assert "words_unavailable" not in streamed and "words" not in streamed  # streamed words came as messages
    progress = [r for r, _ in others if r["status"] == "progress"]
    assert [(p["sentence"], p["sentences"]) for p in progress] == [(1, 2), (2, 2)]
    assert 0 < progress[0]["audio_s"] < progress[1]["audio_s"] == pytest.approx(streamed["duration_s"], abs=0.05)

    # Whisper's own word timestamps on the same audio, an independent measurement
    from faster_whisper import WhisperModel

    from tts_server.audio.codec import resample

    pcm = np.frombuffer(audio, "<i2").astype(np.float32) / 32768
    segments, _ = WhisperModel(str(whisper_dir), device="cpu", compute_type="int8").transcribe(
        resample(pcm, 24000, 16000), word_timestamps=True, beam_size=1)
    heard = [w for s in segments for w in s.words]
    ours = {w["word"].strip(".,!?").lower(): w["start_s"] for w in words}
    errors = [abs(ours[w.word.strip(" .,!?").lower()] - w.start) for w in heard
              if w.word.strip(" .,!?").lower() in ours]
    assert len(errors) >= len(words) - 4 and statistics.median(errors) <= 0.15, errors


async def test_csm_words_come_from_the_aligner_and_without_one_success_says_why(tiny_model_dir, whisper_dir):
    from tts_server.engines.stt import Transcriber

    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            without, _, _ = await ask(ws, text="Hello there. How are you?", seed=1, stream=True, timestamps=True)
    async with running_server(csm_slot(tiny_model_dir), stt=Transcriber(str(whisper_dir), "cpu", local_only=True)) \
            as server:
        await server.service.speech.loaded.wait()
        async with websockets.connect(url(server)) as ws:
            streamed, _, others = await ask(ws, text=TEXT, seed=1, stream=True, format="pcm", timestamps=True)
            fast, _, fast_others = await ask(ws, text=TEXT, seed=1, stream=True, format="pcm", timestamps=True,
                                             speed=2.0)
    assert without["status"] == "success" and "--stt-model" in without["words_unavailable"]
    check_words(streamed_words(fast_others), TEXT, fast["duration_s"])  # times of the stretched audio
    assert streamed_words(fast_others)[-1]["end_s"] <= streamed["duration_s"] / 2 + 0.05
    check_words(streamed_words(others), TEXT, streamed["duration_s"])


async def test_csm_speaks_at_any_speed_by_stretching_its_audio(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            durations = {}
            for speed in (1.0, 2.0, 0.5):
                reply, audio, _ = await ask(ws, text="Hello there, general Kenobi.", seed=4, stream=True,
                                            format="pcm", speed=speed, context=False)
                durations[speed] = reply["duration_s"]
                assert len(audio) == round(reply["duration_s"] * 24000) * 2
            bad, _, _ = await ask(ws, text="Too fast.", speed=4.5)
    assert durations[2.0] == pytest.approx(durations[1.0] / 2, rel=0.02)
    assert durations[0.5] == pytest.approx(durations[1.0] * 2, rel=0.02)
    assert bad["code"] == "invalid_request" and "'speed'" in bad["message"]
