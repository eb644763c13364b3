"""Whether an utterance is complete, from how it sounds: Smart Turn v3.2 (Pipecat's model, BSD-2-Clause), on the CPU.

A short silence is not the end of a turn: "I'd like to... book a table" has
one in the middle.  Smart Turn hears the last 8 s of the utterance (intonation,
the words' rhythm) and says whether the speaker has finished: the listener asks
it when the VAD proposes an end after a short silence, and keeps listening when
it says no (up to a longer ceiling of silence, which ends the turn anyway).

Its verdict on the same words moves with the silence after them (100-200 ms
more can move it from 0.7 to 0.3, or 0.2 to 0.8), so a yes near the threshold
early in a silence is weak evidence: within ``SURE_UNTIL_MS`` of silence the
probability must reach ``SURE``; the listener asks again later in the silence
(``core.listening.ASK_AGAIN_MS``), where the plain threshold holds.  A
mid-sentence hesitation is often over by then, and a finished utterance the
model was unsure of waits that much longer instead of the whole ceiling.

The model is the ONNX file in the ``pipecat-ai`` wheel
(``pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx``): found in the
installed package, never downloaded, and never imported through ``pipecat``
(whose import sets up its own logging).  Its input is Whisper's log-mel
features of 8 s at 16 kHz, the audio zero-padded at the front when shorter
(transformers' Whisper feature extraction in float64, as Pipecat's analyzer
computes them; a test compares the two).  One session serves the
whole process on one CPU thread; a call takes ~10-65 ms, on the turn-encoding
thread (blocking: never on the event loop).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from transformers.audio_utils import spectrogram, window_function

from .base import one_per_process

RATE = 16000
WINDOW_S = 8  # the model hears the last 8 s
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
COMPLETE = 0.5  # a probability above this: the speaker has finished
# Within SURE_UNTIL_MS of silence (600 ms: the fixed silence that ends a turn without a turn detector), a "finished"
# must be this sure.  Chosen on the calibration half of bench/turn_taking.py's sentences (the lowest of 0.5-0.9 in
# steps of 0.1 with the fewest hesitations ended there); judged on the other half (docs/benchmarks.md).
SURE, SURE_UNTIL_MS = 0.8, 600
N_FFT, HOP = 400, 160  # Whisper's features: 25 ms windows every 10 ms


def model_path() -> Path:
    """The model file inside the installed ``pipecat-ai`` wheel (located, not imported)."""
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pipecat-ai package (which carries the Smart Turn model) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "audio" / "turn" / "smart_turn" / "data" / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"the Smart Turn model is not where pipecat-ai keeps it: {path}")
    return path


class SmartTurn:
    """Smart Turn v3.2: the probability that an utterance (16 kHz float samples, its last 8 s) is complete."""

    def __init__(self, path: Path | None = None) -> None:
        import onnxruntime
        from transformers import WhisperFeatureExtractor

        options = onnxruntime.SessionOptions()
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path or model_path()), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        self._mel = WhisperFeatureExtractor(chunk_length=WINDOW_S).mel_filters
        self._window = window_function(N_FFT, "hann")

    def probability(self, audio: np.ndarray) -> float:
        """How likely the speaker of ``audio`` (mono float at 16 kHz, the utterance so far) has finished."""
        size = WINDOW_S * RATE
        audio = np.asarray(audio, np.float32)[-size:]
        audio = np.pad(audio, (size - len(audio), 0))  # shorter: silence before it, as the model was trained
        out = self.session.run(None, {"input_features": self.features(audio)[None].astype(np.float32)})[0]
        return float(np.asarray(out).reshape(-1)[0])

    def features(self, audio: np.ndarray) -> np.ndarray:
        """Whisper's log-mel features of 8 s, computed in float64 as transformers' numpy path does (its torch path,
        in float32, differs by ~1e-5, which moves the model's probability by up to a few thousandths)."""
        audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
        log_mel = spectrogram(audio, self._window, frame_length=N_FFT, hop_length=HOP, power=2.0,
                              mel_filters=self._mel, log_mel="log10")[:, :-1]
        log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
        return (log_mel + 4.0) / 4.0

    def complete(self, audio: np.ndarray, silence_ms: float | None = None) -> bool:
        """Whether the speaker of ``audio`` has finished, ``silence_ms`` into the silence that ends it (None: the
        plain threshold; see the module docstring)."""
        early = silence_ms is not None and silence_ms < SURE_UNTIL_MS
        return self.probability(audio) > (SURE if early else COMPLETE)


smart_turn = one_per_process(SmartTurn)  # the process's one copy, loaded on first use
