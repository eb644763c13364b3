"""The fair shared model thread (``core.fair.FairThread``): owners take turns, one item each; each owner's waiting
work is bounded; an owner's work is dropped when it leaves, and a running item's result is then thrown away."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from tts_server.core.fair import Dropped, FairThread, Full


def blocked(thread: FairThread, owner="gate") -> tuple[threading.Event, concurrent.futures.Future]:
    """An item of ``owner`` that holds the thread until the event is set (so others queue behind it)."""
    release, started = threading.Event(), threading.Event()
    future = thread.submit_for(owner, lambda: (started.set(), release.wait(30)))
    assert started.wait(10)
    return release, future


def test_owners_take_turns_one_item_each_whatever_their_backlog():
    thread, order = FairThread("t"), []
    release, _ = blocked(thread)
    futures = [thread.submit_for(owner, order.append, f"{owner}{i}")
               for owner, count in (("a", 5), ("b", 2), ("c", 1)) for i in range(count)]
    release.set()
    concurrent.futures.wait(futures, 10)
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]
    thread.shutdown()


def test_a_newcomer_waits_only_for_the_item_running_when_it_came_not_for_the_backlog():
    thread, order = FairThread("t"), []
    release, _ = blocked(thread, owner="a")  # a's own item runs; a has a backlog of 10 behind it
    backlog = [thread.submit_for("a", order.append, f"a{i}") for i in range(10)]
    newcomer = thread.submit_for("b", order.append, "b")
    release.set()
    concurrent.futures.wait([*backlog, newcomer], 10)
    assert order[0] == "b" and order[1:] == [f"a{i}" for i in range(10)]
    thread.shutdown()


def test_an_owner_may_have_only_its_limit_of_items_waiting_and_others_are_not_refused():
    thread = FairThread("t", limit=3)
    release, _ = blocked(thread)
    for _ in range(3):
        thread.submit_for("a", int)
    with pytest.raises(Full) as refused:
        thread.submit_for("a", int)
    assert refused.value.waiting == 3
    assert thread.submit_for("a", int, limit=4) is not None  # a caller may name its own bound
    assert thread.submit_for("b", int) is not None and thread.pending == 5
    release.set()
    thread.shutdown()
    assert thread.pending == 0 and thread.completed == 6


def test_an_owner_that_leaves_has_its_waiting_work_dropped_and_its_running_result_thrown_away():
    drops = []
    thread, ran = FairThread("t", on_drop=drops.append), []
    release, running = blocked(thread, owner="a")
    waiting = [thread.submit_for("a", ran.append, i) for i in range(4)]
    other = thread.submit_for("b", ran.append, "b")
    assert thread.cancel("a") == 4
    assert thread.pending == 1 and thread.pending_of("a") == 0 and drops == [4] and thread.dropped == 4
    assert all(f.cancelled() for f in waiting)
    assert len(concurrent.futures.wait(waiting, timeout=5).done) == 4
    with pytest.raises(Dropped):  # its caller is released now, not when the running item ends
        running.result(timeout=0)
    release.set()
    other.result(10)
    assert ran == ["b"]  # none of a's waiting items ran
    thread.shutdown()


def test_cancelling_one_waiting_item_frees_its_place_at_once():
    thread = FairThread("t", limit=2)
    release, _ = blocked(thread)
    first, second = thread.submit_for("a", int), thread.submit_for("a", int)
    assert first.cancel() and thread.pending == 1 and thread.dropped == 1
    assert first in concurrent.futures.wait([first], timeout=5).done  # whoever waits on it is woken
    thread.submit_for("a", int)  # its place is free again
    release.set()
    second.result(10)
    thread.shutdown()


async def test_an_awaiting_caller_gets_dropped_when_its_owner_leaves_and_a_cancelled_caller_drops_its_item():
    thread, ran = FairThread("t"), []
    release, _ = blocked(thread)
    left = asyncio.ensure_future(thread.run("a", ran.append, "a"))
    impatient = asyncio.ensure_future(thread.run("b", ran.append, "b"))
    await asyncio.sleep(0.05)
    thread.cancel("a")
    impatient.cancel()
    with pytest.raises(Dropped):
        await left
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert thread.pending == 0
    release.set()
    assert await thread.run("c", lambda: 42) == 42
    assert ran == []
    # an executor too: the server's own work takes its turn like an owner's
    assert await asyncio.get_running_loop().run_in_executor(thread, sum, [1, 2]) == 3
    thread.shutdown()
    with pytest.raises(RuntimeError):
        thread.submit_for("a", int)
