"""What goes into CSM's prompt besides the text: voices, conversation memory, emotion references.

CSM-1B is a base model: a bare speaker id does not fix a voice, and the mood of
its output follows the audio in its context.  The server steers both:

- ``ReferenceLibrary`` (one per server): emotion clips from ``emotion_map.json``
  and a default voice per speaker from ``voices.json``; with pinning on, a
  speaker's first long-enough CSM generation becomes its default voice.
- ``History`` (one per connection, held by its ``core.conversation``): recent
  turns, bounded, and voice prompts the client uploaded.

``History.prompt_for`` fills a task's context right before it runs:
voice prompt first (uploaded, else default), then history, oldest first; the
emotion reference goes right before the text.  ``context: false`` uses the
emotion reference alone and reads or writes nothing else.
"""

from __future__ import annotations

import collections
import logging
import random
import re
import threading
from pathlib import Path

import numpy as np

from ..audio.pcm import FRAME_SECONDS, OUTPUT_RATE
from ..engines.base import TURN_CODES, ContextTurn, SynthesisTask
from ..references import Clip, load_emotions, load_voices, save_voice

log = logging.getLogger(__name__)
PIN_MIN_SECONDS = 2.0


def clip_turn(clip: Clip, speaker: int, cache: dict) -> ContextTurn:
    return ContextTurn(clip.speaker if clip.speaker is not None else speaker, clip.text, clip.audio, cache,
                       pinned=True)


class ReferenceLibrary:
    """Emotion clips and default voices of one references folder."""

    def __init__(self, root: str | Path | None, pin_voices: bool = False) -> None:
        """``root=None``: no references and no pinning (an engine-only server, as in some tests)."""
        self.root = Path(root) if root is not None else None
        self.pin_voices = pin_voices
        self.emotions: dict[str, list[Clip]] = {}
        self.voices: dict[int, ContextTurn] = {}
        self._caches: dict[int, dict] = {}  # id(clip) -> shared engine cache (CSM codes)
        self._pinning: set[int] = set()
        self._names: dict[str, int] = {}  # voices.json names -> speaker id
        self._lock = threading.Lock()

    def load(self) -> list[str]:
        """Read both maps; returns one warning per skipped entry (already logged)."""
        if self.root is None:
            return []
        self.emotions, warnings = load_emotions(self.root)
        voices, voice_warnings = load_voices(self.root)
        self.voices = {speaker: clip_turn(clip, speaker, {}) for speaker, clip in voices.items()}
        self._names = {clip.name: speaker for speaker, clip in voices.items() if clip.name}
        for warning in warnings + voice_warnings:
            log.warning("references: %s", warning)
        log.info("references: %d emotions (%d clips), %d default voices from %s", len(self.emotions),
                 sum(len(c) for c in self.emotions.values()), len(self.voices), self.root)
        return warnings + voice_warnings

    def emotion_turn(self, emotion: str, speaker: int, seed: int | None) -> ContextTurn:
        """One of the emotion's clips: chosen by ``seed`` when given, else at random."""
        clips = self.emotions[emotion]
        clip = clips[seed % len(clips)] if seed is not None else random.choice(clips)
        return clip_turn(clip, speaker, self._caches.setdefault(id(clip), {}))

    def voice_names(self) -> dict[str, int]:
        return dict(self._names)

    def stateless_prompt(self, task: SynthesisTask) -> None:
        """A prompt without conversation (HTTP): the speaker's default voice, the emotion reference, the text.

        The same request always gets the same prompt, so an HTTP voice name
        sounds the same on every call once its speaker has a default voice.
        """
        request = task.request
        if request.emotion is not None:
            task.reference = self.emotion_turn(request.emotion, request.speaker, request.seed)
        voice = self.voices.get(request.speaker)
        task.context = [voice] if voice else []

    def wants_pin(self, speaker: int, turns: list[ContextTurn]) -> bool:
        return (self.pin_voices and self.root is not None and speaker not in self.voices and speaker not in self._pinning
                and sum(t.duration_s for t in turns) >= PIN_MIN_SECONDS)

    def pin(self, speaker: int, turns: list[ContextTurn]) -> bool:
        """Make ``turns`` (one request's CSM speech) the speaker's default voice if it has none yet.

        Runs in a worker thread (it writes files); returns whether it pinned.
        """
        with self._lock:
            if not self.wants_pin(speaker, turns):
                return False
            self._pinning.add(speaker)
        try:
            audio = np.concatenate([t.audio for t in turns])
            text = " ".join(t.text for t in turns)
            path = save_voice(self.root, speaker, audio, text)
            self.voices[speaker] = ContextTurn(speaker, text, audio, {}, pinned=True)
            log.info("pinned %.1f s of CSM speech as the default voice of speaker %d (%s)",
                     len(audio) / OUTPUT_RATE, speaker, path)
            return True
        finally:
            self._pinning.discard(speaker)

    def describe(self) -> dict:
        return {
            "emotions": {name: len(clips) for name, clips in sorted(self.emotions.items())},
            "voices": sorted(self.voices),
            "pin_voices": self.pin_voices,
        }


