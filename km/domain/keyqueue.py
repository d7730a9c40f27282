"""Priority wait queue for key material (the KM's priority queues, paper Fig. 1).

When a link pool cannot serve every request, the requests wait here. Service is strict:
the longest-waiting request of the highest waiting priority is the *head*, and only the
head may take material. A request that needs more than the pool holds therefore holds up
smaller and lower-priority ones behind it instead of being starved by them; every wait is
bounded by a timeout, so a request that cannot be met in time leaves and the next one
becomes the head.

Taking material is the caller's business, not the queue's: ``acquire`` returns a
``KeyTurn`` once it is the caller's turn and the caller's ``fits()`` holds; the caller then
takes the material synchronously (no ``await`` in between, so no one else can take it
first) and releases the turn, which lets the next head check its own ``fits()``::

    with await queue.acquire(priority, lambda: pool.available_bits >= need, timeout):
        material, spans = pool.take(need // 8)

Whoever adds material calls ``notify()``. Only the head's ``fits()`` is ever evaluated, so
a notification costs O(1) predicate calls however many requests wait, and admitting or
removing a waiter costs O(log n).

Not thread-safe: use it from the event loop that owns the pools.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable

# A waiter's state: in the heap, holding the turn, or out of the queue (left, or its
# predicate failed and the exception went to it).
_WAITING, _TURN, _OUT = "waiting", "turn", "out"

# Left waiters stay in the heap until they reach the top; the heap is rebuilt without them
# once they are this many and outnumber the live ones, so memory stays proportional to the
# live waiters.
_COMPACT_AT = 64


class QueueTimeout(TimeoutError):
    """The wait for key material reached its timeout; the waiter has left the queue.

    A ``TimeoutError`` (``asyncio.TimeoutError``), so callers may catch either.
    """

    def __init__(self, message: str, *, priority: int, timeout_s: float):
        super().__init__(message)
        self.priority = priority
        self.timeout_s = timeout_s


class _Waiter:
    __slots__ = ("order", "priority", "fits", "wakeup", "state")

    def __init__(self, priority: int, seq: int, fits: Callable[[], bool], wakeup: asyncio.Future):
        self.order = (-priority, seq)  # higher priority first, then first come first served
        self.priority = priority
        self.fits = fits
        self.wakeup = wakeup
        self.state = _WAITING

    def __lt__(self, other: _Waiter) -> bool:
        return self.order < other.order


class KeyTurn:
    """The right to take key material now; release it (or leave the ``with`` block) promptly."""

    __slots__ = ("_queue", "_waiter")

    def __init__(self, queue: KeyQueue, waiter: _Waiter):
        self._queue = queue
        self._waiter = waiter

    def release(self) -> None:
        """Pass the turn on to the next head; releasing twice is harmless."""
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            self._queue._end_turn(waiter)

    def __enter__(self) -> KeyTurn:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class KeyQueue:
    def __init__(self) -> None:
        self._heap: list[_Waiter] = []
        self._waiting = 0  # live waiters in the heap
        self._left = 0  # waiters in the heap that have left
        self._turn: _Waiter | None = None
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Requests waiting (not counting one that holds the turn)."""
        return self._waiting

    async def acquire(self, priority: int, fits: Callable[[], bool], timeout: float) -> KeyTurn:
        """Wait until this request is the head and ``fits()`` is true; at most ``timeout`` seconds.

        A request that is at least as high as every waiting one and fits now returns without
        waiting. ``timeout`` 0 means "only if it fits now". Raises ``QueueTimeout`` when the
        time is up; cancellation also removes the waiter. In both cases the next waiter gets
        its chance at once. An exception raised by ``fits()`` reaches this caller only.
        """
        if not (math.isfinite(timeout) and timeout >= 0):
            raise ValueError(f"a wait for key material needs a finite timeout >= 0 s, got {timeout!r}")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(priority, next(self._seq), fits, loop.create_future())
        head = self._head()
        if self._turn is None and (head is None or head.priority < priority) and fits():
            waiter.state = _TURN
            self._turn = waiter
            return KeyTurn(self, waiter)
        self._enqueue(waiter)
        try:
            async with asyncio.timeout(timeout) as deadline:
                while True:
                    await waiter.wakeup
                    # Material may have been taken outside the queue between the grant and
                    # this task running; if so, wait again from the same place in line.
                    if fits():
                        return KeyTurn(self, waiter)
                    self._turn = None
                    waiter.wakeup = loop.create_future()
                    self._enqueue(waiter)
                    self._dispatch()
        except TimeoutError:
            self._leave(waiter)
            if not deadline.expired():  # raised by fits(), not by the wait
                raise
            raise QueueTimeout(
                f"no key material for this request within {timeout:g} s at priority {priority}; "
                f"{len(self)} requests still wait. Ask for less key at once, raise the timeout, "
                f"or check the link key rates",
                priority=priority, timeout_s=timeout,
            ) from None
        except BaseException:
            self._leave(waiter)
            raise

    def notify(self) -> None:
        """Material arrived: let the head take it if it now fits."""
        self._dispatch()

    def _enqueue(self, waiter: _Waiter) -> None:
        waiter.state = _WAITING
        self._waiting += 1
        heapq.heappush(self._heap, waiter)

    def _head(self) -> _Waiter | None:
        heap = self._heap
        while heap:
            top = heap[0]
            if top.state is _WAITING and not top.wakeup.cancelled():
                return top
            heapq.heappop(heap)
            if top.state is _WAITING:  # cancelled or timed out, its task has not run yet
                top.state = _OUT
                self._waiting -= 1
            else:
                self._left -= 1
        return None

    def _dispatch(self) -> None:
        """Grant the turn to the head if nobody holds it and the head's material fits."""
        while self._turn is None:
            head = self._head()
            if head is None:
                return
            try:
                fits = head.fits()
            except Exception as error:  # the predicate's fault: its owner hears of it
                self._pop_head(_OUT)
                head.wakeup.set_exception(error)
                continue
            if not fits:
                return
            self._pop_head(_TURN)
            self._turn = head
            head.wakeup.set_result(None)

    def _pop_head(self, state: str) -> None:
        waiter = heapq.heappop(self._heap)
        waiter.state = state
        self._waiting -= 1

    def _leave(self, waiter: _Waiter) -> None:
        if waiter.state is _WAITING:
            waiter.state = _OUT
            self._waiting -= 1
            self._left += 1
            if self._left >= _COMPACT_AT and self._left > self._waiting:
                self._heap = [w for w in self._heap if w.state is _WAITING]
                heapq.heapify(self._heap)
                self._left = 0
        elif self._turn is waiter:  # granted, but cancelled before it could run
            self._turn = None
        self._dispatch()

    def _end_turn(self, waiter: _Waiter) -> None:
        if self._turn is waiter:
            waiter.state = _OUT
            self._turn = None
            self._dispatch()
