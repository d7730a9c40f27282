"""Priority wait queue: strict priority, FIFO within a priority, bounded waits."""

import asyncio

import pytest

from vqkd.km.domain.keyqueue import KeyQueue, QueueTimeout


class Pool:
    """Stands in for a link pool: a number of key units."""

    def __init__(self, units: int = 0):
        self.units = units
        self.checks: list[str] = []  # whose fits() ran, in order

    def fits(self, need: int, name: str = ""):
        def check() -> bool:
            self.checks.append(name)
            return self.units >= need
        return check


async def draw(queue, pool, name, priority, need, served, timeout=5.0):
    with await queue.acquire(priority, pool.fits(need, name), timeout):
        pool.units -= need
        served.append(name)


async def settle():
    """Let every runnable task reach its next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_served_by_priority_then_in_arrival_order():
    queue, pool, served = KeyQueue(), Pool(), []
    arrivals = [("a", 1), ("b", 5), ("c", 1), ("d", 9), ("e", 5), ("f", 0), ("g", 9)]
    tasks = [asyncio.create_task(draw(queue, pool, name, prio, 1, served)) for name, prio in arrivals]
    await settle()
    assert len(queue) == len(arrivals) and served == []
    pool.units = len(arrivals)
    queue.notify()
    await asyncio.gather(*tasks)
    assert served == ["d", "g", "b", "e", "a", "c", "f"]
    assert len(queue) == 0 and pool.units == 0


async def test_fits_now_and_nobody_waiting_returns_without_waiting():
    queue, pool, served = KeyQueue(), Pool(3), []
    await draw(queue, pool, "a", 0, 2, served, timeout=0)
    assert served == ["a"] and pool.units == 1


async def test_head_that_does_not_fit_holds_back_lower_and_later_requests():
    queue, pool, served = KeyQueue(), Pool(5), []
    big = asyncio.create_task(draw(queue, pool, "big", 5, 10, served))
    await settle()
    small_same = asyncio.create_task(draw(queue, pool, "small-same", 5, 1, served))
    small_low = asyncio.create_task(draw(queue, pool, "small-low", 1, 1, served))
    await settle()
    queue.notify()
    await settle()
    assert served == [] and pool.units == 5  # enough for the small ones, but it is not their turn
    pool.units = 12
    queue.notify()
    await asyncio.gather(big, small_same, small_low)
    assert served == ["big", "small-same", "small-low"]


async def test_higher_priority_arrival_that_fits_goes_before_a_stuck_lower_head():
    queue, pool, served = KeyQueue(), Pool(5), []
    stuck = asyncio.create_task(draw(queue, pool, "stuck", 1, 10, served))
    await settle()
    await draw(queue, pool, "urgent", 2, 3, served, timeout=0)
    assert served == ["urgent"]
    stuck.cancel()


async def test_lower_priority_arrival_never_jumps_a_waiting_head():
    queue, pool, served = KeyQueue(), Pool(5), []
    stuck = asyncio.create_task(draw(queue, pool, "stuck", 2, 10, served))
    await settle()
    with pytest.raises(QueueTimeout):
        await draw(queue, pool, "low", 1, 1, served, timeout=0)
    with pytest.raises(QueueTimeout):
        await draw(queue, pool, "same", 2, 1, served, timeout=0)
    assert served == [] and len(queue) == 1
    stuck.cancel()


async def test_timeout_removes_exactly_that_waiter():
    queue, pool, served = KeyQueue(), Pool(), []
    first = asyncio.create_task(draw(queue, pool, "first", 1, 1, served))
    hasty = asyncio.create_task(draw(queue, pool, "hasty", 1, 1, served, timeout=0.02))
    last = asyncio.create_task(draw(queue, pool, "last", 1, 1, served))
    await settle()
    with pytest.raises(QueueTimeout, match="within 0.02 s at priority 1; 2 requests still wait") as timed_out:
        await hasty
    assert isinstance(timed_out.value, asyncio.TimeoutError)
    assert len(queue) == 2
    pool.units = 2
    queue.notify()
    await asyncio.gather(first, last)
    assert served == ["first", "last"] and pool.units == 0


async def test_head_timing_out_lets_the_next_waiter_in_at_once():
    queue, pool, served = KeyQueue(), Pool(1), []
    head = asyncio.create_task(draw(queue, pool, "head", 3, 10, served, timeout=0.02))
    await settle()
    nxt = asyncio.create_task(draw(queue, pool, "next", 1, 1, served))
    with pytest.raises(QueueTimeout):
        await head
    await asyncio.wait_for(nxt, 1)  # no notify needed: the head leaving re-checks the queue
    assert served == ["next"]


async def test_cancelled_waiter_leaves_and_the_rest_keep_their_order():
    queue, pool, served = KeyQueue(), Pool(), []
    tasks = {name: asyncio.create_task(draw(queue, pool, name, 1, 1, served)) for name in "abcd"}
    await settle()
    tasks["b"].cancel()
    await settle()
    assert len(queue) == 3
    pool.units = 3
    queue.notify()
    await asyncio.gather(tasks["a"], tasks["c"], tasks["d"])
    assert served == ["a", "c", "d"]
    assert tasks["b"].cancelled()


async def test_cancelled_after_its_turn_came_passes_the_turn_on():
    queue, pool, served = KeyQueue(), Pool(), []
    first = asyncio.create_task(draw(queue, pool, "first", 1, 1, served))
    second = asyncio.create_task(draw(queue, pool, "second", 1, 1, served))
    await settle()
    pool.units = 1
    queue.notify()  # grants the turn to first, which has not run yet
    first.cancel()
    await asyncio.wait_for(second, 1)
    assert served == ["second"] and first.cancelled()


async def test_notify_asks_only_the_head():
    queue, pool, served = KeyQueue(), Pool(), []
    tasks = [asyncio.create_task(draw(queue, pool, name, 1, 2, served)) for name in ("head", "x", "y")]
    await settle()
    pool.checks.clear()
    pool.units = 1
    queue.notify()
    queue.notify()
    assert pool.checks == ["head", "head"]
    for task in tasks:
        task.cancel()


async def test_nobody_else_is_served_while_the_turn_is_held():
    queue, pool = KeyQueue(), Pool(10)
    turn = await queue.acquire(1, pool.fits(1), timeout=0)
    served = []
    waiting = asyncio.create_task(draw(queue, pool, "next", 1, 1, served))
    await settle()
    queue.notify()
    await settle()
    assert served == []
    turn.release()
    turn.release()  # harmless
    await asyncio.wait_for(waiting, 1)
    assert served == ["next"]


async def test_material_taken_behind_the_queues_back_keeps_the_waiter_at_the_front():
    queue, pool, served = KeyQueue(), Pool(), []
    first = asyncio.create_task(draw(queue, pool, "first", 1, 1, served))
    second = asyncio.create_task(draw(queue, pool, "second", 1, 1, served))
    await settle()
    pool.units = 1
    queue.notify()  # grants first
    pool.units = 0  # someone outside the queue took it before first could run
    await settle()
    assert served == [] and len(queue) == 2
    pool.units = 2
    queue.notify()
    await asyncio.gather(first, second)
    assert served == ["first", "second"]


async def test_a_failing_predicate_hurts_only_its_owner():
    queue, pool, served = KeyQueue(), Pool(), []

    def broken() -> bool:
        raise RuntimeError("pool is gone")

    async def draw_broken():
        with await queue.acquire(5, broken, 5.0):
            served.append("broken")

    bad = asyncio.create_task(draw_broken())
    await settle()
    good = asyncio.create_task(draw(queue, pool, "good", 1, 1, served))
    await settle()
    pool.units = 1
    queue.notify()  # does not raise here, at the material's producer
    with pytest.raises(RuntimeError, match="pool is gone"):
        await bad
    await asyncio.wait_for(good, 1)
    assert served == ["good"]


async def test_hundreds_of_waiters_with_many_departures_stay_ordered_and_cheap():
    queue, pool, served = KeyQueue(), Pool(), []
    tasks = [asyncio.create_task(draw(queue, pool, i, i % 4, 1, served)) for i in range(600)]
    await settle()
    remaining = list(range(0, 600, 3))
    for i in range(600):
        if i % 3:
            tasks[i].cancel()
    await settle()
    assert len(queue) == len(remaining)
    pool.checks.clear()
    pool.units = len(remaining)
    queue.notify()
    await asyncio.gather(*(tasks[i] for i in remaining))
    assert served == sorted(remaining, key=lambda i: (-(i % 4), i))
    assert len(pool.checks) <= 2 * len(remaining)  # each grant asks one head, plus its own re-check


@pytest.mark.parametrize("timeout", [-1, float("inf"), float("nan")])
async def test_every_wait_is_bounded(timeout):
    with pytest.raises(ValueError, match="finite timeout"):
        await KeyQueue().acquire(1, lambda: True, timeout)


async def test_head_cancelled_and_notify_in_the_same_step_serves_the_next():
    queue, pool, served = KeyQueue(), Pool(), []
    head = asyncio.create_task(draw(queue, pool, "head", 1, 1, served))
    nxt = asyncio.create_task(draw(queue, pool, "next", 1, 1, served))
    await settle()
    head.cancel()  # its task has not run yet to leave the queue
    pool.units = 1
    queue.notify()
    await asyncio.wait_for(nxt, 1)
    assert served == ["next"] and head.cancelled() and len(queue) == 0
