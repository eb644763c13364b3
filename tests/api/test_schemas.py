"""The published JSON Schema of the WebSocket protocol: made from the same pydantic models that validate messages,
and every JSON example in docs/protocol.md conforms to it."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from conftest import ROOT
from tts_server.api.schemas import json_schema


def validator(side: str) -> jsonschema.Draft202012Validator:
    schema = json_schema()
    return jsonschema.Draft202012Validator({"$defs": schema["$defs"], **schema["properties"][side]})


def doc_examples() -> list[dict]:
    blocks = re.findall(r"```json\n(.*?)```", (ROOT / "docs" / "protocol.md").read_text(), re.S)
    return [json.loads(block) for block in blocks]


def test_the_schema_is_valid_json_schema_with_both_sides():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {"client", "server"} <= set(schema["properties"])


def test_every_example_in_the_protocol_doc_conforms_to_the_schema():
    examples = doc_examples()
    assert len(examples) >= 8
    for example in examples:
        side = "server" if "status" in example else "client"
        errors = list(validator(side).iter_errors(example))
        assert not errors, (example, [e.message for e in errors])


@pytest.mark.parametrize("message", [
    {"text": "x", "speaker": -1},
    {"text": "x", "format": "mp3"},
    {"type": "cancel"},
    {"text": "x", "temperature": 0},
])
def test_the_schema_refuses_what_the_server_refuses(message):
    assert list(validator("client").iter_errors(message))


def test_the_server_publishes_the_schema(tiny_model_dir):
    import asyncio

    from conftest import ahttp_get, csm_slot, running_server

    async def fetch():
        async with running_server(csm_slot(tiny_model_dir)) as server:
            return await ahttp_get(server.port, "/v1/websocket.schema.json")

    status, body = asyncio.run(fetch())
    assert status == 200 and json.loads(body) == json.loads(json.dumps(json_schema()))


# -- the replies: generated from the core's events, unknown properties forbidden ---------------------------------

def sample(annotation, full: bool):
    """A value of ``annotation`` (an event field's type), with optional parts filled (``full``) or not."""
    import dataclasses
    import enum
    import types
    import typing

    from tts_server.engines.base import Word

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return sample(next(a for a in args if a is not type(None)), full)
    if origin is typing.Literal:
        return args[0]
    if origin is tuple:
        return (sample(args[0], full),)
    if dataclasses.is_dataclass(annotation):
        return Word("Hello", 0.0, 0.25) if annotation is Word else pytest.fail(f"no sample of {annotation}")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return next(iter(annotation))
    return {str: "x", int: 3, float: 0.5, bool: True}[annotation]


def event_of(kind, full: bool):
    """An event of class ``kind``: every field set (``full``), or only those without a default."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(kind)
    return kind(**{f.name: sample(hints[f.name], full) for f in dataclasses.fields(kind)
                   if full or f.default is dataclasses.MISSING})


def test_every_event_kind_has_exactly_one_reply_definition():
    from tts_server.core.events import REPLIES, EventKind

    server, defs = json_schema()["properties"]["server"], json_schema()["$defs"]
    by_status = [d["properties"]["status"]["const"] for d in defs.values() if "status" in d.get("properties", {})]
    assert sorted(by_status) == sorted(kind.value for kind in EventKind)
    assert set(server["discriminator"]["mapping"]) == {kind.value for kind in EventKind}
    assert len(server["oneOf"]) == len(REPLIES) == len(EventKind)


@pytest.mark.parametrize("full", [True, False], ids=["every-field", "required-fields-only"])
def test_every_event_as_the_websocket_encodes_it_conforms(full):
    from tts_server.api.ws_replies import as_json
    from tts_server.core.events import REPLIES

    for kind in REPLIES:
        reply = as_json(event_of(kind, full))
        errors = [e.message for e in validator("server").iter_errors(reply)]
        assert not errors, (reply, errors)


def test_a_reply_with_an_unknown_property_is_refused():
    """The hand-written schema allowed any extra property, which hid five fields of ``success`` it lacked."""
    from tts_server.api.ws_replies import as_json
    from tts_server.core.events import REPLIES

    for kind in REPLIES:
        reply = as_json(event_of(kind, True))
        assert not list(validator("server").iter_errors(reply))
        assert list(validator("server").iter_errors({**reply, "unexpected": 1})), kind
    word = as_json(event_of(REPLIES[1], True))["words"][0]
    assert list(validator("server").iter_errors({"status": "words", "request_id": "r", "words": [{**word, "x": 1}]}))


def test_a_reply_needs_its_required_fields_and_an_optional_one_is_absent_not_null():
    from tts_server.api.ws_replies import as_json
    from tts_server.core.events import Progress, Succeeded

    def ok(reply) -> bool:
        return not list(validator("server").iter_errors(reply))

    success = as_json(event_of(Succeeded, True))
    assert ok(success)
    assert {"generation_s", "ttfa_ms", "truncated", "voice", "cached"} <= set(success)  # the fields that had drifted
    for name in ("request_id", "format", "sample_rate", "length_bytes", "duration_s", "engine", "speaker",
                 "message", "channels"):  # always sent (no default, or one that is not None)
        assert not ok({k: v for k, v in success.items() if k != name}), name
    for name in ("voice", "chunks", "words", "cached"):  # optional: left out when None, never null
        assert ok({k: v for k, v in success.items() if k != name}) and not ok({**success, name: None}), name
    progress = as_json(Progress("r", 1, None, 0.5))
    assert progress["sentences"] is None and ok(progress)  # required, and typed ``int | None``: sent as null
    assert not ok({k: v for k, v in progress.items() if k != "sentences"})
    assert not ok({"status": "error", "message": "no code"}) and not ok({"status": "dance"})
