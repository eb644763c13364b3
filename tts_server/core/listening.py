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
ends it anyway.  While the silence lasts the detector is asked again
(``ASK_AGAIN_MS``): its verdict on the same words moves with the silence heard
after them, and an early "complete" must be surer than a late one (the bar is the
detector's, ``engines.turn_detector``).  An end it hears is a ``PROPOSED_END``:
the utterance stays open until its caller has read the words too and ends it
(``finish``), so that speech resuming meanwhile (in audio that came while the
transcript was being made) is a resume, not another turn.  The audio after a
proposed end is held back from the turn's encoder meanwhile: the turn gets it if
the speech resumes, and ends without it otherwise (as the end it was proposed to
be, and without encoding silence while the transcript is being made).  Silence
between utterances is never kept.
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
# The silences (after the proposed end's) at which the turn detector is asked again while the speaker stays
# silent.  600 ms is the fixed silence that ends a turn under the VAD alone (its default): a verdict too weak to end
# the turn at 200 ms is asked again there, before any turn would have ended without a turn detector.  1.5 s, half
# the default ceiling: one more ask before it, for an utterance the model heard as unfinished at first.
ASK_AGAIN_MS = (600, 1500)


class Heard(str, Enum):
    """What a piece of hands-free audio completes: the detector's words (``Voice``), and ``dropped``."""

    SPEECH_START = Voice.SPEECH_START.value
    PAUSE = Voice.PAUSE.value
    RESUME = Voice.RESUME.value
    SPEECH_END = Voice.SPEECH_END.value
    # the turn detector heard the end at a pause: it stays open until ``finish`` ends it (or the speech resumes)
    PROPOSED_END = Voice.PROPOSED_END.value
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
        self._complete = complete
        self._heard = np.zeros(0, np.float32)  # the turn detector's input: the last HEARD_S at 16 kHz
        self._paused = False  # a PAUSE was told for the silence in progress
        self._held: list[bytes] | None = None  # the audio since a proposed end that stands (not fed to the turn)
        if complete is not None:
            detector.confirm = self._confirm
            detector.asks = tuple(ms * RATE // 1000 for ms in ASK_AGAIN_MS)

    def _confirm(self, start: int, end: int, silent: int) -> bool:
        """The turn detector's verdict on the utterance from ``start`` (less the pre-roll) to ``end`` (16 kHz
        sample positions of the detector's stream), the last ``silent`` samples of it silence."""
        first = self._vad_samples - len(self._heard)  # the position of self._heard[0]
        begin = max(start - PREROLL_MS * RATE // 1000, first)
        return self._complete(self._heard[begin - first:end - first], silent * 1000 / RATE)

    def feed(self, pcm: bytes) -> list[tuple[Heard, StreamedTurn | None]]:
        """Events this audio completes, in order: ``(SPEECH_START, None)``, ``(PAUSE, turn)`` and
        ``(RESUME, turn)`` (a silence that may end it, or not), ``(PROPOSED_END, turn)`` (the turn detector heard
        its end: ``finish`` ends it), ``(SPEECH_END, turn)`` (a turn to end and keep), ``(DROPPED, None)`` (an
        utterance over the length limit)."""
        data = self._whole(pcm)
        samples = np.frombuffer(data, "<i2")
        self._recent = np.concatenate([self._recent, samples])[-self.sample_rate:]
        scaled = self._to_vad(to_float(samples))
        self._vad_samples += len(scaled)
        if self._complete is not None:
            self._heard = np.concatenate([self._heard, scaled])[-HEARD_S * RATE:]
        events: list[tuple[Heard, StreamedTurn | None]] = []
        fed, resumed, held = False, False, self._held
        for event in self._detector.feed(scaled):
            if event.kind == Voice.SPEECH_START:
                # from PREROLL_MS before the start to now: it holds this piece, so it is not fed again
                back = (self._vad_samples - event.sample) / RATE + PREROLL_MS / 1000
                self.turn, self._paused, self._held = self._open_turn(), False, None
                self._feed_turn(self._recent[-int(back * self.sample_rate):].tobytes(), events)
                fed = True
                events.append((Heard.SPEECH_START, None))
            elif self.turn is None:
                continue
            elif event.kind == Voice.SPEECH_END:
                turn, self.turn, self._paused, self._held = self.turn, None, False, None  # (silence: not kept)
                events.append((Heard.SPEECH_END, turn))
            elif event.kind == Voice.PROPOSED_END:  # its transcript starts at this pause, as at any (if not begun)
                events += [(Heard.PAUSE, self.turn)] * (not self._paused) + [(Heard.PROPOSED_END, self.turn)]
                self._paused, self._held = True, []
            else:  # a pause (the utterance may be over: its audio so far can be transcribed) or a resume
                self._paused = event.kind == Voice.PAUSE
                if event.kind == Voice.RESUME:
                    resumed, self._held = True, None
                events.append((Heard(event.kind.value), self.turn))
        if self.turn is not None and not fed:
            if resumed:  # speech in this piece: the turn gets it, after the audio held back before it
                self._feed_turn(b"".join(held or ()) + data, events)
            elif self._held is not None:
                self._held.append(data)
            else:
                self._feed_turn(data, events)
        return events

    def finish(self, turn: StreamedTurn) -> bool:
        """``PROPOSED_END``'s utterance ends there (blocking: call it on the feeding thread): the turn is the
        caller's to end and keep.  False if the speech resumed since, or the utterance ended otherwise."""
        if self.turn is not turn or not self._detector.finish():
            return False
        self.turn, self._paused, self._held = None, False, None
        return True

    def _feed_turn(self, data: bytes, events: list) -> None:
        try:
            self.turn.feed(data)
        except r.Refusal:  # longer than a turn may be: dropped, listening goes on
            self.turn = None
            events.append((Heard.DROPPED, None))
