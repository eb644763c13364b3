"""Hostile input: >= 10,000 generated frames; every one answered in JSON or by a clean close.

Seed and count are recorded in docs/reliability.md.  The server runs in its own
thread and event loop (as in production); the fuzzer is a plain synchronous
websockets client driven by hypothesis.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import csm_slot, reply_json, server_in_thread

FUZZ_SEED = 20261122
EXAMPLES = 800  # x ~15 frames each: over 10,000 frames (asserted below)
TERMINAL = {"success", "error", "cancelled"}

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4), max_leaves=12)
fields = {
    "type": st.sampled_from(["synthesize", "cancel", "reset", "voice", "dance", "session", "session_delete", "turn",
                             "turn_end", "text", "text_end"])  # turn_start: its audio frames get no reply (test_sessions fuzzes it);
    # respond: test_voice_chat fuzzes it against a chat server
    | json_values, "session": st.sampled_from(["", "x" * 70, "no-such-id"]) | json_values,
    "text": st.text(max_size=5) | st.sampled_from(["<|AUDIO|>", "<|audio_eos|>", "<|begin_of_text|>[7]"])
    | json_values,
    "speaker": st.integers(-3, 2**40) | st.text(alphabet="0123456789²³¹３٣߃", max_size=4) | json_values,
    "seed": st.integers(-5, 2**70) | json_values,
    "temperature": st.floats(allow_nan=True) | json_values, "top_k": st.integers(-2, 10**9) | json_values,
    "max_audio_length_ms": st.floats(-1, 10**6) | json_values,
    "format": st.sampled_from(["wav", "pcm", "flac", "ogg", "mp3"]) | json_values,
    "stream": st.booleans() | json_values, "context": st.booleans() | json_values,
    "request_id": st.text(max_size=200) | json_values, "emotion": json_values,
    "engine": st.sampled_from(["csm", "piper", "x"]) | json_values, "clear": json_values,
    "played_ms": st.floats(-1, 10**6) | json_values, "sample_rate": st.integers(0, 10**5) | json_values,
    "speed": st.floats(0, 5) | json_values, "timestamps": st.booleans() | json_values,
    "progress": st.booleans() | json_values, "text_stream": st.booleans() | json_values,
    "delta": st.text(max_size=30) | json_values, "flush": st.booleans() | json_values,
}
messages = st.fixed_dictionaries({}, optional=fields)
frames = st.one_of(
    messages.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=30),  # not JSON at all
    st.binary(max_size=64),  # binary where a request is expected
    st.binary(min_size=1, max_size=16).map(lambda b: ("raw-text", b"\xff" + b)),  # invalid UTF-8 in a text frame
    st.integers(1, 60_000).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.just(json.dumps({"type": "voice", "speaker": 1, "text": "hi"})),  # then a frame that is not audio
)


class Fuzzer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = self.replies = self.closes = 0
        self.ws = None

    def open(self):
        if self.ws is None:
            self.ws = connect(f"ws://127.0.0.1:{self.port}", max_size=None, close_timeout=2)
        return self.ws

    def one(self, frame) -> None:
        """Send a frame, then a reset, and read to the reset's reply: the frame must get a reply or a close."""
        ws = self.open()
        self.sent += 1
        got = 0
        try:
            if isinstance(frame, tuple):
                ws.send(frame[1], text=True)
            else:
                ws.send(frame)
            ws.send(json.dumps({"type": "reset"}))
            while True:
                reply = ws.recv(timeout=60)
                if isinstance(reply, bytes):
                    continue
                data = reply_json(reply)  # every reply conforms to the published schema
                assert isinstance(data, dict) and "status" in data, data
                # bad input is the client's fault: it must never look like (or cause) a server or engine failure
                assert data.get("code") not in ("internal_error", "generation_failed"), data
                if data == {"status": "reset"} and got:
                    break
                if data == {"status": "reset"}:  # an accepted request: its reply is still to come
                    got = -1
                    continue
                got = 1 if got >= 0 else got
                if got < 0 and data["status"] in TERMINAL:
                    break
        except ConnectionClosed as closed:
            assert closed.rcvd is None or closed.rcvd.code in (1000, 1007, 1009, 1013), closed
            self.closes += 1
            self.ws = None
            return
        self.replies += 1


@pytest.fixture(scope="module")
def threaded_server(tiny_model_dir):
    with server_in_thread(csm_slot(tiny_model_dir, max_batch=4), max_text_chars=24, rate_limit=10**6,
                          max_queued_per_connection=4, text_timeout=0.3) as server:  # open text streams end soon
        yield server


def test_ten_thousand_hostile_frames_get_json_or_a_clean_close(threaded_server):
    fuzzer = Fuzzer(threaded_server.port)

    @seed(FUZZ_SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(frames, min_size=10, max_size=20))
    def batch(items):
        for item in items:
            fuzzer.one(item)

    batch()
    assert fuzzer.sent >= 10_000, fuzzer.sent  # each one answered (Fuzzer.one fails on a missing reply)
    assert fuzzer.closes > 0  # the invalid-UTF-8 frames were sent and closed cleanly (1007)
    ws = fuzzer.open()  # the server lives and serves normally afterwards
    ws.send(json.dumps({"text": "Fine", "max_audio_length_ms": 160}))
    while isinstance(reply := ws.recv(timeout=60), bytes) or reply_json(reply)["status"] not in TERMINAL:
        pass
    assert json.loads(reply)["status"] == "success"
    ws.close()
    print(f"fuzz: seed {FUZZ_SEED}, {fuzzer.sent} frames, {fuzzer.replies} answered, {fuzzer.closes} clean closes")


