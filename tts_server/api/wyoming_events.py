"""Wyoming's text-to-speech events, as rules: what the server describes, a synthesize event as our request, and
the bookkeeping of a stream (``synthesize-start`` .. ``synthesize-stop``).

No sockets and no model, like ``schemas`` for the WebSocket and
``openai_schemas`` for HTTP; ``wyoming`` does the I/O and
``docs/wyoming.md`` is the prose version.  Events are the ``wyoming`` package's
own classes; a bad field becomes a ``Refusal`` with one of the
WebSocket's stable codes, sent back as Wyoming's ``error`` event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice, TtsVoiceSpeaker
from wyoming.tts import SynthesizeVoice

from ..core import replies as p
from ..core.events import Failed
from ..core.jobs import Job
from ..core.service import Limits
from ..core.streamed_text import StreamedText
from ..engines import registry
from ..engines.request import LANGUAGE_CODE, MAX_SPEAKER, SynthesisRequest, new_request_id
from .openai_schemas import Voices
from .schema_rules import ENCODABLE_RULE, SPEAKABLE_RULE, encodable, loads_shallow, speakable

LANGUAGE = "en"  # CSM-1B speaks English
VERSION = "1.0"
SPEAKER_CHOICES = 8  # speaker ids a voice by speaker id lists (any id up to MAX_SPEAKER is accepted)
MAX_DATA = 256 * 1024  # bytes of an event's extra data (a synthesize text is at most --max-text-chars)
MAX_PAYLOAD = 64 * 1024  # bytes of an event's payload: a TTS server reads no client audio
NOT_AN_EVENT = ("Not a Wyoming event: each event is one line of JSON with a string 'type' and an object 'data' "
                "(optional non-negative 'data_length' and 'payload_length')")


class EventTooLarge(p.Refusal):
    """An event that declares more bytes than a TTS server reads: answered, then the connection is closed."""


@dataclass(frozen=True)
class Header:
    type: str
    data: dict[str, Any]
    data_length: int
    payload_length: int


def parse_header(line: bytes) -> Header:
    """An event's header line, checked before any of its declared bytes are read."""
    try:
        header = loads_shallow(line)
    except (ValueError, RecursionError):
        raise p.Refusal(p.ErrorCode.INVALID_JSON, NOT_AN_EVENT) from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise p.Refusal(p.ErrorCode.INVALID_JSON, NOT_AN_EVENT)
    data = header.get("data") or {}
    lengths = [header.get("data_length") or 0, header.get("payload_length") or 0]
    if not isinstance(data, dict) or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in lengths):
        raise p.Refusal(p.ErrorCode.INVALID_JSON, NOT_AN_EVENT)
    for name, length, cap in zip(("data_length", "payload_length"), lengths, (MAX_DATA, MAX_PAYLOAD)):
        if length > cap:
            raise EventTooLarge(p.ErrorCode.INVALID_REQUEST, f"'{name}' {length} is over this server's limit of "
                                                             f"{cap} bytes; the connection is closed")
    return Header(header["type"], data, *lengths)


def parse_data(raw: bytes) -> dict[str, Any]:
    """An event's extra data (``data_length`` bytes of JSON), merged into its ``data``."""
    try:
        data = loads_shallow(raw)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise p.Refusal(p.ErrorCode.INVALID_JSON, "An event's extra data must be a JSON object")
    return data


def describe(engines: dict[str, dict[str, Any]], voices: Voices) -> Info:
    """``info`` for ``describe``: one TTS program per engine that serves, in routing order (primary first).

    ``engines`` maps engine name to its ``Engine.describe()``; its registry
    entry gives the program's attribution, description and how its voices are
    listed.  Home Assistant shows the first program's voices; any client may
    name any program's voice.
    """
    programs = []
    for name, described in engines.items():
        spec, languages = registry.get(name), list(described.get("languages") or [LANGUAGE])
        attribution = Attribution(*spec.attribution) if spec and spec.attribution else \
            Attribution(name=name, url=str(described.get("url", "")))
        listing = registry.capabilities(name).voices
        if listing is registry.VoiceListing.OWN:
            tts_voices = [_own_voice(v, registry.label(name), attribution) for v in described.get("voices", [])]
        elif listing is registry.VoiceListing.NAMED:
            tts_voices = _named_voices(registry.label(name), languages, attribution, voices)
        else:  # one voice, the engine's name, by speaker id
            tts_voices = [TtsVoice(name=name, attribution=attribution, installed=True,
                                   description=f"{name} ({described.get('model', '')})", version=None,
                                   languages=languages, speakers=_speakers(SPEAKER_CHOICES))]
        programs.append(TtsProgram(name=name, attribution=attribution, installed=True,
                                   description=spec.description if spec else name, version=VERSION,
                                   voices=tts_voices, supports_synthesize_streaming=True))
    return Info(tts=programs)


