"""A turn detector's proposed end, without a server: when it is asked during a silence, and how an utterance it
heard end stays open until its caller ends it (``finish``), unless the speech resumes first."""

from __future__ import annotations

import numpy as np

from audio_fixtures import pcm16, spoken
from tts_server.core import turns
from tts_server.core.listening import ASK_AGAIN_MS, Listener
from tts_server.engines.vad import SpeechDetector

RATE = 16000
PAUSE_MS, CEILING_MS = 200, 3000


class Recorder:
    """Stands in for CSM's stream encoder."""

    def feed(self, samples) -> None:
        pass


class Scripted:
    """A turn detector that answers from a script, one answer per ask (then no), and notes each ask's silence."""

    def __init__(self, *answers: bool) -> None:
        self.answers, self.silences = list(answers), []

    def __call__(self, audio: np.ndarray, silence_ms: float) -> bool:
        self.silences.append(silence_ms)
        return self.answers.pop(0) if self.answers else False


def listener_for(detector: Scripted) -> tuple[Listener, list[turns.StreamedTurn]]:
    opened: list[turns.StreamedTurn] = []

    def open_turn():
        opened.append(turns.StreamedTurn(1, RATE, Recorder()))
        return opened[-1]

    return Listener(RATE, SpeechDetector(CEILING_MS, pause_ms=PAUSE_MS), open_turn, complete=detector), opened


def heard(listener: Listener, *parts: np.ndarray) -> list[str]:
    data, events = pcm16(np.concatenate(parts)), []
    for offset in range(0, len(data), 1280):  # 40 ms frames, as a microphone sends them
        events += [name.value for name, _ in listener.feed(data[offset:offset + 1280])]
    return events


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def test_a_silence_is_asked_about_at_the_pause_and_again_later_until_the_ceiling_ends_it():
    detector = Scripted()
    listener, _ = listener_for(detector)
    events = heard(listener, silence(0.5), spoken("I went to the shop and", RATE), silence(3.5))
    assert events == ["speech_start", "pause", "speech_end"]  # one pause told, however often it was asked
    asked = [PAUSE_MS, *ASK_AGAIN_MS]
    assert len(detector.silences) == len(asked)
    assert all(at <= silence_ms < at + 40 for at, silence_ms in zip(asked, detector.silences)), detector.silences


def test_an_end_heard_later_in_the_silence_is_proposed_once_and_stays_open_until_it_is_finished():
    detector = Scripted(False, True)  # unsure at the pause, complete at the next ask
    listener, opened = listener_for(detector)
    speech = spoken("What time is it?", RATE)
    events = heard(listener, silence(0.5), speech, silence(1.0))
    assert events == ["speech_start", "pause", "proposed_end"]
    assert listener.turn is opened[0]  # still open
    assert listener.finish(opened[0]) and listener.turn is None
    assert heard(listener, silence(3.5)) == [] and len(detector.silences) == 2  # nothing more to end or ask
    # the turn ends where it was proposed to: the silence heard while its words were read is not in it
    assert opened[0].received / RATE < len(speech) / RATE + 0.3 + ASK_AGAIN_MS[0] / 1000 + 0.15


def test_speech_that_resumes_before_a_proposed_end_is_finished_goes_on_in_the_same_utterance():
    detector = Scripted(True)
    listener, opened = listener_for(detector)
    first, rest = spoken("Could you remind me to call my", RATE), spoken("sister after lunch?", RATE)
    events = heard(listener, silence(0.5), first, silence(0.6))
    assert events == ["speech_start", "pause", "proposed_end"]
    events = heard(listener, rest, silence(3.5))
    assert not listener.finish(opened[0])  # too late: the speaker went on
    assert events[0] == "resume" and events[-1] == "speech_end" and "speech_start" not in events
    assert len(opened) == 1  # one turn, with all of the speech and the pause (held back, then given to it)
    assert opened[0].received / RATE > (len(first) + len(rest)) / RATE + 0.6


def test_a_proposed_end_left_standing_is_not_asked_about_again_and_the_ceiling_ends_it():
    detector = Scripted(True)  # its words read unfinished: the caller does not finish it
    listener, _ = listener_for(detector)
    events = heard(listener, silence(0.5), spoken("I would like to book a table for", RATE), silence(3.5))
    assert events == ["speech_start", "pause", "proposed_end", "speech_end"] and len(detector.silences) == 1
