"""The request's fields are declared once, each marked as shaping the audio and replies or not; the response
cache's key is built from the marks, so a new field cannot be left out of it (``timestamps``/``progress`` were)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, get_args, get_type_hints

import pytest

from tts_server.core.cache import key
from tts_server.engines.request import SHAPES, SHAPING_FIELDS, SynthesisRequest, shaping_fields

KEYED = SynthesisRequest(text="Hi.", request_id="r", seed=1, context=False)  # a request the cache may answer


def _changed(value: Any, hint: Any) -> Any:
    """Another value of a field's type: a new field of a plain type is covered without editing this test."""
    if value is None:
        kind = next(arg for arg in get_args(hint) if arg is not type(None))
        return kind(1)
    if isinstance(value, bool):
        return not value
    return value + type(value)(1)


def test_every_request_field_says_whether_it_shapes_the_audio_and_replies():
    unmarked = [f.name for f in fields(SynthesisRequest) if not isinstance(f.metadata.get(SHAPES), bool)]
    assert not unmarked, f"mark these fields of SynthesisRequest with metadata {{{SHAPES!r}: True/False}}"
    assert "request_id" not in SHAPING_FIELDS and {"timestamps", "progress", "text"} <= set(SHAPING_FIELDS)


def test_a_dataclass_with_an_unmarked_field_is_refused():
    @dataclass(frozen=True)
    class Forgetful:
        text: str = field(default="", metadata={SHAPES: True})
        new: int = 0

    with pytest.raises(TypeError, match="new"):
        shaping_fields(Forgetful)


@pytest.mark.parametrize("name", SHAPING_FIELDS)
def test_a_change_to_any_shaping_field_changes_the_cache_key(name):
    hints = get_type_hints(SynthesisRequest)
    changed = replace(KEYED, **{name: _changed(getattr(KEYED, name), hints[name])})
    assert key(KEYED, "salt") is not None and key(changed, "salt") != key(KEYED, "salt")


def test_the_request_id_does_not_change_the_cache_key_and_the_salt_does():
    assert key(replace(KEYED, request_id="other"), "salt") == key(KEYED, "salt") != key(KEYED, "other salt")


@pytest.mark.parametrize("asks", [{"timestamps": True}, {"progress": True}, {"seed": None}, {"context": True}])
def test_a_request_asking_for_replies_beside_the_audio_or_not_fixed_by_its_inputs_has_no_key(asks):
    assert key(replace(KEYED, **asks), "salt") is None