class History:
    """One connection's memory: its recent turns and the voices it uploaded."""

    def __init__(self, library: ReferenceLibrary, max_turns: int = 8) -> None:
        self.library = library
        self.history: collections.deque[ContextTurn] = collections.deque(maxlen=max_turns)
        self.voices: dict[int, ContextTurn] = {}

    def reset(self) -> None:
        self.history.clear()

    def set_voice(self, speaker: int, text: str, audio: np.ndarray) -> ContextTurn:
        self.voices[speaker] = ContextTurn(speaker, text, audio, {}, pinned=True)
        return self.voices[speaker]

    def clear_voice(self, speaker: int) -> bool:
        return self.voices.pop(speaker, None) is not None

    def prompt_for(self, task: SynthesisTask) -> None:
        request = task.request
        if request.emotion is not None:
            task.reference = self.library.emotion_turn(request.emotion, request.speaker, request.seed)
        if not request.context:
            return
        voice = self.voices.get(request.speaker) or self.library.voices.get(request.speaker)
        task.context = ([voice] if voice else []) + list(self.history)

    def remember(self, task: SynthesisTask) -> None:
        if task.request.context:
            self.history.extend(task.produced)

    def replace(self, old: list[ContextTurn], new: list[ContextTurn]) -> None:
        """Put ``new`` where ``old`` were in the history (a reply cut to what was heard); appended if they were not
        there (a reply cancelled while it ran was never remembered)."""
        turns = list(self.history)
        at = next((i for i, turn in enumerate(turns) if any(turn is o for o in old)), len(turns))
        turns = [turn for turn in turns if not any(turn is o for o in old)]
        self.history.clear()
        self.history.extend(turns[:at] + new + turns[at:])


def heard(turns: list[ContextTurn], played_s: float) -> list[ContextTurn]:
    """The part of a reply's turns a listener heard in ``played_s`` (barge-in): whole turns, then the turn it
    stopped in (or a sentence a cancel cut off, ``text_s`` set) cut at its last whole frame, its text cut after the
    last word heard to its end: by the turn's word times when it has them, else in proportion of characters (at
    least one word)."""
    kept, left = [], played_s
    for turn in turns:
        if turn.duration_s <= left and turn.text_s is None:
            kept.append(turn)
            left -= turn.duration_s
            continue
        codes = turn.cache[TURN_CODES]
        frames = min(len(codes), int(left / FRAME_SECONDS + 1e-9))
        if frames:
            kept.append(ContextTurn(turn.speaker, _said(turn, frames * FRAME_SECONDS), None,
                                    {TURN_CODES: codes[:frames]}, duration=frames * FRAME_SECONDS))
        break
    return kept


def _said(turn: ContextTurn, heard_s: float) -> str:
    """The words of ``turn`` heard in its first ``heard_s`` seconds, as a prefix of its text."""
    words = turn.text.split()
    if turn.words is not None and len(turn.words) == len(words):  # the words heard to their end
        said = sum(1 for word in turn.words if word.end_s <= heard_s + 0.02)
    else:  # no word times: the words whose last character falls in the heard share of the text's characters
        share = heard_s / max(turn.text_s or turn.duration_s, FRAME_SECONDS)
        chars, said = share * len(turn.text), 0
        for match in re.finditer(r"\S+", turn.text):
            if match.end() > chars + 0.5:
                break
            said += 1
    return " ".join(words[:max(1, said)])