def _named_voices(who: str, languages: list[str], attribution: Attribution, voices: Voices) -> list[TtsVoice]:
    """The server's named voices, then ``speaker``: the engine by speaker id alone."""
    named = [TtsVoice(name=v["name"], attribution=attribution, installed=True,
                      description=f"{v['name']} ({who} speaker {v['speaker']})", version=None, languages=languages)
             for v in voices.listing()]
    return [*named, TtsVoice(name="speaker", attribution=attribution, installed=True, description=f"{who} by "
                             "speaker id", version=None, languages=languages, speakers=_speakers(SPEAKER_CHOICES))]


def _own_voice(voice: dict[str, Any], who: str, attribution: Attribution) -> TtsVoice:
    speakers = _speakers(int(voice.get("speakers", 1)))
    return TtsVoice(name=voice["name"], attribution=attribution, installed=True, description=f"{who} {voice['name']}",
                    version=None, languages=[str(voice.get("language") or LANGUAGE)],
                    speakers=speakers if len(speakers) > 1 else None)


def _speakers(count: int) -> list[TtsVoiceSpeaker]:
    return [TtsVoiceSpeaker(name=str(i)) for i in range(count)]


Choice = tuple[int, "str | None", "str | None"]  # speaker id, engine (None: the server's routing), language


def voice_choice(voice: SynthesizeVoice | None, voices: Voices, named: dict[str, tuple[str, str | None]]) -> Choice:
    """(speaker id, engine, language) for a synthesize event's ``voice``.

    ``named`` maps the voice names of engines other than CSM (Piper's voices,
    "piper", "remote") to (engine, the language that voice speaks).  A CSM
    voice name keeps the server's routing, so the fallback still speaks when
    CSM cannot.  ``speaker`` (digits) picks the speaker id; the voice name
    ``speaker`` means CSM by id alone.  A ``language`` goes to the routing,
    which answers ``unsupported_language`` when no engine speaks it.
    """
    if voice is None:
        return 0, None, None
    language = voice.language
    if language is not None and not LANGUAGE_CODE.fullmatch(language):
        raise p.Refusal(p.ErrorCode.INVALID_REQUEST, f"'language' must be a language code such as 'en' or "
                                                     f"'de_DE', got {language!r}")
    speaker, engine = 0, None
    if voice.name is not None and voice.name not in ("speaker",):
        if voice.name in named:
            engine, spoken = named[voice.name]
            language = language or spoken
        else:
            try:
                speaker = voices.resolve(voice.name)
            except p.Refusal:
                known = ", ".join([*(v["name"] for v in voices.listing()), *named])
                raise p.Refusal(p.ErrorCode.INVALID_REQUEST, f"Unknown voice {voice.name!r}; available: "
                                                             f"{known}") from None
    if voice.speaker is not None:
        text = str(voice.speaker)
        digits = text.isascii() and text.isdigit() and len(text) <= len(str(MAX_SPEAKER))  # int() of 5,000 raises
        if not (digits and int(text) <= MAX_SPEAKER):
            shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
            raise p.Refusal(p.ErrorCode.INVALID_REQUEST,
                            f"'speaker' must be a speaker id from 0 to {MAX_SPEAKER}, got {shown!r}")
        speaker = int(text)
    return speaker, engine, language


def read_voice(data: dict[str, Any]) -> SynthesizeVoice | None:
    """The ``voice`` of a synthesize or synthesize-start event's data, checked."""
    voice = data.get("voice")
    if voice is None:
        return None
    if not isinstance(voice, dict) or any(v is not None and not isinstance(v, (str, int)) for v in voice.values()):
        raise p.Refusal(p.ErrorCode.INVALID_REQUEST, "'voice' must be an object with string fields "
                                                     "name, language, speaker")
    return SynthesizeVoice(name=_text_or_none(voice.get("name")), language=_text_or_none(voice.get("language")),
                           speaker=_text_or_none(voice.get("speaker")))


def read_text(data: dict[str, Any], field: str = "text") -> str:
    text = data.get(field)
    if not isinstance(text, str):
        raise p.Refusal(p.ErrorCode.INVALID_REQUEST, f"'{field}' must be a string")
    return text


@dataclass(frozen=True)
class Synthesize:
    """A Wyoming synthesize (a whole text, or a stream's: empty, its text comes in chunks) with its voice choice
    resolved."""

    text: str
    speaker: int = 0
    engine: str | None = None  # None: the server's routing
    language: str | None = None

    def to_request(self) -> SynthesisRequest:
        """One generation: streamed 16-bit PCM with the connection's context, so a reply's sentences share a
        voice; the fields are the request's (same names)."""
        return SynthesisRequest.of(vars(self), request_id=new_request_id(), format="pcm", stream=True, context=True)


