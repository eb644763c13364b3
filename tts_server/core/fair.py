"""One model thread shared fairly by many connections: round-robin between owners, bounded per owner, dropped
when nobody waits any more.

Speech recognition (Whisper) and the turn encoder (Mimi, the VAD) each run on
one thread for the whole server: the models are not thread-safe, and a second
copy would cost memory and the cores CSM needs.  A plain one-thread executor
runs its work first come first served, so one client's backlog (a long reply's
twenty word alignments, a flood of audio) delayed every other client's next
turn by all of it, and work kept running after its client had gone.

``FairThread`` tags every item with an *owner* (a connection, a job's
alignments) and takes the owners in turn, one item each: an owner that
submits while others have backlogs waits for at most the item running when it
arrived, plus one item of each other owner with work.  Each owner may have at
most ``limit`` items waiting (``Full`` beyond it: the caller says what that
means to its client).  ``cancel(owner)`` drops an owner's waiting work at once
(a client left); a future's own ``cancel`` (or ``discard``) drops one item (a
job ended).  An item already running cannot be interrupted (CTranslate2 and
torch calls cannot be): it finishes, and its result is thrown away.

It is a ``concurrent.futures.Executor`` too: ``loop.run_in_executor(thread,
fn)`` works, as the server's own work, one more owner in the rotation.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import threading
import weakref
from typing import Any, Callable, Hashable

SERVER = "server"  # the owner of work submitted without one (``Executor.submit``)
_IDLE = object()  # no item is running


class Full(RuntimeError):
    """The owner already has ``limit`` items waiting."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} items are already waiting")
        self.waiting = waiting


class Dropped(Exception):
    """The work was dropped before it could be used: its connection closed, or its request ended."""

    def __init__(self, why: str = "its connection closed or its request ended") -> None:
        super().__init__(f"The work was dropped: {why}")


