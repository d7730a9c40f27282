"""Token bucket: a session never draws more than its burst plus its rate over time."""

import math
import random

import pytest

from vqkd.km.domain.errors import InvalidRequest, Unavailable
from vqkd.km.domain.tokenbucket import BurstExceeded, RateLimited, TokenBucket


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def bucket(rate=8000.0, size=16384, **kwargs):
    clock = FakeClock()
    return TokenBucket(rate, size, clock, **kwargs), clock


def test_starts_full_and_takes_all_or_nothing():
    tb, _ = bucket()
    assert tb.available_bits == 16384
    assert tb.try_take(10000)
    assert not tb.try_take(7000)  # only 6384 left: nothing is taken
    assert tb.available_bits == 6384
    assert tb.try_take(6384)
    assert tb.available_bits == 0


def test_refills_at_the_rate_up_to_the_size():
    tb, clock = bucket()
    assert tb.try_take(16384)
    clock.advance(0.5)
    assert tb.available_bits == 4000
    clock.advance(60)
    assert tb.available_bits == 16384


def test_wait_time_says_when_a_request_fits():
    tb, clock = bucket()
    tb.take(16384)
    assert tb.wait_time(0) == 0
    assert tb.wait_time(4000) == pytest.approx(0.5)
    clock.advance(0.25)
    assert tb.wait_time(4000) == pytest.approx(0.25)
    clock.advance(0.25)
    assert tb.wait_time(4000) == 0 and tb.try_take(4000)
    assert tb.wait_time(16385) == math.inf


def test_zero_rate_never_refills():
    tb, clock = bucket(rate=0, size=1024)
    tb.take(1024)
    clock.advance(1e6)
    assert tb.wait_time(1) == math.inf
    with pytest.raises(RateLimited, match="the rate is 0"):
        tb.take(1)


def test_refusal_explains_the_numbers_and_what_to_do():
    tb, _ = bucket(subject="session 1234")
    tb.take(16384 - 1024)
    with pytest.raises(RateLimited) as refused:
        tb.take(4096)
    assert str(refused.value) == (
        "session 1234: token bucket allows 1024 bits now (rate 8000 bit/s, burst 16384 bits); "
        "request of 4096 bits refused; retry in 0.384 s"
    )
    assert refused.value.retry_after_s == pytest.approx(0.384)
    assert (refused.value.requested_bits, refused.value.available_bits) == (4096, 1024)
    assert isinstance(refused.value, Unavailable)  # ETSI 014: 503, retry later
    assert tb.available_bits == 1024  # the refusal took nothing


def test_request_larger_than_the_burst_is_the_callers_mistake():
    tb, _ = bucket(subject="session 1234")
    with pytest.raises(BurstExceeded, match="ask for at most 16384 bits at once") as refused:
        tb.take(20000)
    assert isinstance(refused.value, InvalidRequest)  # ETSI 014: 400, retrying cannot help
    assert refused.value.retry_after_s == math.inf


def test_reconfigure_keeps_the_fill_clamped_and_uses_the_old_rate_until_now():
    tb, clock = bucket()
    tb.take(16384)
    clock.advance(1.0)  # 8000 bits earned at the old rate
    tb.reconfigure(100.0, 4096)
    assert tb.available_bits == 4096  # clamped to the new size
    tb.take(4096)
    clock.advance(1.0)
    assert tb.available_bits == 100
    tb.reconfigure(1000.0, 65536)  # a bigger bucket is not filled by the change
    assert tb.available_bits == 100
    assert (tb.rate_bps, tb.size_bits) == (1000.0, 65536)


def test_clock_going_backwards_grants_nothing():
    tb, clock = bucket()
    tb.take(16384)
    clock.advance(-5)
    assert tb.available_bits == 0
    clock.advance(5.5)  # back to half a second after the take
    assert tb.available_bits == 4000


@pytest.mark.parametrize("rate, size", [(-1, 10), (math.nan, 10), (math.inf, 10), (10, -1), (10, 1.5)])
def test_invalid_configuration_is_rejected(rate, size):
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(rate, size)


@pytest.mark.parametrize("bits", [-1, 1.5, True])
def test_invalid_request_is_rejected(bits):
    tb, _ = bucket()
    with pytest.raises(ValueError, match="whole number of bits"):
        tb.try_take(bits)


@pytest.mark.parametrize("seed", range(5))
def test_long_run_rate_never_exceeds_rate_plus_burst(seed):
    rng = random.Random(seed)
    rate, size = 8000.0, 16384
    tb, clock = bucket(rate, size)
    start = clock.now
    taken = 0
    for _ in range(5000):
        clock.advance(rng.choice([0.0, rng.random() * 0.01, rng.random() * 0.5]))
        bits = rng.choice([1, 128, 256, 1024, 4096, rng.randrange(1, size + 1)])
        if tb.try_take(bits):
            taken += bits
        if rng.random() < 0.01:
            tb.reconfigure(rate, size)  # a re-pushed, unchanged configuration grants nothing
        assert taken <= size + rate * (clock.now - start)
    # A greedy client gets close to the bound, so the limit is not met by refusing too much.
    assert taken >= rate * (clock.now - start) * 0.9


def test_long_waits_are_written_plainly():
    tb, _ = bucket(rate=1.0, size=20000)
    tb.take(20000)
    with pytest.raises(RateLimited, match=r"retry in 12345 s$"):
        tb.take(12345)
