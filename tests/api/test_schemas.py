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
