"""Hands-free listening without a server: the VAD cuts a stream into utterances, keeps the audio just before each
start, never keeps the silence between them, and drops an utterance longer than a turn may last."""

from __future__ import annotations

import numpy as np

from audio_fixtures import pcm16, spoken
from tts_server.core import turns
from tts_server.core.listening import PREROLL_MS, Listener
from tts_server.engines.vad import SpeechDetector


class Recorder:
    """Stands in for CSM's stream encoder: keeps what it is fed."""

    def __init__(self) -> None:
        self.samples = 0
        self.codes: list = []

    def feed(self, samples) -> None:
        self.samples += len(samples)

    def finish(self):
        return np.zeros((max(1, self.samples // 1920), 32), np.int16)


def listen(audio: np.ndarray, rate: int, silence_ms: float = 600, piece: int = 1234):
    opened: list[turns.StreamedTurn] = []

    def open_turn():
        opened.append(turns.StreamedTurn(1, rate, Recorder()))
        return opened[-1]

    listener = Listener(rate, SpeechDetector(silence_ms), open_turn)
    data, events = pcm16(audio), []
    for offset in range(0, len(data), piece * 2 + 1):  # odd byte counts: samples split across frames
        events += [name for name, _ in listener.feed(data[offset:offset + piece * 2 + 1])]
    return events, opened


def test_two_utterances_become_two_turns_that_hold_the_speech_and_not_the_silence_around_it():
    rate = 16000
    speech = spoken("The weather is lovely today, isn't it?", rate)
    gap = np.zeros(rate * 2, np.float32)
    events, opened = listen(np.concatenate([gap, speech, gap, speech, gap]), rate)
    assert [e for e in events if e not in ("pause", "resume")] == ["speech_start", "speech_end"] * 2
    # each end was announced by a pause (its transcription may start then); pauses inside speech resumed
    for start in (0, events.index("speech_start", 1)):
        between = events[start + 1:events.index("speech_end", start)]
        assert between[-1:] == ["pause"] and between.count("pause") == between.count("resume") + 1
    for turn in opened:
        seconds = turn.received / rate
        # the speech, the pre-roll before its detected start, and the pause that ended it; never the 2 s gap
        assert len(speech) / rate - 0.3 < seconds < len(speech) / rate + PREROLL_MS / 1000 + 0.6 + 0.3


def test_an_utterance_longer_than_a_turn_is_dropped_and_listening_goes_on(monkeypatch):
    monkeypatch.setattr(turns, "MAX_TURN_SECONDS", 2)
    rate = 16000
    speech = spoken("This one sentence takes rather longer than two seconds to say out loud.", rate)
    short = spoken("Short.", rate)
    gap = np.zeros(rate, np.float32)
    events, opened = listen(np.concatenate([gap, speech, gap, short, gap]), rate)
    assert [e for e in events if e not in ("pause", "resume")] == ["speech_start", "dropped", "speech_start",
                                                                   "speech_end"]
    assert opened[-1].received < 2 * rate


def test_noise_and_silence_alone_never_open_a_turn():
    rate = 16000
    quiet = np.random.default_rng(1).normal(0, 0.003, rate * 5).astype(np.float32)
    events, opened = listen(np.concatenate([np.zeros(rate * 2, np.float32), quiet]), rate)
    assert events == [] and opened == []
