"""The voice chat page in a real headless Chromium whose microphone plays a WAV (Chromium's fake capture device):
Piper says known sentences, the server hears them (Silero VAD, Whisper base), a chat server speaking OpenAI's
streamed wire format writes the answers, and tiny CSM speaks them."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import soundfile as sf

from audio_fixtures import spoken, write_audio
from conftest import ahttp_get, csm_slot, running_server
from fake_chat import FakeChat
from test_browser import CHROMIUM, FLAGS, pytestmark  # noqa: F401 (skipped, as there, without Chromium)
from test_sessions import word_error_rate
from test_voice_chat import ANSWER, SAID, server_options

LATER = "Wait, I have another question."
# the page's conversation state, as it goes: the user's turn is heard, answered (written, then spoken), heard again
BACK_TO_LISTENING = ("(s => s.length >= 4 && s.includes('speaking') && s.at(-1) === 'listening')"
                     "(window.__tts.stats.talk.states)")


@contextlib.asynccontextmanager
async def browser_hearing(wav, permission: bool = True):
    """A Chromium page whose microphone plays ``wav`` once (from when the page opens it)."""
    from playwright.async_api import async_playwright

    mic = [f"--use-file-for-fake-audio-capture={wav}%noloop", "--use-fake-device-for-media-stream"]
    mic += ["--use-fake-ui-for-media-stream"] if permission else []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS + mic, headless=True)
        context = await browser.new_context(permissions=["microphone"] if permission else [])
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            yield page, errors
        finally:
            await browser.close()


def microphone(tmp_path, *parts: tuple[str | None, float]):
    """A 48 kHz WAV: each part is a sentence Piper says (or None) followed by that many seconds of silence."""
    rate, pieces = 48000, [np.zeros(24000, np.float32)]
    for text, pause in parts:
        if text:
            pieces.append(spoken(text, rate))
        pieces.append(np.zeros(int(pause * rate), np.float32))
    return write_audio(tmp_path / "mic.wav", np.concatenate(pieces) * 0.9, rate)


async def ready(page, port: int) -> None:
    await page.goto(f"http://127.0.0.1:{port}/")
    await page.wait_for_function("document.getElementById('engine').textContent === 'engine: csm'")
    await page.wait_for_function("window.__tts.state.info && window.__tts.state.info.conversation")
    await page.wait_for_function("localStorage.getItem('tts.session')")


@pytest.mark.timeout(300)
async def test_talking_to_the_page_gets_a_spoken_answer_in_context_that_a_reload_resumes_showing_its_state(
        tiny_model_dir, whisper_dir, tmp_path):
    wav = microphone(tmp_path, (SAID, 2.5))
    with FakeChat(ANSWER, delay=0.3) as chat:
        async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, chat)) as server, \
                browser_hearing(wav) as (page, errors):
            await ready(page, server.port)
            await page.click("#talk")
            await page.wait_for_function("window.__tts.stats.talk.saved.length === 1", timeout=60_000)
            await page.wait_for_function("window.__tts.stats.completed.length === 1", timeout=60_000)
            await page.wait_for_function(BACK_TO_LISTENING, timeout=60_000)  # once the answer has been heard
            shown_state = await page.inner_text("#talk-state")
            detector = await page.inner_text("#detector")
            _, info = await ahttp_get(server.port, "/v1/info")
            await page.click("#talk")  # stop listening
            await page.wait_for_function("window.__tts.stats.highlighted >= 3", timeout=30_000)  # words light up
            spans = await page.eval_on_selector_all(".turn.assistant .word", "s => s.map(x => x.textContent)")
            stats = await page.evaluate("window.__tts.stats")
            session = await page.evaluate("localStorage.getItem('tts.session')")
            _, listed = await ahttp_get(server.port, f"/v1/sessions/{session}")
            shown = await page.inner_text("#chat")
            stopped_state = await page.inner_text("#talk-state")

            await page.reload()  # the same conversation comes back, transcript shown
            await page.wait_for_function("window.__tts.stats.talk.restored > 0", timeout=30_000)
            restored = await page.inner_text("#chat")
            assert await page.evaluate("localStorage.getItem('tts.session')") == session
    saved = stats["talk"]["saved"][0]
    assert word_error_rate(SAID, saved["text"]) <= 0.2
    assert stats["talk"]["states"] == ["listening", "thinking", "speaking", "listening", "idle"]
    assert (shown_state, stopped_state) == ("listening", "idle")
    assert detector == f"turn detector: {json.loads(info)['conversation']['turn_detector']}"
    done = stats["completed"][0]
    chunks = [s for s in stats["scheduled"] if s["request_id"] == done["request_id"]]
    assert len(chunks) == done["chunks"] >= 2
    # gapless: each chunk starts where the previous one ends, but for a chunk that came late (a loaded machine),
    # which the page reports as an underrun and starts just ahead of its clock
    late = sum(after["start"] != pytest.approx(before["end"], abs=1e-9) for before, after in zip(chunks, chunks[1:]))
    assert late <= stats["underruns"] and late < len(chunks) - 1, (late, stats["underruns"], chunks)
    # the answer's first audio was scheduled before the chat model had finished writing it
    assert stats["talk"]["firstAudioAt"][done["request_id"]] < 1000 * chat.finished[0]
    turns = json.loads(listed)["turns"]
    assert turns[0]["speaker"] == 1 and turns[0]["text"] == saved["text"]
    assert " ".join(t["text"] for t in turns[1:]) == ANSWER and {t["speaker"] for t in turns[1:]} == {0}
    assert saved["text"] in shown and ANSWER in shown.replace("\n", " ")
    assert spans == ANSWER.split()  # the answer's words, each timed (Whisper base aligns tiny CSM's audio)
    assert saved["text"] in restored and "Resumed the conversation" in restored
    assert all(t["text"] in restored for t in turns)
    assert errors == []


@pytest.mark.timeout(300)
async def test_speaking_over_the_answer_cuts_it_to_what_was_heard(tiny_model_dir, whisper_dir, tmp_path):
    wav = microphone(tmp_path, (SAID, 8.0), (LATER, 2.5))
    long_answer = " ".join([ANSWER] * 4)
    with FakeChat(long_answer, delay=0.15) as chat:
        async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, chat)) as server, \
                browser_hearing(wav) as (page, errors):
            await ready(page, server.port)
            await page.click("#talk")
            await page.wait_for_function("window.__tts.stats.talk.saved.length === 2", timeout=90_000)
            stats = await page.evaluate("window.__tts.stats")
            session = await page.evaluate("localStorage.getItem('tts.session')")
            await page.click("#talk")
            _, listed = await ahttp_get(server.port, f"/v1/sessions/{session}")
    barge = stats["talk"]["bargeIns"]
    assert len(barge) == 1 and barge[0]["played_ms"] > 0
    turns = json.loads(listed)["turns"]
    said = [t for t in turns if t["speaker"] == 1]
    assert [word_error_rate(text, t["text"]) <= 0.2 for text, t in zip((SAID, LATER), said)] == [True, True]
    first = turns.index(said[0]), turns.index(said[1])
    heard = turns[first[0] + 1:first[1]]  # the answer, as far as it was heard
    assert heard and sum(t["duration_s"] for t in heard) == pytest.approx(barge[0]["played_ms"] / 1000, abs=0.1)
    assert len(" ".join(t["text"] for t in heard)) < len(long_answer)
    assert errors == []


async def test_the_page_says_why_it_cannot_listen_or_answer_a_turn_held_down_by_touch(tiny_model_dir, whisper_dir,
                                                                                       tmp_path):
    wav = microphone(tmp_path, (None, 1.0))
    async with running_server(csm_slot(tiny_model_dir)) as server, browser_hearing(wav) as (page, _):
        await ready(page, server.port)  # no --stt-model here
        await page.click("#talk")
        no_stt = await page.inner_text("#error")
    async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, None)) as server, \
            browser_hearing(wav, permission=False) as (page, _):
        await ready(page, server.port)
        await page.click("#talk")
        await page.wait_for_function("document.getElementById('error').textContent !== ''")
        denied = await page.inner_text("#error")
    from conftest import free_port

    dead = type("Dead", (), {"url": f"http://127.0.0.1:{free_port()}/v1", "key": None})()
    wav = microphone(tmp_path, (SAID, 2.0))
    heard = int(sf.info(str(wav)).duration - 1.0)  # seconds of microphone audio that hold the whole sentence
    async with running_server(csm_slot(tiny_model_dir), **server_options(whisper_dir, dead)) as server, \
            browser_hearing(wav) as (page, _):
        await ready(page, server.port)
        viewport = await page.get_attribute("meta[name=viewport]", "content")
        await page.dispatch_event("#talk", "pointerdown")  # held down (a finger): press to talk, no space bar
        await page.wait_for_function("window.__tts.talk.mode === 'push' && window.__tts.talk.open")
        held = await page.get_attribute("#talk", "aria-pressed")
        await page.wait_for_function(
            f"window.__tts.stats.talk.sentSamples >= {heard} * window.__tts.talk.mic.ctx.sampleRate", timeout=30_000)
        await page.dispatch_event("#talk", "pointerup")  # let go: the turn ends, the server answers it
        await page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=60_000)
        unreachable = await page.inner_text("#error")
        pushed = await page.evaluate("[window.__tts.talk.mode, window.__tts.stats.talk.states]")
    assert "width=device-width" in viewport
    assert held == "true" and pushed == [None, ["listening", "thinking", "idle"]]
    assert "--stt-model" in no_stt
    assert "Microphone permission was denied" in denied
    assert "The assistant cannot answer" in unreachable and dead.url in unreachable
