"""Where a speaker starts and stops talking, as the audio arrives: Silero VAD (the ``silero-vad`` wheel's ONNX model).

The model scores each 32 ms window (512 samples at 16 kHz) with a speech
probability.  ``SpeechDetector`` turns those scores into events, with
hysteresis as Silero's own ``VADIterator`` does: ``speech_start`` once speech has
lasted ``min_speech_ms`` (a cough or a click is not a turn), ``speech_end`` once it has
been followed by ``silence_ms`` of silence.  In between, ``pause`` after
``pause_ms`` of silence (the utterance may be over: a transcription can start
before ``end`` is certain) and ``resume`` if speech comes back first.  With a
turn detector to ask (``confirm``), a pause it hears as the end is a
``proposed_end``: the utterance ends there once its caller says so (``finish``),
unless the speech resumes first.

One ONNX session serves every detector of the process (``silero_model``: a
session is ~9 MiB, a stream's state 1 KiB); each detector keeps its own
recurrent state (``SileroState``), so listeners never hear each other.  The
model file is found inside the wheel without importing ``silero_vad``: its
import calls ``torch.set_num_threads(1)`` on the importing thread, which would
slow every codec encode on the turn-encoding thread.  Feed a detector from one
thread at a time (onnxruntime's ``run`` itself may be called from any thread).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

from .base import one_per_process

import numpy as np

RATE = 16000
WINDOW = 512  # samples the model scores at once at 16 kHz
CONTEXT = 64  # samples of the previous window the model sees before each one (as silero-vad's wrapper feeds it)
# Speech shorter than this is not an utterance: a cough, a click, a false start, the tail of the assistant's echo
# does not begin a turn (nor, on the page, barge in on the answer)
MIN_SPEECH_MS = 250


class Voice(str, Enum):
    """What the detector hears change (the listener and the WebSocket's replies use the same words)."""

    SPEECH_START = "speech_start"
    PAUSE = "pause"  # silence that may end the utterance: its transcription can start
    RESUME = "resume"  # speech came back before the silence ended it
    SPEECH_END = "speech_end"
    PROPOSED_END = "proposed_end"  # the turn detector heard the end at this pause: it ends at ``finish``


@dataclass(frozen=True)
class Event:
    kind: Voice
    sample: int  # where it happened, in samples at 16 kHz since the detector began


@dataclass
class SileroState:
    """What the model carries from one window of a stream to the next."""

    recurrent: np.ndarray = field(default_factory=lambda: np.zeros((2, 1, 128), np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros((1, CONTEXT), np.float32))


class SileroModel:
    """Silero VAD's ONNX network (the ``silero-vad`` wheel's file, run by onnxruntime on one CPU thread, as the
    wheel's own wrapper runs it), stateless: each call takes and updates a stream's ``SileroState``."""

    def __init__(self) -> None:
        import onnxruntime

        spec = importlib.util.find_spec("silero_vad")  # located, not imported (see the module docstring)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the silero-vad package is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        self._rate = np.array(RATE, np.int64)

    def probability(self, state: SileroState, window: np.ndarray) -> float:
        """The speech probability of one 512-sample window at 16 kHz, after the windows ``state`` has seen."""
        x = np.concatenate([state.context, window.reshape(1, WINDOW).astype(np.float32, copy=False)], axis=1)
        out, state.recurrent = self.session.run(None, {"input": x, "state": state.recurrent, "sr": self._rate})
        state.context = x[:, -CONTEXT:]
        return float(out[0, 0])


silero_model = one_per_process(SileroModel)  # the process's one copy, loaded on first use


class SpeechDetector:
    """Silero's scores as events (see the module docstring).  ``confirm(start, end, silent)``, when given, is asked
    at each pause (sample positions of the utterance's start and of now, and how long the silence has lasted) and
    again once the silence reaches each of ``asks`` (samples) while it lasts: True proposes the end there
    (``proposed_end`` instead of ``pause``, or of nothing at a later ask; the utterance ends at ``finish`` unless
    the speech resumes first, and the silence is not asked about again), False lets the silence go on, to the next
    ask or to ``silence_ms`` (a turn detector's ceiling, which ends the utterance in any case)."""

    def __init__(self, silence_ms: float = 600, threshold: float = 0.5, min_speech_ms: float = MIN_SPEECH_MS,
                 pause_ms: float = 200, confirm: Callable[[int, int, int], bool] | None = None) -> None:
        self.model = silero_model()
        self.confirm = confirm
        self.asks: tuple[int, ...] = ()  # later silences (samples) at which ``confirm`` is asked again
        self._asked = 0  # of this silence's asks (the pause's, then ``asks``), how many were made
        self._started_at = 0  # where the utterance in progress began
        self._state = SileroState()
        self.threshold = threshold
        self.silence = int(silence_ms * RATE / 1000)
        self.min_speech = int(min_speech_ms * RATE / 1000)
        self.pause = min(int(pause_ms * RATE / 1000), self.silence)
        self._paused = False
        self._proposed = False  # a proposed_end stands (no speech since)
        self._pending = np.zeros(0, np.float32)
        self.position = 0  # samples scored so far
        self.speaking = False
        self._voiced_since: int | None = None  # candidate start, before min_speech is reached
        self._quiet_since: int | None = None

    def feed(self, samples: np.ndarray) -> list[Event]:
        """Score 16 kHz float samples; the events they complete, in order."""
        data = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        whole = len(data) // WINDOW * WINDOW
        self._pending = data[whole:]
        events = []
        for offset in range(0, whole, WINDOW):
            probability = self.model.probability(self._state, data[offset:offset + WINDOW])
            self.position += WINDOW
            event = self._step(probability)
            if event is not None:
                events.append(event)
        return events

    def _step(self, probability: float) -> Event | None:
        end_of_window = self.position
        if not self.speaking:
            if probability >= self.threshold:
                if self._voiced_since is None:
                    self._voiced_since = end_of_window - WINDOW
                if end_of_window - self._voiced_since >= self.min_speech:
                    self.speaking, self._quiet_since, self._started_at = True, None, self._voiced_since
                    return Event(Voice.SPEECH_START, self._voiced_since)
            elif probability < self.threshold - 0.15:
                self._voiced_since = None
            return None
        if probability >= self.threshold:
            self._quiet_since = None
            if self._paused:
                self._paused, self._proposed, self._asked = False, False, 0
                return Event(Voice.RESUME, end_of_window - WINDOW)
        elif probability < self.threshold - 0.15:
            if self._quiet_since is None:
                self._quiet_since = end_of_window - WINDOW
            silent = end_of_window - self._quiet_since
            if silent >= self.silence:
                self._ended()
                return Event(Voice.SPEECH_END, self._quiet_since)
            if self._due(silent):
                first, self._paused = not self._paused, True
                self._asked += 1
                if self.confirm is None or not self.confirm(self._started_at, end_of_window, silent):
                    return Event(Voice.PAUSE, self._quiet_since) if first else None
                self._proposed, self._asked = True, 1 + len(self.asks)  # asked no more in this silence
                return Event(Voice.PROPOSED_END, self._quiet_since)
        return None

    def _ended(self) -> None:
        self.speaking, self._voiced_since, self._paused, self._proposed, self._asked = False, None, False, False, 0

    def _due(self, silent: int) -> bool:
        """Whether this silence has reached its next ask: the pause (every silence has it, with or without
        ``confirm``), then each of ``asks`` beyond it (only with ``confirm``)."""
        if self._asked == 0:
            return silent >= self.pause
        later = [ask for ask in sorted(self.asks) if ask > self.pause] if self.confirm is not None else []
        return self._asked <= len(later) and silent >= later[self._asked - 1]

    def finish(self) -> bool:
        """The proposed end stands (its caller has read the words too): the utterance ends at it, and what follows
        is silence before the next one.  False if there is none to end (the speech resumed since)."""
        if not self._proposed:
            return False
        self._ended()
        return True
