"""Speech recognition for the other side's turns: Whisper through faster-whisper (CTranslate2), on CPU or CUDA.

``--stt-model`` names the model: a faster-whisper size or hub repository
(``base``, ``small``, ``Systran/faster-whisper-small``, ...) fetched in download
mode, or a folder holding a converted model (``model.bin``, ``config.json``,
``tokenizer.json``, ``vocabulary.json``).  A turn that arrives without text is
transcribed on the transcriber's own thread; the transcript is what the session
stores and what ``turn_saved`` reports.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..audio.codec import resample

log = logging.getLogger(__name__)
WHISPER_RATE = 16000


class Transcriber:
    def __init__(self, model: str, device: str = "auto", local_only: bool = False) -> None:
        self.model_name, self.device, self.local_only = model, device, local_only
        self._model = None

    def load(self) -> None:
        from faster_whisper import WhisperModel

        device = self.device if self.device in ("cpu", "cuda") else "auto"
        compute = "int8" if device == "cpu" else "default"
        if self.local_only and not Path(self.model_name).is_dir():
            raise RuntimeError(f"--stt-model {self.model_name} is not a folder (reuse mode downloads nothing)")
        self._model = WhisperModel(self.model_name, device=device, compute_type=compute,
                                   local_files_only=self.local_only)
        log.info("Speech recognition ready: %s", self.model_name)

    def transcribe(self, audio: np.ndarray, rate: int = 24000) -> str:
        """The words in ``audio`` (mono float), one line."""
        if self._model is None:
            raise RuntimeError("the transcriber is not loaded")
        segments, _ = self._model.transcribe(resample(audio, rate, WHISPER_RATE), beam_size=1,
                                             condition_on_previous_text=False)
        return " ".join(segment.text.strip() for segment in segments).strip()

    def describe(self) -> dict:
        return {"model": self.model_name, "ready": self._model is not None}
