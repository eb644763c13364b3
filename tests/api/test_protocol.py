"""The WebSocket wire format's validation rules (the pydantic schemas), without sockets."""

from __future__ import annotations

import json

import pytest

from tts_server.api import schemas as p
from tts_server.api.schema_rules import MAX_JSON_DEPTH
from tts_server.api.ws_replies import as_json
from tts_server.core import events, replies
from tts_server.engines.request import SynthesisRequest

LIMITS = p.Limits(max_text_chars=50, emotions=("happy",), engines=("csm", "piper"))


def parse(obj):
    message = p.parse_message(obj if isinstance(obj, (str, bytes)) else json.dumps(obj), LIMITS)
    return message.to_request() if isinstance(message, p.SynthesizeMessage) else message


def error_code(obj) -> str:
    with pytest.raises(replies.Refusal) as info:
        parse(obj)
    return info.value.code.value


def test_minimal_request_gets_documented_defaults():
    req = parse({"text": "  Hello  "})
    assert isinstance(req, SynthesisRequest)
    assert (req.text, req.speaker, req.seed, req.temperature, req.top_k, req.format) == ("Hello", 0, None, 0.9, 50, "wav")
    assert req.stream is False and req.context is True and len(req.request_id) == 16


def test_speaker_accepts_digit_strings_and_request_id_is_echoed():
    req = parse({"text": "x", "speaker": "12", "request_id": "abc"})
    assert req.speaker == 12 and req.request_id == "abc"


def test_streaming_defaults_to_pcm():
    assert parse({"text": "x", "stream": True}).format == "pcm"


@pytest.mark.parametrize("raw, code", [
    ("{not json", "invalid_json"),
    (b"\x00\x01", "invalid_request"),
    ([1, 2], "invalid_request"),
    ({"text": ""}, "invalid_request"),
    ({"text": "   "}, "invalid_request"),
    ({"text": 5}, "invalid_request"),
    ({}, "invalid_request"),
    ({"text": "x" * 51}, "text_too_long"),
    ({"text": "x", "speaker": -1}, "invalid_request"),
    ({"text": "x", "speaker": "one"}, "invalid_request"),
    ({"text": "x", "speaker": True}, "invalid_request"),
    ({"text": "x", "speaker": 1.5}, "invalid_request"),
    ({"text": "x", "speaker": "²"}, "invalid_request"),  # str.isdigit says yes, int() says no
    ({"text": "x", "speaker": "３"}, "invalid_request"),  # a fullwidth digit
    ({"text": "x", "speaker": "٣"}, "invalid_request"),  # an Arabic-Indic digit
    ('{"text": "' + "é" * (200 * 1024) + '"}', "invalid_request"),  # 200 K characters, 400 KiB: over the cap
    ({"text": "x", "temperature": 0}, "invalid_request"),
    ({"text": "x", "temperature": 2.5}, "invalid_request"),
    ({"text": "x", "temperature": "hot"}, "invalid_request"),
    ({"text": "x", "top_k": 0}, "invalid_request"),
    ({"text": "x", "seed": -3}, "invalid_request"),
    ({"text": "x", "seed": 2**70}, "invalid_request"),
    ({"text": "x", "max_audio_length_ms": 90_001}, "invalid_request"),
    ({"text": "x", "max_audio_length_ms": 0}, "invalid_request"),
    ({"text": "x", "format": "mp3"}, "invalid_request"),
    ({"text": "x", "stream": True, "format": "flac"}, "invalid_request"),
    ({"text": "x", "stream": "yes"}, "invalid_request"),
    ({"text": "x", "emotion": "furious"}, "unknown_emotion"),
    ({"text": "x", "engine": "kokoro"}, "invalid_request"),
    ({"text": "x", "type": "dance"}, "invalid_request"),
    ({"text": "x", "request_id": 7}, "invalid_request"),
    ({"type": "cancel"}, "invalid_request"),
])
def test_bad_messages_get_their_stable_code(raw, code):
    assert error_code(raw) == code


def test_deeply_nested_json_is_refused_before_the_parser_recurses():
    """Refused by a bracket count, not by a RecursionError deep in the parser (where any finalizer of another
    object that runs at that moment fails too: the suite saw that as unraisable-exception warnings)."""
    with pytest.raises(replies.Refusal) as info:
        parse("[" * 100_000 + "]" * 100_000)
    assert info.value.code.value == "invalid_json" and "nested deeper" in info.value.message
    with pytest.raises(replies.Refusal) as info:
        parse('{"text": "x", "extra": ' + "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1) + "}")
    assert "nested deeper" in info.value.message


def test_brackets_inside_strings_are_text_not_nesting():
    text = "A" + "[" * (MAX_JSON_DEPTH + 8) + '"{' + "}" * 2  # json.dumps escapes the quote: the string goes on
    assert parse({"text": text}).text == text


def test_unknown_emotion_lists_the_available_ones():
    with pytest.raises(replies.Refusal) as info:
        parse({"text": "x", "emotion": "furious", "request_id": "r1"})
    assert "happy" in info.value.message and info.value.request_id == "r1"


def test_control_messages():
    cancel = parse({"type": "cancel", "request_id": "r"})
    assert isinstance(cancel, p.CancelMessage) and cancel.request_id == "r"
    assert isinstance(parse({"type": "reset"}), p.ResetMessage)


def test_error_reply_shape():
    assert as_json(events.Failed(replies.ErrorCode.BUSY, "full", "r")) == {
        "status": "error", "code": "busy", "message": "full", "request_id": "r"}
