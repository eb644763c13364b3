"""Where a speaker starts and stops talking, as the audio arrives: Silero VAD (the ``silero-vad`` wheel's ONNX model).

The model scores each 32 ms window (512 samples at 16 kHz) with a speech
probability.  ``SpeechDetector`` turns those scores into events, with
hysteresis as Silero's own ``VADIterator`` does: ``speech_start`` once speech has
lasted ``min_speech_ms`` (a cough or a click is not a turn), ``speech_end`` once it has
been followed by ``silence_ms`` of silence.  In between, ``pause`` after
``pause_ms`` of silence (the utterance may be over: a transcription can start
before ``end`` is certain) and ``resume`` if speech comes back first.

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


@dataclass(frozen=True)
class Event:
    kind: Voice
    sample: int  # where it happened, in samples at 16 kHz since the detector began
    confirmed: bool = False  # a speech_end the turn detector decided at a pause (not the full silence)


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
    """Silero's scores as events (see the module docstring).  ``confirm(start, end)``, when given, is asked at each
    pause (sample positions of the utterance's start and of now): True ends the utterance there (``speech_end``
    instead of ``pause``), False lets the silence go on to ``silence_ms`` (a turn detector's ceiling)."""

    def __init__(self, silence_ms: float = 600, threshold: float = 0.5, min_speech_ms: float = MIN_SPEECH_MS,
                 pause_ms: float = 200, confirm: Callable[[int, int], bool] | None = None) -> None:
        self.model = silero_model()
        self.confirm = confirm
        self._started_at = 0  # where the utterance in progress began
        self._state = SileroState()
        self.threshold = threshold
        self.silence = int(silence_ms * RATE / 1000)
        self.min_speech = int(min_speech_ms * RATE / 1000)
        self.pause = min(int(pause_ms * RATE / 1000), self.silence)
        self._paused = False
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
                self._paused = False
                return Event(Voice.RESUME, end_of_window - WINDOW)
        elif probability < self.threshold - 0.15:
            if self._quiet_since is None:
                self._quiet_since = end_of_window - WINDOW
            long_enough = end_of_window - self._quiet_since >= self.silence
            if not long_enough and end_of_window - self._quiet_since >= self.pause and not self._paused:
                self._paused = True
                if self.confirm is None or not self.confirm(self._started_at, end_of_window):
                    return Event(Voice.PAUSE, self._quiet_since)
                self.speaking, self._voiced_since, self._paused = False, None, False
                return Event(Voice.SPEECH_END, self._quiet_since, confirmed=True)  # complete: it ends now
            if long_enough:
                self.speaking, self._voiced_since, self._paused = False, None, False
                return Event(Voice.SPEECH_END, self._quiet_since)
        return None

    def reopen(self, quiet_since: int) -> None:
        """The utterance ended at a pause goes on after all (its words read unfinished): back to the pause, the
        silence counted from where it began, so that speech resumes it and the full silence still ends it."""
        self.speaking, self._paused, self._quiet_since, self._voiced_since = True, True, quiet_since, None
