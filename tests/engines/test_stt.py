"""Speech recognition's fast path: with the language known, a clip is heard through a window its own length."""

from __future__ import annotations

import re

import numpy as np

from audio_fixtures import steady as spoken  # Piper without its random noise: the same audio every run

RATE = 16000
SAID = ["Could you tell me a short story about the sea?", "I would like to book a table for two tonight.",
        "Please remind me to call my mother at six.", "Turn off the lights in the kitchen and the hall.",
        "Tell me a joke about a cat and a dog.", "Why is the sky blue during the day?", "Yes.", "No thanks.",
        "What time is it?", "Good morning!", "I would like to", "book a table"]


def errors(reference: str, heard: str) -> tuple[int, int]:
    """(word edits, reference words), case and punctuation aside."""
    ref, hyp = (re.sub(r"[^a-z0-9' ]", " ", text.lower()).split() for text in (reference, heard))
    row = list(range(len(hyp) + 1))
    for i in range(1, len(ref) + 1):
        previous, row[0] = row[:], i
        for j in range(1, len(hyp) + 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ref[i - 1] != hyp[j - 1]))
    return row[-1], len(ref)


def test_a_known_language_transcribes_short_clips_as_well_as_the_whole_window_and_never_loops(whisper_dir):
    """Whisper base heard through a short window loops on short clips ("Yes. Yes. Yes. ...") unless the window
    has room after the speech and timestamps end the text: over sentences and phrases, the fast path's word error
    rate is no worse than faster-whisper's 30 s window, and no transcript is longer than what was said plus one
    word."""
    from tts_server.engines.stt import WHISPER_RATE, Transcriber

    stt = Transcriber(str(whisper_dir), "cpu", local_only=True)
    stt.load()
    fast, whole = [0, 0], [0, 0]
    for text in SAID:
        audio = np.concatenate([np.zeros(RATE // 4, np.float32), spoken(text, RATE), np.zeros(RATE // 4, np.float32)])
        heard, language = stt.recognize(audio, WHISPER_RATE, "en")
        reference, _ = stt._model.transcribe(audio, language="en", beam_size=1, condition_on_previous_text=False)
        assert language == "en" and len(heard.split()) <= len(text.split()) + 1, (text, heard)
        for total, got in ((fast, heard), (whole, " ".join(s.text for s in reference))):
            edits, words = errors(text, got)
            total[0], total[1] = total[0] + edits, total[1] + words
    # within two words of 73 ("book a table" heard "Bucket table" through the short window; "six" as "6" by both)
    assert fast[0] / fast[1] <= whole[0] / whole[1] + 0.03, (fast, whole)


def test_an_unknown_language_is_detected(whisper_dir):
    from tts_server.engines.stt import WHISPER_RATE, Transcriber

    stt = Transcriber(str(whisper_dir), "cpu", local_only=True)
    stt.load()
    text, language = stt.recognize(spoken("What is the weather like tomorrow?", RATE), WHISPER_RATE)
    assert language == "en" and "weather" in text.lower()
