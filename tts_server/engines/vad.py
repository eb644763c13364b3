"""Where a speaker starts and stops talking, as the audio arrives: Silero VAD (the ``silero-vad`` wheel's ONNX model).

The model scores each 32 ms window (512 samples at 16 kHz) with a speech
probability.  ``SpeechDetector`` turns those scores into events, with
hysteresis as Silero's own ``VADIterator`` does: ``start`` once speech has
lasted ``min_speech_ms`` (a cough or a click is not a turn), ``end`` once it has
been followed by ``silence_ms`` of silence.  In between, ``pause`` after
``pause_ms`` of silence (the utterance may be over: a transcription can start
before ``end`` is certain) and ``resume`` if speech comes back first.  Each
detector has its own model state; feed it from one thread at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RATE = 16000
WINDOW = 512  # samples the model scores at once at 16 kHz


@dataclass(frozen=True)
class Event:
    kind: str  # "start" | "pause" | "resume" | "end"
    sample: int  # where it happened, in samples at 16 kHz since the detector began


class SpeechDetector:
    def __init__(self, silence_ms: float = 600, threshold: float = 0.5, min_speech_ms: float = 160,
                 pause_ms: float = 200) -> None:
        from silero_vad import load_silero_vad  # its ONNX model ships in the wheel; onnxruntime runs it

        self._model = load_silero_vad(onnx=True)
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
        import torch

        data = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        whole = len(data) // WINDOW * WINDOW
        self._pending = data[whole:]
        events = []
        for offset in range(0, whole, WINDOW):
            probability = float(self._model(torch.from_numpy(data[offset:offset + WINDOW].copy()), RATE))
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
                    self.speaking, self._quiet_since = True, None
                    return Event("start", self._voiced_since)
            elif probability < self.threshold - 0.15:
                self._voiced_since = None
            return None
        if probability >= self.threshold:
            self._quiet_since = None
            if self._paused:
                self._paused = False
                return Event("resume", end_of_window - WINDOW)
        elif probability < self.threshold - 0.15:
            if self._quiet_since is None:
                self._quiet_since = end_of_window - WINDOW
            if end_of_window - self._quiet_since >= self.silence:
                self.speaking, self._voiced_since, self._paused = False, None, False
                return Event("end", self._quiet_since)
            if end_of_window - self._quiet_since >= self.pause and not self._paused:
                self._paused = True
                return Event("pause", self._quiet_since)
        return None
