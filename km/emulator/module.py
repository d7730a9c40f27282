"""The emulated QKD module pair of one link: a shared key budget and two ETSI 014 ends.

Both ends draw from one budget of produced key, as the two devices of a real link hold
the same distilled key. An end that takes keys with ``enc_keys`` (its KM acting as the
master) leaves an identical copy pending at the other end until that end's KM collects it
with ``dec_keys`` or the copy expires. Like a real device pair, the copy may reach the other
end only after a synchronisation lag; asked for earlier, that end answers "not found".
Production is computed lazily from the clock on every call, so an idle link costs nothing.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from vqkd.km.emulator import physics
from vqkd.km.etsi014.schema import MSG_KEYS_NOT_FOUND, MSG_SIZE_MULTIPLE_OF_8

ENDS = ("a", "b")
OTHER_END = {"a": "b", "b": "a"}
DEFAULT_PENDING_TTL_S = 60.0


class ModuleError(Exception):
    """A request the module refuses; ``message`` is what the caller is told."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ModuleError):
    """The request itself is wrong; repeating it will not help (HTTP 400)."""


class KeysNotFound(BadRequest):
    """A key ID is not pending at this end: unknown, already taken, expired, issued here, or
    not synchronised from the other end yet."""

    def __init__(self) -> None:
        super().__init__(MSG_KEYS_NOT_FOUND)


class NotEnoughKey(ModuleError):
    """The link has produced too little key for the request right now (HTTP 503)."""


class InvalidControl(ValueError):
    """A runtime setting of the twin is out of range."""


@dataclass(frozen=True)
class RequestLimits:
    """What one key request may ask for; announced in the ETSI 014 status."""

    key_size: int = 256
    max_key_size: int = 65536
    max_key_per_request: int = 4096
    # Keys are handed out as whole bytes, so one byte is the smallest key.
    min_key_size: int = 8

    def check(self, number: int, size: int) -> None:
        if not 1 <= number <= self.max_key_per_request:
            raise BadRequest(
                f"number must be between 1 and max_key_per_request={self.max_key_per_request}, got {number}"
            )
        if size % 8:
            raise BadRequest(MSG_SIZE_MULTIPLE_OF_8)
        if not self.min_key_size <= size <= self.max_key_size:
            raise BadRequest(
                f"size must be between min_key_size={self.min_key_size} and "
                f"max_key_size={self.max_key_size} bits, got {size}"
            )


@dataclass(frozen=True)
class LinkSnapshot:
    """The link at one instant, as the admin API and the metrics report it."""

    key_rate_bps: float
    qber: float
    outage: bool
    secret_key_rate_bps: float
    buffer_bits: int
    buffer_capacity_bits: int
    pending_bits: Mapping[str, int]
    generated_bits_total: float
    delivered_bits_total: Mapping[str, int]
    expired_bits_total: Mapping[str, int]


def _check_control(key_rate_bps: float, qber: float) -> None:
    if not (math.isfinite(key_rate_bps) and key_rate_bps >= 0):
        raise InvalidControl(f"key_rate_bps must be a finite number of bit/s >= 0, got {key_rate_bps!r}")
    if not 0.0 <= qber <= 0.5:
        raise InvalidControl(f"qber must be between 0 and 0.5, got {qber!r}")


_UUID_VARIANT = "89ab"


def _uuid4_strings(n: int) -> list[str]:
    """``n`` random RFC 4122 version-4 UUIDs; one urandom call instead of ``n`` UUID objects."""
    h = os.urandom(16 * n).hex()
    return [
        f"{h[i:i + 8]}-{h[i + 8:i + 12]}-4{h[i + 13:i + 16]}-"
        f"{_UUID_VARIANT[int(h[i + 16], 16) & 3]}{h[i + 17:i + 20]}-{h[i + 20:i + 32]}"
        for i in range(0, 32 * n, 32)
    ]


