"""Emotion references, conversation memory and voice prompts reaching a real tiny CSM."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
import websockets

from audio_fixtures import audio_bytes, speechlike, write_audio
from conftest import ahttp_get, collect, csm_slot, recv_json, running_server, url
from tts_server.core.context import History, ReferenceLibrary
from tts_server.engines.base import ContextTurn, EngineError, SynthesisTask
from tts_server.engines.csm import CsmEngine
from tts_server.engines.request import SynthesisRequest

SHORT = {"max_audio_length_ms": 480}


@pytest.fixture()
def references(tmp_path):
    root = tmp_path / "refs"
    write_audio(root / "happy" / "a.wav", speechlike(1.0, seed=1))
    write_audio(root / "happy" / "b.wav", speechlike(1.5, seed=2))
    write_audio(root / "sad" / "a.wav", speechlike(1.2, seed=3), 24000)
    (root / "emotion_map.json").write_text(json.dumps({
        "happy": [{"path": "happy/a.wav", "text": "What a day!"}, {"path": "happy/b.wav", "text": "Great news."}],
        "sad": [{"path": "sad/a.wav", "text": "Oh no.", "speaker": 1}],
    }))
    return root


async def speak(ws, **payload) -> bytes:
    await ws.send(json.dumps({**SHORT, **payload}))
    reply, audio, _ = await collect(ws)
    assert reply["status"] == "success", reply
    return audio


async def test_emotion_reaches_the_model_deterministically(tiny_model_dir, references):
    library = ReferenceLibrary(references, pin_voices=False)
    async with running_server(csm_slot(tiny_model_dir), library=library) as server:
        async with websockets.connect(url(server)) as ws:
            plain = await speak(ws, text="Tell me", seed=3, context=False)
            happy = await speak(ws, text="Tell me", seed=3, context=False, emotion="happy")
            again = await speak(ws, text="Tell me", seed=3, context=False, emotion="happy")
            sad = await speak(ws, text="Tell me", seed=3, context=False, emotion="sad")
            await ws.send(json.dumps({"text": "x", "emotion": "furious"}))
            unknown = await recv_json(ws)
            after = await speak(ws, text="Still fine", seed=3, context=False)  # the connection lives on
    assert plain != happy and happy == again and sad not in (plain, happy)
    assert unknown["code"] == "unknown_emotion" and "happy, sad" in unknown["message"]
    assert after


def test_reference_codes_are_encoded_once_and_cached(tiny_model_dir, references):
    engine = CsmEngine(lambda: tiny_model_dir, device="cpu")
    engine.load()
    library = ReferenceLibrary(references, pin_voices=False)
    library.load()
    calls = []
    encode = engine.decoder.encode_audio
    engine.decoder.encode_audio = lambda audio: calls.append(1) or encode(audio)
    for seed in (0, 2, 4):  # seeds 0, 2 and 4 all pick clip 0 of "happy"
        task = SynthesisTask(SynthesisRequest(text="Cached", request_id="c", seed=seed, emotion="happy",
                                              max_audio_length_ms=160))
        History(library).prompt_for(task)
        assert list(engine.synthesize(task))
    assert len(calls) == 1


def test_prompt_layout_voice_history_emotion_then_text(tiny_model_dir, references):
    engine = CsmEngine(lambda: tiny_model_dir, device="cpu")
    engine.load()
    library = ReferenceLibrary(references, pin_voices=False)
    library.load()
    conversation = History(library)
    conversation.set_voice(0, "My voice.", speechlike(1.0))
    conversation.history.append(ContextTurn(1, "Earlier.", cache={"csm": torch.zeros(3, 32, dtype=torch.long)}))
    task = SynthesisTask(SynthesisRequest(text="Now this.", request_id="r", seed=1, emotion="sad"))
    conversation.prompt_for(task)
    turns = task.context + [task.reference]
    ids = engine.prompt_ids(turns, "Now this.", 0)
    frames = [engine.codes_for(t).shape[0] for t in turns]
    assert frames == [13, 3, 15]  # 1.0 s and 1.2 s clips: ceil(24000 / 1920) and 28800 / 1920
    expected = "".join(f"<|begin_of_text|>[{s}]{t}<|end_of_text|>" + "<|AUDIO|>" * n + "<|audio_eos|>"
                       for s, t, n in [(0, "My voice.", 13), (1, "Earlier.", 3), (1, "Oh no.", 15)])
    expected += "<|begin_of_text|>[0]Now this.<|end_of_text|>"
    tok = engine.processor.tokenizer
    assert tok.decode(ids) == expected
    assert ids.tolist() == tok(expected, add_special_tokens=False)["input_ids"]


def test_context_trimming_drops_oldest_history_and_keeps_pinned_turns(tiny_model_dir):
    engine = CsmEngine(lambda: tiny_model_dir, device="cpu")
    engine.load()
    codes = lambda n: {"csm": torch.zeros(n, 32, dtype=torch.long)}  # noqa: E731
    voice = ContextTurn(0, "Voice.", cache=codes(20), pinned=True)
    history = [ContextTurn(0, f"Turn {i}.", cache=codes(20)) for i in range(6)]
    emotion = ContextTurn(0, "Mood.", cache=codes(20), pinned=True)
    full = engine.prompt_ids([voice, *history, emotion], "Say it.", 0).shape[0]
    per_turn = full - engine.prompt_ids([voice, *history[1:], emotion], "Say it.", 0).shape[0]
    engine.max_positions = full + 10 - 2 * per_turn - 1  # dropping two turns is one position short
    ids, kept = engine.fit_context([voice, *history, emotion], "Say it.", 0, frames=10)
    assert kept[0] is voice and kept[-1] is emotion
    assert kept[1:-1] == history[3:]  # the newest turns survive, whole
    assert ids.shape[0] + 10 <= engine.max_positions
    engine.max_positions = engine.prompt_ids([voice, emotion], "Say it.", 0).shape[0] + 5
    with pytest.raises(EngineError) as info:
        engine.fit_context([voice, *history, emotion], "Say it.", 0, frames=10)
    assert info.value.code == "text_too_long"


async def test_conversation_memory_changes_the_next_turn_until_reset(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as fresh:
            alone = await speak(fresh, text="Second line", seed=2)
        async with websockets.connect(url(server)) as ws:
            await speak(ws, text="First line", seed=1)
            remembered = await speak(ws, text="Second line", seed=2)
            reproducible = await speak(ws, text="Second line", seed=2, context=False)
            await ws.send(json.dumps({"type": "reset"}))
            assert await recv_json(ws) == {"status": "reset"}
            after_reset = await speak(ws, text="Second line", seed=2)
    assert remembered != alone
    assert reproducible == alone and after_reset == alone


async def test_history_is_bounded_per_connection(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir), max_context_turns=2) as server:
        async with websockets.connect(url(server)) as ws:
            for i in range(4):
                await speak(ws, text=f"Line {i}", seed=i, max_audio_length_ms=160)
            connection = next(iter(server.connections))
            assert [t.text for t in connection.conversation.history] == ["Line 2", "Line 3"]


async def test_voice_prompt_upload_use_and_clear(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            before = await speak(ws, text="In my voice", seed=5, speaker=3)
            await ws.send(json.dumps({"type": "reset"}))
            await recv_json(ws)
            await ws.send(json.dumps({"type": "voice", "speaker": 3, "text": "This is how I sound."}))
            await ws.send(audio_bytes(speechlike(2.0, 16000), 16000))
            saved = await recv_json(ws)
            with_voice = await speak(ws, text="In my voice", seed=5, speaker=3)
            await ws.send(json.dumps({"type": "reset"}))
            await recv_json(ws)
            other_speaker = await speak(ws, text="In my voice", seed=5, speaker=4)
            await ws.send(json.dumps({"type": "voice", "speaker": 3, "clear": True}))
            cleared = await recv_json(ws)
            await ws.send(json.dumps({"type": "reset"}))
            await recv_json(ws)
            after_clear = await speak(ws, text="In my voice", seed=5, speaker=3)
    assert saved == {"status": "voice_saved", "speaker": 3, "duration_s": 2.0}
    assert with_voice != before and after_clear == before and other_speaker not in (before, with_voice)
    assert cleared == {"status": "voice_cleared", "speaker": 3, "cleared": True}


async def test_voice_prompt_errors_keep_the_connection_usable(tiny_model_dir):
    async with running_server(csm_slot(tiny_model_dir)) as server:
        async with websockets.connect(url(server)) as ws:
            await ws.send(json.dumps({"type": "voice", "speaker": 1, "text": "Noise."}))
            await ws.send(audio_bytes(np.random.default_rng(0).normal(0, 0.2, 48000).astype(np.float32)))
            noisy = await recv_json(ws)
            await ws.send(json.dumps({"type": "voice", "speaker": 1}))
            no_text = await recv_json(ws)
            await ws.send(json.dumps({"type": "voice", "speaker": 1, "text": "Forgot the audio."}))
            await ws.send(json.dumps({"text": "Hello", **SHORT}))
            abandoned = await recv_json(ws)
            reply, audio, _ = await collect(ws)
    assert noisy["code"] == "invalid_voice" and "signal-to-noise" in noisy["message"]
    assert no_text["code"] == "invalid_request" and "transcript" in no_text["message"]
    assert abandoned["code"] == "invalid_request" and "abandoned" in abandoned["message"]
    assert reply["status"] == "success" and audio


async def test_first_long_generation_pins_the_speakers_default_voice(tiny_model_dir, tmp_path):
    root = tmp_path / "refs"
    root.mkdir()
    library = ReferenceLibrary(root, pin_voices=True)
    async with running_server(csm_slot(tiny_model_dir), library=library) as server:
        async with websockets.connect(url(server)) as ws:
            baseline = await speak(ws, text="Who am I today", seed=8, speaker=6, context=False)
            await speak(ws, text="Short", seed=1, speaker=6, max_audio_length_ms=800)  # < 2 s: no pin
            assert 6 not in library.voices
            await speak(ws, text="A long enough sentence to pin.", seed=1, speaker=6, max_audio_length_ms=2400)
            for _ in range(100):
                if 6 in library.voices:
                    break
                await asyncio.sleep(0.05)
        async with websockets.connect(url(server)) as other:
            pinned = await speak(other, text="Who am I today", seed=8, speaker=6)
            unpinned = await speak(other, text="Who am I today", seed=8, speaker=6, context=False)
    voices = json.loads((root / "voices.json").read_text())
    assert voices["6"]["text"] == "A long enough sentence to pin." and (root / voices["6"]["path"]).is_file()
    assert pinned != baseline and unpinned == baseline
    fresh = ReferenceLibrary(root)
    fresh.load()
    assert fresh.voices[6].duration_s == pytest.approx(2.4)


async def test_info_lists_emotions_with_clip_counts(tiny_model_dir, references):
    async with running_server(csm_slot(tiny_model_dir), library=ReferenceLibrary(references)) as server:
        info = json.loads((await ahttp_get(server.port, "/v1/info"))[1])
    assert info["emotions"] == {"happy": 2, "sad": 1} and info["voices"] == []


def test_a_barge_in_cut_keeps_the_words_heard_to_their_end_when_the_turn_has_word_times():
    import torch

    from tts_server.core.context import heard
    from tts_server.engines.base import ContextTurn, Word

    codes = torch.zeros(25, 32, dtype=torch.long)  # 2 s
    timed = ContextTurn(0, "one two three four", None, {"csm": codes}, duration=2.0,
                        words=[Word("one", 0.0, 0.2), Word("two", 0.3, 1.1), Word("three", 1.2, 1.4),
                               Word("four", 1.5, 1.9)])
    plain = ContextTurn(0, "one two three four", None, {"csm": codes}, duration=2.0)
    # 1.0 s heard: by the times only "one" was heard whole; in proportion, two of the four words
    assert [t.text for t in heard([timed], 1.0)] == ["one"]
    assert [t.text for t in heard([plain], 1.0)] == ["one two"]
    assert [t.text for t in heard([timed], 1.45)] == ["one two three"]
    assert heard([timed], 1.0)[0].duration_s == pytest.approx(0.96)


def test_a_sentence_cut_off_while_spoken_keeps_only_its_frames_and_the_share_of_its_text_they_say():
    """A cancel stopped the engine 0.8 s into a sentence that takes 3.2 s to say: however long the listener says it
    played, the 10 frames are all there is, and they said a quarter of its characters (whole words only)."""
    import torch

    from tts_server.core.context import heard
    from tts_server.engines.base import ContextTurn

    text = "one two three four five six seven eight nine ten eleven twelve"
    whole = ContextTurn(0, "Before it.", None, {"csm": torch.zeros(5, 32, dtype=torch.long)}, duration=0.4)
    begun = ContextTurn(0, text, None, {"csm": torch.zeros(10, 32, dtype=torch.long)}, duration=0.8, text_s=3.2)
    kept = heard([whole, begun], 60.0)
    assert [t.text for t in kept] == ["Before it.", "one two three"]  # 15.5 of its 62 characters
    assert [t.duration_s for t in kept] == pytest.approx([0.4, 0.8]) and len(kept[1].cache["csm"]) == 10
    assert [t.text for t in heard([whole, begun], 0.45)] == ["Before it."]  # 50 ms of it: no whole frame
    assert [t.text for t in heard([whole, begun], 0.5)] == ["Before it.", "one"]  # one frame: at least a word
