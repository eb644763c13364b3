"""The session stores (SQLite, memory, Redis) under one contract: ids, owners, turns as codes, the limits."""

from __future__ import annotations

import numpy as np
import pytest

from tts_server.core.replies import ErrorCode, Refusal
from tts_server.core.session_redis import RedisSessionStore
from tts_server.core.sessions import SessionStore, StoredTurn, owner_of
from tts_server.engines.base import ContextTurn


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "memory", "redis"])
def make(request, tmp_path):
    """Makes stores of the kind under test; each is closed after the test (a Redis connection or a SQLite file
    left open would be closed by the garbage collector, in whichever later test it happens to run)."""
    made = []

    def store(**limits):
        if request.param == "redis":
            made.append(RedisSessionStore(request.getfixturevalue("redis_url"), **limits))
            made[-1]._redis.flushdb()
        else:
            made.append(SessionStore.open("memory" if request.param == "memory" else f"sqlite:///{tmp_path / 's.db'}",
                                          **limits))
        return made[-1]

    yield store
    for each in made:
        each.close()


def turn(i: int, frames: int = 10) -> StoredTurn:
    return StoredTurn(i % 2, f"turn {i}", frames * 0.08, np.arange(frames * 32).reshape(frames, 32) + i)


def test_turns_come_back_in_order_with_their_codes_and_only_for_their_owner(make):
    store, me, other = make(), owner_of("k1"), owner_of("k2")
    session = store.create(me)
    assert len(session) >= 22  # 128 random bits, url-safe
    assert [store.append(session, me, turn(i)) for i in range(3)] == [1, 2, 3]
    back = store.turns(session, me)
    assert [t.text for t in back] == ["turn 0", "turn 1", "turn 2"]
    assert np.array_equal(back[2].codes, turn(2).codes) and back[1].duration_s == pytest.approx(0.8)
    for who, which in ((other, session), (me, "no-such-id")):
        with pytest.raises(Refusal) as refused:
            store.turns(which, who)
        assert refused.value.code is ErrorCode.UNKNOWN_SESSION
    store.delete(session, me)
    with pytest.raises(Refusal):
        store.turns(session, me)


def test_limits_sessions_bytes_and_the_replacement_of_a_reply(make):
    store, me = make(max_sessions=2, max_bytes=3 * (10 * 32 * 2 + 8)), owner_of(None)
    session = store.create(me)
    store.create(me)
    with pytest.raises(Refusal) as full:
        store.create(me)
    assert full.value.code is ErrorCode.BUSY
    for i in range(5):
        store.append(session, me, turn(i))
    assert [t.text for t in store.turns(session, me)] == ["turn 2", "turn 3", "turn 4"]  # oldest dropped
    seqs = store.extend(session, me, [ContextTurn(0, "a long reply", None, {"csm": turn(9).codes}, duration=0.8)])
    cut = ContextTurn(0, "a long", None, {"csm": turn(9).codes[:4]}, duration=0.32)
    store.replace(session, me, seqs, [cut])
    last = store.turns(session, me)[-1]
    assert (last.text, len(last.codes), last.duration_s) == ("a long", 4, pytest.approx(0.32))


def test_sessions_expire_after_their_time_without_use(tmp_path):
    clock = Clock()
    store = SessionStore.open(f"sqlite:///{tmp_path / 's.db'}", ttl=60, clock=clock)
    me = owner_of(None)
    session = store.create(me)
    clock.now += 59
    store.append(session, me, turn(0))  # used: another 60 s
    clock.now += 59
    assert len(store.turns(session, me)) == 1
    clock.now += 61
    with pytest.raises(Refusal):
        store.turns(session, me)


def test_one_owner_holds_at_most_its_share_of_the_sessions(make):
    store, me = make(max_sessions=10, max_per_owner=2), owner_of(None)
    mine = [store.create(me, "address A") for _ in range(2)]
    with pytest.raises(Refusal) as capped:
        store.create(me, "address A")
    other = store.create(me, "address B")  # another address of the same (keyless) owner
    store.delete(mine[0], me)
    again = store.create(me, "address A")  # a deleted one frees its place
    assert capped.value.code is ErrorCode.TOO_MANY_SESSIONS
    assert {len(store.turns(s, me)) for s in (other, again, mine[1])} == {0}