class EmulatedLink:
    """Key production and delivery of one emulated link; ends are named ``"a"`` and ``"b"``.

    ``sae_ids`` maps each end to the SAE ID its KM uses: the KM at end a names
    ``sae_ids["b"]`` as slave in ``enc_keys`` and the KM at end b names ``sae_ids["a"]`` as
    master in ``dec_keys``, and the other way round. Keys taken but not yet collected by
    the other end stay within ``buffer_bits``.
    """

    def __init__(
        self,
        name: str,
        sae_ids: Mapping[str, str],
        *,
        key_rate_bps: float,
        qber: float,
        buffer_bits: int,
        limits: RequestLimits = RequestLimits(),
        pending_ttl_s: float = DEFAULT_PENDING_TTL_S,
        sync_lag_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if set(sae_ids) != set(ENDS):
            raise ValueError(f"link {name}: sae_ids must name ends 'a' and 'b', got {sorted(sae_ids)}")
        if sae_ids["a"] == sae_ids["b"]:
            raise ValueError(f"link {name}: both ends have SAE ID {sae_ids['a']!r}; they must differ")
        if buffer_bits <= 0 or pending_ttl_s <= 0 or not 0 <= sync_lag_s < pending_ttl_s:
            raise ValueError(
                f"link {name}: need buffer_bits > 0, pending_ttl_s > 0 and 0 <= sync_lag_s < pending_ttl_s, got "
                f"{buffer_bits}, {pending_ttl_s} and {sync_lag_s}"
            )
        _check_control(key_rate_bps, qber)
        self.name = name
        self.sae_ids = dict(sae_ids)
        self.limits = limits
        self.buffer_capacity_bits = buffer_bits
        self.pending_ttl_s = pending_ttl_s
        self.sync_lag_s = sync_lag_s
        self._clock = clock
        self._rate = float(key_rate_bps)
        self._qber = float(qber)
        self._outage = False
        self._skr = physics.secret_key_rate(self._rate, self._qber)
        # Production is continuous; only whole bits are ever drawn.
        self._produced = 0.0
        self._generated = 0.0
        self._last = clock()
        # Per end: key ID -> (expiry, synchronised at, key) waiting for that end's dec_keys.
        # Every key gets the same TTL, so insertion order is expiry order and the oldest
        # entry is first.
        self._pending: dict[str, OrderedDict[str, tuple[float, float, bytes]]] = {e: OrderedDict() for e in ENDS}
        self._pending_bits = {e: 0 for e in ENDS}
        self._delivered = {e: 0 for e in ENDS}
        self._expired = {e: 0 for e in ENDS}

    # -- production ----------------------------------------------------------------------

    def _accrue(self, until: float) -> None:
        dt = until - self._last
        if dt <= 0:
            return
        self._last = until
        if self._skr == 0.0:
            return
        room = self.buffer_capacity_bits - self._pending_bits["a"] - self._pending_bits["b"] - self._produced
        if room > 0:
            added = min(self._skr * dt, room)
            self._produced += added
            self._generated += added

    def _refresh(self) -> float:
        """Bring production and expiry up to now, in time order, and return now.

        Expired keys free buffer space only from their expiry on, so production is
        accrued up to each expiry before the expired key is dropped.
        """
        now = self._clock()
        while True:
            earliest, end = now, None
            for e in ENDS:
                store = self._pending[e]
                if store:
                    expiry = next(iter(store.values()))[0]
                    if expiry <= earliest:
                        earliest, end = expiry, e
            if end is None:
                break
            self._accrue(earliest)
            _, (_, _, key) = self._pending[end].popitem(last=False)
            self._pending_bits[end] -= len(key) * 8
            self._expired[end] += len(key) * 8
        self._accrue(now)
        return now

    # -- runtime control -----------------------------------------------------------------

    def control(
        self, *, key_rate_bps: float | None = None, qber: float | None = None, outage: bool | None = None
    ) -> None:
        """Change the link's conditions from now on; all given values are checked before any applies."""
        rate = self._rate if key_rate_bps is None else float(key_rate_bps)
        new_qber = self._qber if qber is None else float(qber)
        _check_control(rate, new_qber)
        # Key produced so far was produced under the old conditions.
        self._refresh()
        self._rate, self._qber = rate, new_qber
        if outage is not None:
            self._outage = bool(outage)
        self._skr = 0.0 if self._outage else physics.secret_key_rate(rate, new_qber)

    def snapshot(self) -> LinkSnapshot:
        self._refresh()
        return LinkSnapshot(
            key_rate_bps=self._rate,
            qber=self._qber,
            outage=self._outage,
            secret_key_rate_bps=self._skr,
            buffer_bits=int(self._produced),
            buffer_capacity_bits=self.buffer_capacity_bits,
            pending_bits=dict(self._pending_bits),
            generated_bits_total=self._generated,
            delivered_bits_total=dict(self._delivered),
            expired_bits_total=dict(self._expired),
        )

    # -- ETSI 014 ------------------------------------------------------------------------

    def expect_peer(self, end: str, sae_id: str, role: str) -> None:
        """Refuse a request from ``end`` that names anyone but the other end's SAE as ``role``."""
        expected = self.sae_ids[OTHER_END[end]]
        if sae_id != expected:
            raise BadRequest(
                f"{role} SAE {sae_id!r} is not reachable from end {end} of link {self.name}: expected {expected!r}"
            )

    def enc_keys(self, end: str, slave_sae_id: str, number: int, size: int) -> list[tuple[str, bytes]]:
        """Take ``number`` keys of ``size`` bits for the KM at ``end``; all of them or none.

        The same keys reach the other end after the synchronisation lag and wait there for
        ``dec_keys`` until the pending TTL runs out.
        """
        self.expect_peer(end, slave_sae_id, "slave")
        self.limits.check(number, size)
        now = self._refresh()
        wanted = number * size
        if wanted > self._produced:
            raise NotEnoughKey(
                f"link {self.name} holds {int(self._produced)} bits of key, request needs {wanted} "
                f"({number} x {size}); the link produces {self._skr:.0f} bit/s, retry later or ask for less"
            )
        self._produced -= wanted
        width = size // 8
        material = os.urandom(wanted // 8)
        keys = [(key_id, material[i * width:(i + 1) * width]) for i, key_id in enumerate(_uuid4_strings(number))]
        other = OTHER_END[end]
        store = self._pending[other]
        expiry, synchronised = now + self.pending_ttl_s, now + self.sync_lag_s
        for key_id, key in keys:
            store[key_id] = (expiry, synchronised, key)
        self._pending_bits[other] += wanted
        self._delivered[end] += wanted
        return keys

    def dec_keys(self, end: str, master_sae_id: str, key_ids: Sequence[str]) -> list[tuple[str, bytes]]:
        """Hand the KM at ``end`` the keys its peer took with ``enc_keys``; all of them or none.

        A key is delivered once: afterwards it is gone from the module.
        """
        self.expect_peer(end, master_sae_id, "master")
        if not key_ids:
            raise BadRequest("key_IDs must name at least one key")
        if len(key_ids) > self.limits.max_key_per_request:
            raise BadRequest(
                f"key_IDs names {len(key_ids)} keys, at most max_key_per_request="
                f"{self.limits.max_key_per_request} per request"
            )
        if len(set(key_ids)) != len(key_ids):
            raise BadRequest("key_IDs names the same key more than once; name each key once")
        now = self._refresh()
        store = self._pending[end]
        if not all(key_id in store and store[key_id][1] <= now for key_id in key_ids):
            raise KeysNotFound()
        keys = [(key_id, store.pop(key_id)[2]) for key_id in key_ids]
        bits = 8 * sum(len(key) for _, key in keys)
        self._pending_bits[end] -= bits
        self._delivered[end] += bits
        return keys