class _Item:
    __slots__ = ("owner", "future", "fn", "args", "kwargs")

    def __init__(self, owner: Hashable, fn: Callable, args: tuple, kwargs: dict) -> None:
        self.owner, self.fn, self.args, self.kwargs = owner, fn, args, kwargs
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class FairThread(concurrent.futures.Executor):
    def __init__(self, name: str, limit: int | None = None, on_drop: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.limit = limit if limit is not None else math.inf  # waiting items per owner
        self._on_drop = on_drop  # told how many waiting items were dropped (a metric)
        self._lock = threading.Condition()
        self._queues: dict[Hashable, collections.deque[_Item]] = {}  # each owner's waiting items, oldest first
        self._turns: dict[Hashable, None] = {}  # owners with waiting items, in the order they get their next turn
        self._running: _Item | None = None
        self._waiting = 0
        self._thread: threading.Thread | None = None
        self._shut = False
        self.completed = 0  # items run to the end (their result used or not)
        self.dropped = 0  # items dropped before they ran

    # -- submitting ---------------------------------------------------------------------------------------
    def submit_for(self, owner: Hashable, fn: Callable, /, *args: Any, limit: int | None = None,
                   **kwargs: Any) -> concurrent.futures.Future:
        """Queue ``fn(*args, **kwargs)`` in ``owner``'s turn; ``Full`` when ``owner`` already has ``limit`` (default:
        the thread's) items waiting.  Cancelling the returned future drops the item if it has not started."""
        item = _Item(owner, fn, args, kwargs)
        with self._lock:
            if self._shut:
                raise RuntimeError(f"the {self.name} thread is shut down")
            queue = self._queues.get(owner)
            waiting = len(queue) if queue else 0
            if waiting >= (limit if limit is not None else self.limit):
                raise Full(waiting)
            if queue is None:
                queue = self._queues[owner] = collections.deque()
            queue.append(item)
            self._waiting += 1
            running = self._running is not None and self._running.owner == owner
            if owner not in self._turns and not running:  # the running owner's turn comes back when it ends
                self._turns[owner] = None
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name)
                self._thread.start()
                _started.add(self)
            self._lock.notify()
        item.future.add_done_callback(lambda future: future.cancelled() and self._forget(item))
        return item.future

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """``Executor.submit``: the server's own work (no connection's), one more owner in the rotation."""
        return self.submit_for(SERVER, fn, *args, **kwargs)

    async def run(self, owner: Hashable, fn: Callable, /, *args: Any, limit: int | None = None) -> Any:
        """``fn(*args)`` in ``owner``'s turn, awaited.  ``Dropped`` if its owner is cancelled meanwhile; if the
        awaiting task is cancelled, the item is dropped (or, running, its result discarded)."""
        future = self.submit_for(owner, fn, *args, limit=limit)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def relay(done: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(_settle, done, waiter)
            except RuntimeError:  # the loop is closed: nobody waits
                pass

        future.add_done_callback(relay)
        try:
            return await waiter
        except asyncio.CancelledError:
            discard(future)
            raise

    # -- dropping -----------------------------------------------------------------------------------------
    def cancel(self, owner: Hashable) -> int:
        """Drop every item ``owner`` has waiting (it left); its running item, if any, finishes unused.  Returns how
        many were dropped."""
        with self._lock:
            queue = self._queues.pop(owner, None) or ()
            self._turns.pop(owner, None)
            self._waiting -= len(queue)
            running = self._running.future if self._running is not None and self._running.owner == owner else None
        for item in queue:
            item.future.cancel()
            item.future.set_running_or_notify_cancel()  # (what wakes ``concurrent.futures.wait``)
        if running is not None:
            discard(running)
        self._count_dropped(len(queue))
        return len(queue)

    def _forget(self, item: _Item) -> None:
        """A waiting item's future was cancelled: out of the queue, so it holds no place (nor memory)."""
        with self._lock:
            queue = self._queues.get(item.owner)
            if queue is None or item not in queue:
                return
            queue.remove(item)
            self._waiting -= 1
            if not queue:
                del self._queues[item.owner]
                self._turns.pop(item.owner, None)
        item.future.set_running_or_notify_cancel()  # the thread will never see it: wake its waiters here
        self._count_dropped(1)

    def _count_dropped(self, count: int) -> None:
        if count:
            self.dropped += count
            if self._on_drop is not None:
                self._on_drop(count)

    # -- state --------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Items waiting (not the one running)."""
        return self._waiting

    def pending_of(self, owner: Hashable) -> int:
        with self._lock:
            return len(self._queues.get(owner, ()))

    # -- the thread ---------------------------------------------------------------------------------------
    def _next(self) -> _Item | None:
        """The next owner's oldest item (None: shut down and nothing left)."""
        with self._lock:
            while not self._turns and not self._shut:
                self._lock.wait()
            if not self._turns:
                return None
            owner = next(iter(self._turns))
            del self._turns[owner]
            queue = self._queues[owner]
            item = queue.popleft()
            if not queue:
                del self._queues[owner]
            self._waiting -= 1
            self._running = item
            return item

    def _work(self) -> None:
        while (item := self._next()) is not None:
            future = item.future
            if future.set_running_or_notify_cancel():
                try:
                    result = item.fn(*item.args, **item.kwargs)
                except BaseException as exc:  # the caller's to see, as an executor does
                    _resolve(future, exc=exc)
                else:
                    _resolve(future, result)
                self.completed += 1
            item = future = None  # nothing of it is kept while the thread waits
            with self._lock:
                owner, self._running = self._running.owner, None
                if owner in self._queues and owner not in self._turns:
                    self._turns[owner] = None  # its next item waits for the others' turns

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            owners = list(self._queues) if cancel_futures else []
            self._lock.notify_all()
        for owner in owners:
            self.cancel(owner)
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


_started: weakref.WeakSet[FairThread] = weakref.WeakSet()


def _at_exit() -> None:
    """At interpreter exit (as ``ThreadPoolExecutor`` does): what waits is dropped, and the item running is let
    finish before the interpreter goes (a model call cut off by exit aborts the process)."""
    for thread in list(_started):
        thread.shutdown(wait=False, cancel_futures=True)


threading._register_atexit(_at_exit)  # before non-daemon threads are joined


def discard(future: concurrent.futures.Future) -> None:
    """Nobody wants this work any more: dropped if it waits; if it runs, its waiters are released with ``Dropped``
    and its result, when it comes, is thrown away."""
    if not future.cancel() and future.running():
        _resolve(future, exc=Dropped())


def _resolve(future: concurrent.futures.Future, result: Any = None, exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:  # discarded while it ran: the result is not wanted
        pass


def _settle(done: concurrent.futures.Future, waiter: asyncio.Future) -> None:
    if waiter.done():
        return
    if done.cancelled():
        waiter.set_exception(Dropped())
    elif (exc := done.exception()) is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(done.result())
