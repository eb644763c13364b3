"""File-name conventions of public emotional-speech datasets, mapped to emotion + transcript.

Each parser takes a file name and returns ``(emotion, transcript)`` or ``None``
for a name outside the convention.  Emotion names are shared across datasets
(``angry``, ``happy``, ``sad``, ...) so clips from several sources merge.
"""

from __future__ import annotations

import re
from typing import Callable

RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
                    "06": "fearful", "07": "disgust", "08": "surprised"}
RAVDESS_STATEMENTS = {"01": "Kids are talking by the door.", "02": "Dogs are sitting by the door."}

CREMAD_EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral",
                   "SAD": "sad"}
CREMAD_SENTENCES = {
    "IEO": "It's eleven o'clock.", "TIE": "That is exactly what happened.", "IOM": "I'm on my way to the meeting.",
    "IWW": "I wonder what this is about.", "TAI": "The airplane is almost full.",
    "MTI": "Maybe tomorrow it will be cold.", "IWL": "I would like a new alarm clock.",
    "ITH": "I think I have a doctor's appointment.", "DFA": "Don't forget a jacket.",
    "ITS": "I think I've seen this before.", "TSI": "The surface is slick.",
    "WSI": "We'll stop in a couple of minutes.",
}

EMODB_EMOTIONS = {"W": "angry", "L": "bored", "E": "disgust", "A": "fearful", "F": "happy", "T": "sad",
                  "N": "neutral"}
EMODB_TEXTS = {
    "a01": "Der Lappen liegt auf dem Eisschrank.",
    "a02": "Das will sie am Mittwoch abgeben.",
    "a04": "Heute abend könnte ich es ihm sagen.",
    "a05": "Das schwarze Stück Papier befindet sich da oben neben dem Holzstück.",
    "a07": "In sieben Stunden wird es soweit sein.",
    "b01": "Was sind denn das für Tüten, die da unter dem Tisch stehen?",
    "b02": "Sie haben es gerade hochgetragen und jetzt gehen sie wieder runter.",
    "b03": "An den Wochenenden bin ich jetzt immer nach Hause gefahren und habe Agnes besucht.",
    "b09": "Ich will das eben wegbringen und dann mit Karl was trinken gehen.",
    "b10": "Die wird auf dem Platz sein, wo wir sie immer hinlegen.",
}

_RAVDESS = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)\.wav$", re.IGNORECASE)
_CREMAD = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})\.wav$", re.IGNORECASE)
_EMODB = re.compile(r"^(\d\d)([ab]\d\d)([A-Z])([a-z])\.wav$")


def ravdess(name: str) -> tuple[str, str] | None:
    """``03-01-05-01-02-01-12.wav``: modality-channel-emotion-intensity-statement-repetition-actor (speech only)."""
    m = _RAVDESS.match(name)
    if not m or m.group(2) != "01":  # 01 = speech, 02 = song
        return None
    emotion, statement = RAVDESS_EMOTIONS.get(m.group(3)), RAVDESS_STATEMENTS.get(m.group(5))
    return (emotion, statement) if emotion and statement else None


def cremad(name: str) -> tuple[str, str] | None:
    """``1001_DFA_ANG_XX.wav``: actor_sentence_emotion_level."""
    m = _CREMAD.match(name)
    if not m:
        return None
    emotion, sentence = CREMAD_EMOTIONS.get(m.group(3).upper()), CREMAD_SENTENCES.get(m.group(2).upper())
    return (emotion, sentence) if emotion and sentence else None


def emodb(name: str) -> tuple[str, str] | None:
    """``03a01Fa.wav``: speaker, text code, emotion letter (German initial), version."""
    m = _EMODB.match(name)
    if not m:
        return None
    emotion, text = EMODB_EMOTIONS.get(m.group(3)), EMODB_TEXTS.get(m.group(2))
    return (emotion, text) if emotion and text else None


PARSERS: dict[str, Callable[[str], tuple[str, str] | None]] = {"ravdess": ravdess, "cremad": cremad, "emodb": emodb}
