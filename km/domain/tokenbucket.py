"""Token bucket: the rate a session may draw key at (paper §3.2: rate and size per session).

A session's bucket holds up to ``size_bits`` of credit and refills at ``rate_bps``. A key
request spends credit equal to the bits it asks for, all or nothing, so over any interval of
``T`` seconds a session gets at most ``size_bits + rate_bps * T`` bits: the burst it saved
up plus what accrued meanwhile. The bucket starts full, so a fresh session can draw its
first burst at once.

The bucket only counts; it never sleeps. ``wait_time`` tells a caller with a deadline
whether waiting can help, and a refusal carries a message the user can act on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from vqkd.km.domain.errors import InvalidRequest, KMError, Unavailable


class TokenBucketRefusal(KMError):
    """The bucket refused a request; nothing was taken. The message says why and what to do."""

    def __init__(self, message: str, *, requested_bits: int, available_bits: int,
                 rate_bps: float, size_bits: int, retry_after_s: float):
        super().__init__(message)
        self.requested_bits = requested_bits
        self.available_bits = available_bits
        self.rate_bps = rate_bps
        self.size_bits = size_bits
        self.retry_after_s = retry_after_s


class RateLimited(TokenBucketRefusal, Unavailable):
    """Not enough credit now; retrying after ``retry_after_s`` seconds will succeed."""


class BurstExceeded(TokenBucketRefusal, InvalidRequest):
    """The request is larger than the bucket can ever hold; only a smaller request can succeed."""


def _check_parameters(rate_bps: float, size_bits: int) -> None:
    if not (math.isfinite(rate_bps) and rate_bps >= 0):
        raise ValueError(f"token bucket rate must be a finite number of bit/s >= 0, got {rate_bps!r}")
    if isinstance(size_bits, bool) or not isinstance(size_bits, int) or size_bits < 0:
        raise ValueError(f"token bucket size must be a whole number of bits >= 0, got {size_bits!r}")


def _check_request(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0:
        raise ValueError(f"a request must be a whole number of bits >= 0, got {bits!r}")


def _seconds(value: float) -> str:
    """Three significant digits, without the exponent notation that ``:g`` picks for long waits."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


class TokenBucket:
    """Credit for one session; ``subject`` (e.g. ``"session 1234"``) prefixes refusal messages.

    Not thread-safe: one event loop owns it, like the rest of the KM's session state.
    """

    def __init__(self, rate_bps: float, size_bits: int,
                 clock: Callable[[], float] = time.monotonic, *, subject: str = ""):
        _check_parameters(rate_bps, size_bits)
        self._rate = float(rate_bps)
        self._size = size_bits
        self._clock = clock
        self._subject = subject
        self._tokens = float(size_bits)
        self._updated = clock()

    @property
    def rate_bps(self) -> float:
        return self._rate

    @property
    def size_bits(self) -> int:
        return self._size

    @property
    def available_bits(self) -> int:
        """Whole bits a request could take right now."""
        self._refill()
        return math.floor(self._tokens)

    def try_take(self, bits: int) -> bool:
        """Spend ``bits`` of credit if the bucket holds that much; otherwise spend nothing."""
        _check_request(bits)
        self._refill()
        if bits > self._tokens:
            return False
        self._tokens -= bits
        return True

    def take(self, bits: int) -> None:
        """Like ``try_take`` but a refusal raises ``RateLimited`` or ``BurstExceeded``."""
        if not self.try_take(bits):
            raise self.refusal(bits)

    def wait_time(self, bits: int) -> float:
        """Seconds until ``bits`` could be taken (0 if now); ``inf`` if never at this configuration."""
        _check_request(bits)
        self._refill()
        if bits <= self._tokens:
            return 0.0
        if bits > self._size or self._rate == 0:
            return math.inf
        return (bits - self._tokens) / self._rate

    def refusal(self, bits: int) -> TokenBucketRefusal:
        """The exception explaining why a request of ``bits`` cannot be served now."""
        wait = self.wait_time(bits)
        available = math.floor(self._tokens)
        prefix = f"{self._subject}: " if self._subject else ""
        state = (f"{prefix}token bucket allows {available} bits now "
                 f"(rate {self._rate:g} bit/s, burst {self._size} bits); request of {bits} bits refused")
        details = dict(requested_bits=bits, available_bits=available, rate_bps=self._rate,
                       size_bits=self._size, retry_after_s=wait)
        if bits > self._size:
            return BurstExceeded(f"{state}: it exceeds the burst; ask for at most {self._size} bits at once",
                                 **details)
        if math.isinf(wait):
            return RateLimited(f"{state}: the rate is 0, so credit never returns; ask the operator "
                               f"for a session with a key rate", **details)
        return RateLimited(f"{state}; retry in {_seconds(wait)} s", **details)

    def reconfigure(self, rate_bps: float, size_bits: int) -> None:
        """Apply a new rate and size; credit earned so far is kept, clamped to the new size.

        Credit accrued before the change is counted at the old rate, so a reconfiguration
        never grants credit retroactively.
        """
        _check_parameters(rate_bps, size_bits)
        self._refill()
        self._rate = float(rate_bps)
        self._size = size_bits
        self._tokens = min(self._tokens, float(size_bits))

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(float(self._size), self._tokens + elapsed * self._rate)
            self._updated = now
