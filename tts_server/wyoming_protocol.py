"""Wyoming's text-to-speech events, as rules: what the server describes, and a synthesize event as our request.

Pure functions only (no sockets, no model), like ``protocol`` for the WebSocket
and ``openai_protocol`` for HTTP; ``wyoming_api`` does the I/O and
``docs/wyoming.md`` is the prose version.  Events are the ``wyoming`` package's
own classes; a bad field becomes a ``ProtocolError`` with one of the
WebSocket's stable codes, sent back as Wyoming's ``error`` event.
"""

from __future__ import annotations

from typing import Any

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice, TtsVoiceSpeaker
from wyoming.tts import SynthesizeVoice

from . import protocol as p
from .openai_protocol import ApiError, Voices

LANGUAGE = "en"  # CSM-1B speaks English
VERSION = "1.0"
_ATTRIBUTION = {
    "csm": Attribution(name="Sesame", url="https://huggingface.co/sesame/csm-1b"),
    "piper": Attribution(name="Piper (Open Home Foundation)", url="https://github.com/OHF-Voice/piper1-gpl"),
}
_DESCRIPTION = {"csm": "Sesame CSM-1B, conversational speech", "piper": "Piper, fast local speech"}
SPEAKER_CHOICES = 8  # speaker ids the CSM voice "speaker" lists (any id up to MAX_SPEAKER is accepted)


def describe(engines: dict[str, dict[str, Any]], voices: Voices) -> Info:
    """``info`` for ``describe``: one TTS program per engine that serves, in routing order (primary first).

    ``engines`` maps engine name to its ``Engine.describe()``.  Home Assistant
    shows the first program's voices; any client may name any program's voice.
    """
    programs = []
    for name, described in engines.items():
        attribution = _ATTRIBUTION.get(name, Attribution(name=name, url=""))
        if name == "piper":
            language = str(described.get("language") or LANGUAGE)
            speakers = [TtsVoiceSpeaker(name=str(i)) for i in range(int(described.get("speakers", 1)))]
            tts_voices = [TtsVoice(name=described["voice"], attribution=attribution, installed=True,
                                   description=f"Piper {described['voice']}", version=None, languages=[language],
                                   speakers=speakers if len(speakers) > 1 else None)]
        else:
            tts_voices = [TtsVoice(name=v["name"], attribution=attribution, installed=True,
                                   description=f"{v['name']} (CSM speaker {v['speaker']})", version=None,
                                   languages=[LANGUAGE]) for v in voices.listing()]
            tts_voices.append(TtsVoice(name="speaker", attribution=attribution, installed=True,
                                       description="CSM by speaker id", version=None, languages=[LANGUAGE],
                                       speakers=[TtsVoiceSpeaker(name=str(i)) for i in range(SPEAKER_CHOICES)]))
        programs.append(TtsProgram(name=name, attribution=attribution, installed=True,
                                   description=_DESCRIPTION.get(name, name), version=VERSION, voices=tts_voices,
                                   supports_synthesize_streaming=True))
    return Info(tts=programs)


def voice_choice(voice: SynthesizeVoice | None, voices: Voices, piper_voice: str | None) -> tuple[int, str | None]:
    """(speaker id, engine or None for the server's routing) for a synthesize event's ``voice``.

    A CSM voice name keeps the server's routing, so the fallback still speaks
    when CSM cannot; Piper's voice name asks for Piper.  ``speaker`` (digits)
    picks the speaker id; the voice name ``speaker`` means CSM by id alone.
    """
    if voice is None:
        return 0, None
    if voice.language is not None and not voice.language.lower().startswith(LANGUAGE):
        raise p.ProtocolError(p.ErrorCode.INVALID_REQUEST, f"No voice speaks {voice.language!r}; this server "
                                                           f"speaks {LANGUAGE}")
    speaker, engine = 0, None
    if voice.name is not None and voice.name not in ("speaker",):
        if voice.name in (piper_voice, "piper"):
            engine = "piper"
        else:
            try:
                speaker = voices.resolve(voice.name)
            except ApiError:
                known = ", ".join(v["name"] for v in voices.listing())
                raise p.ProtocolError(p.ErrorCode.INVALID_REQUEST, f"Unknown voice {voice.name!r}; available: "
                                                                   f"{known}, {piper_voice or 'piper'}") from None
    if voice.speaker is not None:
        text = str(voice.speaker)
        if not (text.isascii() and text.isdigit() and int(text) <= p.MAX_SPEAKER):
            raise p.ProtocolError(p.ErrorCode.INVALID_REQUEST,
                                  f"'speaker' must be a speaker id from 0 to {p.MAX_SPEAKER}, got {text!r}")
        speaker = int(text)
    return speaker, engine


def read_voice(data: dict[str, Any]) -> SynthesizeVoice | None:
    """The ``voice`` of a synthesize or synthesize-start event's data, checked."""
    voice = data.get("voice")
    if voice is None:
        return None
    if not isinstance(voice, dict) or any(v is not None and not isinstance(v, (str, int)) for v in voice.values()):
        raise p.ProtocolError(p.ErrorCode.INVALID_REQUEST, "'voice' must be an object with string fields "
                                                           "name, language, speaker")
    return SynthesizeVoice(name=_text_or_none(voice.get("name")), language=_text_or_none(voice.get("language")),
                           speaker=_text_or_none(voice.get("speaker")))


def read_text(data: dict[str, Any], field: str = "text") -> str:
    text = data.get(field)
    if not isinstance(text, str):
        raise p.ProtocolError(p.ErrorCode.INVALID_REQUEST, f"'{field}' must be a string")
    return text


def request(text: str, speaker: int, engine: str | None, max_text_chars: int) -> p.SynthesisRequest:
    """One generation: streamed 16-bit PCM with the connection's context, so a reply's sentences share a voice."""
    text = " ".join(text.split())  # one line, as wyoming-piper joins lines
    if len(text) > max_text_chars:
        raise p.ProtocolError(p.ErrorCode.TEXT_TOO_LONG,
                              f"The text has {len(text)} characters; the limit is {max_text_chars}")
    return p.SynthesisRequest(text=text, request_id=p.new_request_id(), speaker=speaker, format="pcm",
                              stream=True, context=True, engine=engine)


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
