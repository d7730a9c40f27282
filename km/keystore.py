"""Keys a KM holds for its slave SAEs until they fetch them with ``dec_keys``.

A key enters the store when the master's KM delivered it here and leaves it exactly once:
taken by one of the slave SAEs named at issue time, or dropped when its time to live ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


class KeysNotFound(Exception):
    """At least one key ID is unknown here, already taken, or was issued by another master."""


class NotASlave(Exception):
    """The caller was not among the slave SAEs named when the key was issued."""


class StoreFull(Exception):
    """Accepting the keys would exceed the store's bound."""


@dataclass(slots=True)
class StoredKey:
    key: bytes
    master: str
    slaves: frozenset[str]
    expires: float
    extension: dict | None = None


class KeyStore:
    def __init__(self, ttl_s: float, max_bits: int, clock: Callable[[], float] = time.monotonic):
        self._ttl = ttl_s
        self._max_bits = max_bits
        self._clock = clock
        # Insertion order is expiry order (one TTL for all), so expiry pops from the front.
        self._keys: dict[str, StoredKey] = {}
        self._bits = 0

    @property
    def bits(self) -> int:
        return self._bits

    def __len__(self) -> int:
        return len(self._keys)

    def expire(self) -> int:
        """Drop keys past their time to live; returns how many."""
        now = self._clock()
        dropped = 0
        while self._keys:
            key_id, entry = next(iter(self._keys.items()))
            if entry.expires > now:
                break
            del self._keys[key_id]
            self._bits -= len(entry.key) * 8
            dropped += 1
        return dropped

    def put(self, master: str, slaves: frozenset[str], keys: list[tuple[str, bytes]],
            extension: dict | None = None) -> None:
        self.expire()
        incoming = sum(len(k) for _, k in keys) * 8
        if self._bits + incoming > self._max_bits:
            raise StoreFull(
                f"{incoming} bits would exceed the bound of {self._max_bits} bits for keys "
                f"waiting for slave SAEs ({self._bits} held)"
            )
        duplicates = [key_id for key_id, _ in keys if key_id in self._keys]
        if duplicates:
            raise KeysNotFound(f"key IDs already in use: {duplicates[:3]}")
        expires = self._clock() + self._ttl
        for key_id, key in keys:
            self._keys[key_id] = StoredKey(key, master, slaves, expires, extension)
        self._bits += incoming

    def take(self, caller: str, master: str, key_ids: list[str]) -> list[tuple[str, StoredKey]]:
        """Remove and return the keys, all or none."""
        self.expire()
        if len(set(key_ids)) != len(key_ids):
            raise KeysNotFound("the same key ID is named more than once")
        found = []
        for key_id in key_ids:
            entry = self._keys.get(key_id)
            if entry is None or entry.master != master:
                raise KeysNotFound(key_id)
            found.append((key_id, entry))
        if any(caller not in entry.slaves for _, entry in found):
            raise NotASlave(caller)
        for key_id, entry in found:
            del self._keys[key_id]
            self._bits -= len(entry.key) * 8
        return found