# -- session floods: the limits on sessions, fuzzed -------------------------------------------------------------------
FLOOD_SEED = 20261205
SESSION_CAP = 4  # --max-sessions-per-owner: every connection here is one address, so one owner
FLOOD_RATE = 20  # --rate-limit: a connection's bucket of creates (resuming or deleting costs nothing)
flood_steps = st.lists(st.one_of(
    st.tuples(st.just("create"), st.integers(0, 2), st.integers(1, 12)),  # a burst of creates on one connection
    st.tuples(st.just("create_on_all"), st.just(0), st.just(0)),  # one create on every connection at once
    st.tuples(st.just("resume"), st.integers(0, 2), st.integers(0, 40)),  # a known id, a deleted one, or none
    st.tuples(st.sampled_from(["delete", "reconnect"]), st.integers(0, 2), st.just(0)),
    st.tuples(st.sampled_from(["http_delete", "http_get"]), st.just(0), st.integers(0, 40)),
), min_size=1, max_size=12)


class SessionFlood:
    """Three connections from one address flooding ``session`` messages, against a model of the server: the owner's
    live sessions (``held``), never more than ``SESSION_CAP``, with a create refused ``too_many_sessions`` exactly
    when the cap is reached, ``rate_limited`` only for creates, and every other reply what its message asks."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ws = [self._connect() for _ in range(3)]
        self.bound: list[str | None] = [None] * 3
        self.held: set[str] = set()
        self.gone: list[str] = []  # deleted ids: resuming them is unknown_session
        self.codes: set[str] = set()

    def _connect(self):
        return connect(f"ws://127.0.0.1:{self.port}", max_size=None, close_timeout=2)

    def _reply(self, ws) -> dict:
        reply = reply_json(ws.recv(timeout=30))
        assert isinstance(reply, dict) and reply.get("status") in ("session", "session_deleted", "error"), reply
        if reply["status"] == "error":
            self.codes.add(reply["code"])
        return reply

    def create(self, connections: list[int]) -> None:
        """A ``session`` without an id per listed connection, all sent before any reply is read.  One connection's
        are handled in order (a refusal comes exactly at the cap); several connections' race (a refusal means the
        cap was reached by the end)."""
        for i in connections:
            self.ws[i].send(json.dumps({"type": "session"}))
        ordered, refused = len(set(connections)) == 1, False
        for i in connections:
            reply = self._reply(self.ws[i])
            if reply["status"] == "session":
                assert reply["turns"] == 0 and reply["session"] not in self.held
                self.held.add(reply["session"])
                self.bound[i] = reply["session"]
            else:
                assert reply["code"] in ("rate_limited", "too_many_sessions"), reply
                refused = refused or reply["code"] == "too_many_sessions"
                assert not (ordered and refused) or len(self.held) == SESSION_CAP, (reply, len(self.held))
            assert len(self.held) <= SESSION_CAP
        assert not refused or len(self.held) == SESSION_CAP

    def step(self, kind: str, i: int, n: int) -> None:
        known = sorted(self.held) + self.gone
        if kind == "create":
            self.create([i] * n)
        elif kind == "create_on_all":
            self.create([0, 1, 2])
        elif kind == "resume":
            session = known[n % len(known)] if known else "no-such-session"
            self.ws[i].send(json.dumps({"type": "session", "session": session}))
            reply = self._reply(self.ws[i])
            if session in self.held:
                assert reply["status"] == "session" and reply["session"] == session, reply
                self.bound[i] = session
            else:
                assert reply.get("code") == "unknown_session", reply
        elif kind == "delete":
            self.ws[i].send(json.dumps({"type": "session_delete"}))
            reply, session, self.bound[i] = self._reply(self.ws[i]), self.bound[i], None
            if session in self.held:
                assert reply["status"] == "session_deleted", reply
                self.forget(session)
            else:  # none bound, or deleted meanwhile by another connection
                assert reply.get("code") == ("invalid_request" if session is None else "unknown_session"), reply
        elif kind == "reconnect":  # a fresh connection: a fresh rate bucket, the same owner
            self.ws[i].close()
            self.ws[i], self.bound[i] = self._connect(), None
        elif known:
            session = known[n % len(known)]
            status, body = http_request(self.port, f"/v1/sessions/{session}", "DELETE" if kind == "http_delete"
                                        else "GET")
            assert status == (200 if session in self.held else 404), (status, body)
            if status == 404:
                assert json.loads(body)["error"]["code"] == "unknown_session", body
            elif kind == "http_delete":
                self.forget(session)

    def forget(self, session: str) -> None:
        self.held.discard(session)
        self.gone.append(session)

    def close(self) -> None:
        for ws in self.ws:
            ws.close()


def http_request(port: int, path: str, method: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method),
                                    timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_session_floods_from_many_connections_keep_the_per_owner_cap_and_get_stable_codes(store, tiny_model_dir,
                                                                                           tmp_path):
    """Generated floods of creates (bursts, one per connection at once, through fresh connections), resumes and
    deletes over the WebSocket and HTTP: the model of the owner's sessions holds after every reply (in Redis too,
    where the creates of the three connections race on the store's threads)."""
    redis = None
    if store == "redis":
        from test_session_store_outage import Redis

        redis = Redis(tmp_path)
        store = redis.url
    with contextlib.ExitStack() as stack:
        if redis is not None:
            stack.callback(redis.stop)
        server = stack.enter_context(server_in_thread(csm_slot(tiny_model_dir), rate_limit=FLOOD_RATE,
                                                      max_sessions_per_owner=SESSION_CAP, session_store=store))
        flood = SessionFlood(server.port)

        @seed(FLOOD_SEED)
        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(flood_steps)
        def run(steps):
            for step in steps:
                flood.step(*step)

        try:
            run()
        finally:
            flood.close()
    assert flood.codes == {"rate_limited", "too_many_sessions", "unknown_session", "invalid_request"}
