"""Hands-free turns: the microphone streams all the time, and voice activity detection cuts it into utterances.

A ``Listener`` takes 16-bit PCM at the client's rate, scores it with the VAD
(at 16 kHz), and keeps the last second of it.  When speech starts it opens a
``StreamedTurn`` with the audio from just before the start (``PREROLL_MS``, so
the first syllable is not clipped) and feeds it everything that follows; when
the speaker has been silent for ``--vad-silence-ms`` it hands the turn back to
be ended, transcribed and stored (a ``pause`` a third of the way into that
silence lets the transcription start early).  With a turn detector
(``--turn-detector smart-turn``) that short silence only proposes the end: the
detector hears whether the utterance is complete, and if not the listener keeps
listening until the speech resumes or a longer silence (``--turn-max-silence-ms``)
ends it anyway.  Silence between utterances is never kept.
Blocking (model compute): run ``feed`` on one thread at a time.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

import numpy as np

from ..audio.codec import Resampler
from ..audio.pcm import WholeSamples, to_float
from ..engines.vad import RATE, SpeechDetector, Voice
from . import replies as r
from .turns import StreamedTurn

PREROLL_MS = 300
HEARD_S = 10  # the turn detector hears the last 8 s of an utterance; a chunk of audio may come on top


class Heard(str, Enum):
    """What a piece of hands-free audio completes: the detector's words (``Voice``), and ``dropped``."""

    SPEECH_START = Voice.SPEECH_START.value
    PAUSE = Voice.PAUSE.value
    RESUME = Voice.RESUME.value
    SPEECH_END = Voice.SPEECH_END.value
    # the turn detector ended it at a pause: over, unless its words read unfinished (then ``reopen``)
    PROPOSED_END = "proposed_end"
    DROPPED = "dropped"  # an utterance over the length limit; listening goes on


class Listener:
    """``complete`` (a turn detector: 16 kHz float audio of the utterance -> whether it is over), when given, is
    asked at each pause the detector proposes as the end (see ``SpeechDetector``'s ``confirm``)."""

    def __init__(self, sample_rate: int, detector: SpeechDetector, open_turn: Callable[[], StreamedTurn],
                 complete: Callable[[np.ndarray], bool] | None = None) -> None:
        self.sample_rate = sample_rate
        self._detector = detector
        self._open_turn = open_turn
        self._to_vad = Resampler(sample_rate, RATE)
        self._recent = np.zeros(0, np.int16)  # the last second, at the client's rate
        self._whole = WholeSamples()
        self._vad_samples = 0  # 16 kHz samples handed to the detector
        self.turn: StreamedTurn | None = None
        self._ended_at = 0  # where the silence of the last PROPOSED_END began (detector samples)
        self._complete = complete
        self._heard = np.zeros(0, np.float32)  # the turn detector's input: the last HEARD_S at 16 kHz
        if complete is not None:
            detector.confirm = self._confirm

    def _confirm(self, start: int, end: int) -> bool:
        """The turn detector's verdict on the utterance from ``start`` (less the pre-roll) to ``end`` (16 kHz
        sample positions of the detector's stream)."""
        first = self._vad_samples - len(self._heard)  # the position of self._heard[0]
        begin = max(start - PREROLL_MS * RATE // 1000, first)
        return self._complete(self._heard[begin - first:end - first])

    def feed(self, pcm: bytes) -> list[tuple[Heard, StreamedTurn | None]]:
        """Events this audio completes, in order: ``(SPEECH_START, None)``, ``(PAUSE, turn)`` and
        ``(RESUME, turn)`` (a silence that may end it, or not), ``(SPEECH_END, turn)`` (a turn to end and
        keep), ``(DROPPED, None)`` (an utterance over the length limit)."""
        data = self._whole(pcm)
        samples = np.frombuffer(data, "<i2")
        self._recent = np.concatenate([self._recent, samples])[-self.sample_rate:]
        scaled = self._to_vad(to_float(samples))
        self._vad_samples += len(scaled)
        if self._complete is not None:
            self._heard = np.concatenate([self._heard, scaled])[-HEARD_S * RATE:]
        events: list[tuple[Heard, StreamedTurn | None]] = []
        fed = False
        for event in self._detector.feed(scaled):
            if event.kind == Voice.SPEECH_START:
                # from PREROLL_MS before the start to now: it holds this piece, so it is not fed again
                back = (self._vad_samples - event.sample) / RATE + PREROLL_MS / 1000
                self.turn = self._open_turn()
                self._feed_turn(self._recent[-int(back * self.sample_rate):].tobytes(), events)
                fed = True
                events.append((Heard.SPEECH_START, None))
            elif self.turn is None:
                continue
            elif event.kind == Voice.SPEECH_END:
                turn, self.turn = self.turn, None
                if event.confirmed:  # its transcript starts at this pause too, as at any pause
                    self._ended_at = event.sample
                    events += [(Heard.PAUSE, turn), (Heard.PROPOSED_END, turn)]
                else:
                    events.append((Heard.SPEECH_END, turn))
            else:  # a pause (the utterance may be over: its audio so far can be transcribed) or a resume
                events.append((Heard(event.kind.value), self.turn))
        if self.turn is not None and not fed:
            self._feed_turn(data, events)
        return events

    def reopen(self, turn: StreamedTurn) -> bool:
        """``PROPOSED_END``'s utterance goes on after all: it is open again, at its pause (blocking: call it on the
        feeding thread, before any later audio is fed).  False if a new utterance began meanwhile."""
        if self.turn is not None:
            return False
        self.turn = turn
        self._detector.reopen(self._ended_at)
        return True

    def _feed_turn(self, data: bytes, events: list) -> None:
        try:
            self.turn.feed(data)
        except r.Refusal:  # longer than a turn may be: dropped, listening goes on
            self.turn = None
            events.append((Heard.DROPPED, None))