def request(text: str, speaker: int, engine: str | None, language: str | None,
            max_text_chars: int) -> SynthesisRequest:
    """A synthesize's text checked (a refusal names the rule), then as our request."""
    text = " ".join(text.split())  # one line, as wyoming-piper joins lines
    if not speakable(text):
        raise p.Refusal(p.ErrorCode.INVALID_REQUEST, f"'text' must be {SPEAKABLE_RULE}")
    if not encodable(text):
        raise p.Refusal(p.ErrorCode.INVALID_REQUEST, f"'text' must be {ENCODABLE_RULE}")
    if len(text) > max_text_chars:
        raise p.Refusal(p.ErrorCode.TEXT_TOO_LONG,
                        f"The text has {len(text)} characters; the limit is {max_text_chars}")
    return Synthesize(text, speaker, engine, language).to_request()


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


# -- the connection's work, in order: what its delivery task answers -------------------------------------------------
@dataclass
class Speak:
    """A whole ``synthesize``: one generation, answered in its turn."""

    request: SynthesisRequest


@dataclass
class Refused:
    """A ``synthesize`` that cannot run: its error, in its turn."""

    error: p.Refusal


class Stopped:
    """A stream's end: ``synthesize-stopped`` once its audio is delivered."""


class Stream:
    """An open ``synthesize-start`` .. ``synthesize-stop``: one job whose text arrives in chunks (``StreamedText``).

    Its job is queued once its first sentence is complete and the delivery has
    reached it (``turn``), not before: a connection's generations run in the
    order they were asked for, each with the ones before it as its context.
    """

    def __init__(self, submit: Callable[[Job], None]) -> None:
        self.submit = submit  # queues a job (may raise ``Refusal``: busy, shutting down)
        self.text: StreamedText | None = None  # None: its start was refused, its chunks are dropped
        self.line = OneLine()
        self.turn = False  # the delivery has reached it: its job is queued as soon as its first sentence is complete
        self.ready = False  # its first sentence is complete: its job waits for its turn
        self.silent = False  # it ended with nothing to speak: no audio and no error, as wyoming-piper answers

    def begin(self, job: Job, limits: Limits) -> StreamedText:
        """Its text, for ``job``: at most ``--max-text-chars`` in all, failed ``text_timeout`` when it completes no
        sentence for ``--text-timeout`` seconds (``watch``)."""
        self.text = StreamedText(job, self._queue, limits.max_text_chars, limits.text_timeout)
        return self.text

    def take_turn(self) -> None:
        """The delivery has reached it: its job is queued now if its first sentence is complete (else at once when
        it is); a refusal ends it with that error, told as its reply."""
        self.turn = True
        if self.ready:
            try:
                self.submit(self.text.job)
            except p.Refusal as refusal:
                self.text.close()
                self.text.job.finish(Failed(refusal.code, refusal.message, self.text.job.request_id))

    def _queue(self, job: Job) -> None:
        """``StreamedText``'s submit, at its first complete sentence: the job is queued in its turn."""
        if self.turn:
            self.submit(job)
        else:
            self.ready = True

    def add(self, chunk: str) -> None:
        """A ``synthesize-chunk``'s text.  One that is not valid Unicode is refused (the stream goes on); one that
        takes the whole text over the limit ends the stream with ``text_too_long``, told in its turn."""
        if not encodable(chunk):
            raise p.Refusal(p.ErrorCode.INVALID_REQUEST, f"'text' must be {ENCODABLE_RULE}; this chunk was dropped")
        text = self.text
        if text is None or not text.open:
            return  # its start was refused, or it has ended (text_too_long, text_timeout): told in its turn
        piece = self.line(chunk)
        if len(piece) > text.room:
            return text.fail(p.Refusal(p.ErrorCode.TEXT_TOO_LONG, f"The streamed text is over {text.max_chars} "
                                                                  "characters; the stream ends here"))
        text.add(piece)

    def end(self) -> None:
        """The text is complete (``synthesize-stop``, or the client half-closed): its rest is spoken.  A stream
        with nothing to speak (no chunk, or no letter or digit) gives no audio and no error, as wyoming-piper
        answers an empty stream."""
        text = self.text
        if text is None:
            return
        if text.open and not text.queued and not speakable("".join(text.written)):
            self.silent = True
            text.job.cancel()  # never queued: it ends ``cancelled`` at once, which the delivery does not report
        text.end()


_SPACE = re.compile(r"\s+")  # str.split()'s whitespace


class OneLine:
    """A stream's chunks as ``request`` reads a whole text: each run of whitespace (newlines too) one space, none
    at either end, however the chunks cut it.  So a streamed reply's text, and its sentences, are those of the same
    text sent whole (a newline would otherwise end a sentence; wyoming-piper also joins lines)."""

    def __init__(self) -> None:
        self._begun = False  # some text has been passed on
        self._space = False  # a space is owed before the next text (held back: it may be the last)

    def __call__(self, chunk: str) -> str:
        line = _SPACE.sub(" ", chunk)
        if line.startswith(" "):
            self._space, line = self._begun, line[1:]
        if not line:
            return ""
        passed = (" " if self._space else "") + line.removesuffix(" ")
        self._begun, self._space = True, line.endswith(" ")
        return passed
