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
import threading
from pathlib import Path

import numpy as np

from ..audio.codec import resample
from ..audio.pcm import OUTPUT_RATE
from ..audio.text import place_words
from .base import Word

log = logging.getLogger(__name__)
WHISPER_RATE = 16000
# Whisper's cross-attention places words early: measured on Piper speech with exact times, word starts led by a
# median of 67 ms on one set of sentences (bench/word_timestamps.py's calibration set) and the correction is then
# checked on another (its test set); the aligner moves its times this much later.
ALIGN_LEAD_S = 0.06
WINDOW_S = 30  # Whisper's window
# A short clip's own window (see ``_short``): at least MIN_WINDOW_S, and MARGIN_S of silence after the clip.  Measured
# on Piper speech (bench/turn_taking.py's sentences and phrases): with 1 s of margin Whisper base loops ("Yes Yes
# Yes ...", the text repeated to its token limit) on most clips; with these, and timestamps decoded (the model
# places the text's end and stops), its error rate was that of the whole 30 s window, at a third of the cost.
MIN_WINDOW_S = 10
MARGIN_S = 5.0
# No speech, as faster-whisper's own path decides it: the model's no-speech probability above 0.6 and its text's
# mean log-probability below -1 (measured here: silence, hiss and clicks 0.69-0.80 and below -1.7; Piper's
# "Yes." 0.03 and -0.77, a whisper-quiet sentence 0.06 and -0.96)
NO_SPEECH, LOW_CONFIDENCE = 0.6, -1.0
MAX_TOKENS = 224  # Whisper's limit for one window's text (half its context; the prompt takes the rest)


def whisper_languages() -> list[str]:
    """The language codes Whisper knows (en, de, ...), sorted."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return sorted(_LANGUAGE_CODES)


def whisper_language(code: str) -> bool:
    """Whether Whisper knows the language ``code``."""
    return code in whisper_languages()


class Transcriber:
    def __init__(self, model: str, device: str = "auto", local_only: bool = False) -> None:
        self.model_name, self.device, self.local_only = model, device, local_only
        self._model = None
        self._lock = threading.Lock()  # one alignment at a time (the model is shared with transcription)

    def load(self) -> None:
        from faster_whisper import WhisperModel

        device = self.device if self.device in ("cpu", "cuda") else "auto"
        compute = "int8" if device == "cpu" else "default"
        if self.local_only and not Path(self.model_name).is_dir():
            raise RuntimeError(f"--stt-model {self.model_name} is not a folder (reuse mode downloads nothing)")
        self._model = WhisperModel(self.model_name, device=device, compute_type=compute,
                                   local_files_only=self.local_only)
        log.info("Speech recognition ready: %s", self.model_name)

    def transcribe(self, audio: np.ndarray, rate: int = OUTPUT_RATE) -> str:
        """The words in ``audio`` (mono float), one line, its language detected."""
        return self.recognize(audio, rate)[0]

    def recognize(self, audio: np.ndarray, rate: int = OUTPUT_RATE,
                  language: str | None = None) -> tuple[str, str | None]:
        """(the words in ``audio``, their language).  With the language known, a clip shorter than Whisper's 30 s
        window is heard through a window its own length (``_short``): most of Whisper's cost is its encoder, which
        otherwise reads 30 s whatever the clip's length.  Otherwise (the language to detect, a longer clip)
        faster-whisper's own path."""
        if self._model is None:
            raise RuntimeError("the transcriber is not loaded")
        samples = resample(audio, rate, WHISPER_RATE)
        if len(samples) < WHISPER_RATE // 10:
            return "", language  # under 0.1 s: no word fits (Whisper would make one up)
        if language and len(samples) < (WINDOW_S - MARGIN_S) * WHISPER_RATE:
            return self._short(samples, language), language
        segments, info = self._model.transcribe(samples, beam_size=1, condition_on_previous_text=False,
                                                language=language or None, without_timestamps=True)
        text = " ".join(segment.text.strip() for segment in segments).strip()
        return text, language or info.language

    def _short(self, samples: np.ndarray, language: str) -> str:
        """Greedy decoding of one window as long as the clip plus ``MARGIN_S`` (at least ``MIN_WINDOW_S``), where
        faster-whisper pads every clip to 30 s; with timestamps, which end the text where the speech ends (their
        tokens are dropped).  ``tests/engines/test_stt.py`` holds its error rate to that of the whole window."""
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_ctranslate2_storage, get_suppressed_tokens

        model = self._model
        features = model.feature_extractor(samples)
        frames = features.shape[-1]
        per_second = WHISPER_RATE / model.feature_extractor.hop_length
        size = max(frames + int(MARGIN_S * per_second), int(MIN_WINDOW_S * per_second))
        size += size % 2  # the encoder halves it
        window = np.ascontiguousarray(np.pad(features, ((0, 0), (0, size - frames)))[None], np.float32)
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language)
        prompt = list(tokenizer.sot_sequence)
        result = model.model.generate(get_ctranslate2_storage(window), [prompt], beam_size=1, max_length=MAX_TOKENS,
                                      suppress_blank=True, suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
                                      return_no_speech_prob=True, return_scores=True)[0]
        if result.no_speech_prob > NO_SPEECH and result.scores[0] < LOW_CONFIDENCE:
            return ""  # silence, hiss, a click: Whisper would make up a sentence ("I'm sorry.")
        tokens = [token for token in result.sequences_ids[0] if token < tokenizer.eot]
        return tokenizer.decode(tokens).strip()

    def align(self, audio: np.ndarray, rate: int, text: str) -> list[Word]:
        """When each word of ``text`` (split on whitespace) is said in ``audio``: forced alignment, Whisper's
        cross-attention over the known text's tokens (no recognition, so every word is placed, in order).  The first
        30 s are aligned; words past them share the end."""
        from faster_whisper.tokenizer import Tokenizer

        if self._model is None:
            raise RuntimeError("the transcriber is not loaded")
        words = text.split()
        model = self._model
        samples = resample(audio, rate, WHISPER_RATE)[: 30 * WHISPER_RATE]
        duration = len(samples) / WHISPER_RATE
        features = model.feature_extractor(samples)
        frames = min(features.shape[-1], model.feature_extractor.nb_max_frames)
        segment = features[:, :frames]
        if frames < model.feature_extractor.nb_max_frames:
            segment = np.pad(segment, ((0, 0), (0, model.feature_extractor.nb_max_frames - frames)))
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
        tokens = tokenizer.encode(" " + " ".join(words))
        with self._lock:
            aligned = model.find_alignment(tokenizer, [tokens], model.encode(segment), frames)[0]
        pieces = [(piece["word"], min(float(piece["start"]) + ALIGN_LEAD_S, duration),
                   min(float(piece["end"]) + ALIGN_LEAD_S, duration)) for piece in aligned]
        return [Word(word, start, end) for word, (start, end) in zip(words, place_words(words, pieces))]
