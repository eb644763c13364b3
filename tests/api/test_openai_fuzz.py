"""Hostile bodies to OpenAI's POST /v1/audio/speech: every one gets an OpenAI-shaped 4xx or audio, never a 5xx."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from conftest import csm_slot, server_in_thread
from test_openai import post


@pytest.fixture(scope="module")
def threaded_server(tiny_model_dir):
    with server_in_thread(csm_slot(tiny_model_dir, max_batch=4), max_text_chars=24, rate_limit=10**6) as server:
        yield server


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=10)
optional_fields = {
    "speed": json_values, "stream_format": json_values, "seed": json_values, "instructions": json_values,
    "response_format": st.sampled_from(["mp3", "pcm", "wav", "vtt", "srt"]) | json_values, "sample_rate": json_values,
    "session": st.sampled_from(["no-such-session", ""]) | json_values, "timestamps": st.booleans() | json_values,
}
bodies = st.one_of(
    st.fixed_dictionaries({"model": st.just("tts-1"), "voice": st.sampled_from(["alloy", "3"]),
                           "input": st.text(min_size=1, max_size=20), "max_audio_length_ms": st.just(160)},
                          optional=optional_fields).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["tts-1", "piper", "x"]) | json_values, "input": st.text(max_size=30) | json_values,
        "voice": st.sampled_from(["alloy", "3", "²", "nobody"]) | json_values,
        "response_format": st.sampled_from(["mp3", "pcm", "ogg", "vtt"]) | json_values, "speed": json_values,
        "timestamps": json_values,
        "stream_format": json_values, "seed": json_values, "instructions": json_values,
        "max_audio_length_ms": st.sampled_from([80, 160]) | json_values, "sample_rate": json_values,
    }).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
)


def test_hostile_bodies_all_get_json_answers_never_a_server_error(threaded_server):
    answered = []

    @seed(20261122)
    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(bodies)
    def one(body):
        status, reply = post(threaded_server.port, body)
        assert status < 500, (status, body, reply)
        if status != 200:
            assert set(json.loads(reply)["error"]) == {"message", "type", "param", "code"}
        answered.append(status)

    one()
    assert len(answered) == 300 and any(s == 200 for s in answered) and any(s == 400 for s in answered)
    with socket.create_connection(("127.0.0.1", threaded_server.port), timeout=10) as raw:  # not even HTTP
        raw.sendall(b"BREW /coffee HTCPCP/1.0\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400")
    assert post(threaded_server.port, json.dumps({"model": "tts-1", "voice": "alloy", "input": "Alive",
                                                  "max_audio_length_ms": 160}).encode())[0] == 200
