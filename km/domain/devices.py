"""What a KM knows of the two QKD device ends of a link, and what it makes of it.

A KM reads its own module end's ETSI 014 status and learns the peer's end from the peer KM.
From both it fits the size of the keys it draws (``fit_block_bits``: the largest size both
ends accept, within the link's configured bound) and, from how fast the slave end hands keys
over, how many keys one draw may take (``DrawSizer``). ``LinkHealth`` turns what the ends and
the peer KM answer into the link's state as this KM sees it, in the device's own words.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from vqkd.km.domain.vocabulary import LinkState

# Smaller blocks carry less key than their key ID and JSON cost to move and to track.
MIN_BLOCK_BITS = 64
# Failed calls in a row before a module end or the peer KM counts as down, so one refused
# request (devices refuse some under load) makes the link Degraded, not Down.
DOWN_AFTER_FAILURES = 3
# How long a device error or burned key keeps the link Degraded.
TROUBLE_WINDOW_S = 10.0
# Why drawn key was given up (``vqkd_km_burned_bits_total{reason}``): the slave end never
# handed it over, the device failed, or the peer KM was gone too long.
BURN_REASONS = ("not_synchronised", "device_error", "peer_unavailable")


@dataclass(frozen=True, slots=True)
class EndLimits:
    """What one module end accepts per request, from its ETSI 014 status (sizes in bits)."""

    key_size: int
    min_key_size: int
    max_key_size: int
    max_key_per_request: int


class LimitsMismatch(Exception):
    """No key size suits the link's bound and both ends; the message names the limit."""


def fit_block_bits(bound: int, ends: Mapping[str, EndLimits]) -> int:
    """The largest block (whole bytes, at most ``bound`` bits) that every end accepts.

    ``ends`` maps a description of each end (for messages, e.g. "node B's end") to its limits.
    """
    small = min(ends, key=lambda end: ends[end].max_key_size)
    large = max(ends, key=lambda end: ends[end].min_key_size)
    highest = min(bound, ends[small].max_key_size) // 8 * 8
    lowest = max(MIN_BLOCK_BITS, -(-ends[large].min_key_size // 8) * 8)
    if highest >= lowest:
        return highest
    if ends[small].max_key_size < MIN_BLOCK_BITS:
        raise LimitsMismatch(f"the QKD device at {small} hands out keys of at most {ends[small].max_key_size} bits "
                             f"(max_key_size); vqkd draws keys of at least {MIN_BLOCK_BITS} bits")
    if bound < lowest:
        raise LimitsMismatch(f"the QKD device at {large} hands out keys of at least {ends[large].min_key_size} bits "
                             f"(min_key_size), above the link's block size of {bound} bits; raise the block size")
    raise LimitsMismatch(f"the QKD device at {small} hands out keys of at most {ends[small].max_key_size} bits "
                         f"(max_key_size) and the one at {large} of at least {ends[large].min_key_size} bits "
                         "(min_key_size): no key size suits both ends")


class DrawSizer:
    """How many keys one draw may take so that the slave end hands them over within ``target_s``.

    Fed with the slave end's time per key: a slower end shrinks the draw at once; a faster one
    grows it at most twofold per measurement, so a fast end is probed rather than flooded.
    """

    def __init__(self, target_s: float, initial: int = 16, ceiling: int = 512):
        self.target_s = target_s
        self.ceiling = ceiling
        self.seconds_per_key: float | None = None
        self.limit = min(initial, ceiling)

    def observe(self, seconds_per_key: float) -> None:
        if seconds_per_key < 0:
            return
        previous = self.seconds_per_key
        if previous is None or seconds_per_key >= previous:
            self.seconds_per_key = seconds_per_key
        else:  # recover gradually: one fast answer may be luck
            self.seconds_per_key = 0.7 * previous + 0.3 * seconds_per_key
        fitting = int(self.target_s / self.seconds_per_key) if self.seconds_per_key > 0 else self.ceiling
        self.limit = max(1, min(fitting, 2 * self.limit, self.ceiling))


@dataclass(frozen=True, slots=True)
class HealthVerdict:
    state: LinkState
    reason: str  # CamelCase, as conditions name reasons
    message: str


class LinkHealth:
    """The link's state as this KM sees it, from what each *source* of trouble last did.

    Sources are "device" (this KM's module end), "peer" (the peer KM), "peer-device" (the
    peer's module end, as the peer reports it), "limits" (whether a key size suits both ends)
    and "burn" (keys given up). The link is Down while a source is *blocking*: a call to it
    failed ``DOWN_AFTER_FAILURES`` times in a row, or a condition holds (unfit limits, the
    peer's end down). It is Degraded for ``TROUBLE_WINDOW_S`` after any failed call or burned
    key, and Up otherwise.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._in_row: dict[str, int] = {}
        self._blocking: dict[str, tuple[str, str]] = {
            "device": ("Connecting", "this KM has not reached its QKD module end yet")}
        self._troubles: deque[tuple[float, str, str, str]] = deque(maxlen=64)
        self._reached: set[str] = set()  # sources that answered at least once

    def failed(self, source: str, reason: str, message: str) -> None:
        """A call to ``source`` failed with ``message``.

        Until a source first answers, its failures are the link coming up (two KMs started
        together refuse each other's first calls): they can make it Down, but leave no
        Degraded trail once it answers.
        """
        self._in_row[source] = self._in_row.get(source, 0) + 1
        if self._in_row[source] >= DOWN_AFTER_FAILURES:
            self._blocking[source] = (reason, message)
        if source in self._reached:
            self.trouble(reason, message, source)

    def succeeded(self, source: str) -> None:
        self._in_row[source] = 0
        self._blocking.pop(source, None)
        self._reached.add(source)

    def block(self, source: str, reason: str, message: str) -> None:
        self._blocking[source] = (reason, message)

    def unblock(self, source: str) -> None:
        self._blocking.pop(source, None)

    def blocking(self, source: str) -> bool:
        return source in self._blocking

    def trouble(self, reason: str, message: str, source: str = "burn") -> None:
        self._troubles.append((self._clock(), source, reason, message))

    def verdict(self, sources: Collection[str] | None = None) -> HealthVerdict:
        """The state from all sources, or from ``sources`` only."""
        def counts(source: str) -> bool:
            return sources is None or source in sources

        blocking = [cause for source, cause in self._blocking.items() if counts(source)]
        if blocking:
            reason, message = blocking[0]
            return HealthVerdict(LinkState.DOWN, reason, message)
        since = self._clock() - TROUBLE_WINDOW_S
        while self._troubles and self._troubles[0][0] < since:
            self._troubles.popleft()
        troubles = [(reason, message) for _, source, reason, message in self._troubles if counts(source)]
        if troubles:
            reason, message = troubles[-1]
            n = len(troubles)
            return HealthVerdict(LinkState.DEGRADED, reason,
                                 f"{message} ({n} problem{'s' if n > 1 else ''} in the last {TROUBLE_WINDOW_S:.0f} s)")
        return HealthVerdict(LinkState.UP, "Healthy", "both QKD module ends and the peer KM answer")


@dataclass
class LinkDevices:
    """The module ends of one link as this KM knows them; written by the module feed."""

    own: EndLimits | None = None
    peer: EndLimits | None = None
    block_bits: int | None = None
    # This end's time per key answering dec_keys, as measured here and reported to the peer.
    seconds_per_key: float | None = None
    awaiting_peer_bits: int = 0  # drawn as master, not yet held by the peer
    health: LinkHealth = field(default_factory=LinkHealth)
