"""Keys a KM holds for its slave SAEs until they fetch them with ``dec_keys``.

A key enters the store when the master's KM delivered it here and leaves it exactly once:
taken by one of the slave SAEs named at issue time, or dropped when its time to live ends.
A node's KM replicas keep a second store each, of copies of keys a sibling holds
(``replicas.NodeReplicas``); a delivery's ``holder`` says where its other half is.
"""

from __future__ import annotations

import time
from collections import Counter
from itertools import repeat
from typing import Callable, NamedTuple

from vqkd.km.domain.errors import KeysNotFound


class NotASlave(Exception):
    """The caller was not among the slave SAEs named when the key was issued."""


class StoreFull(Exception):
    """Accepting the keys would exceed the store's bound."""


class StoredKey(NamedTuple):
    """A key as ``take`` hands it out."""
    key: bytes
    master: str
    slaves: frozenset[str]
    expires: float
    extension: dict | None = None
    holder: object = None  # the delivery's: who holds the copy (or, in a store of copies, the primary)


def _stored_keys(keys: list[bytes], master: str, slaves: frozenset[str], expires: float,
                 extension: dict | None, holder: object):
    """A StoredKey per key, all built in C: one per key in Python code would cost ``take``
    more than all of its dictionary work."""
    return map(tuple.__new__, repeat(StoredKey), zip(keys, repeat(master), repeat(slaves), repeat(expires),
                                                     repeat(extension), repeat(holder)))


# What the keys of one delivery share, held once for all of them: [master, slaves, expires,
# extension, holder, keys still held, key IDs]. Indices into that list:
_MASTER, _SLAVES, _EXPIRES, _EXTENSION, _HOLDER, _LEFT, _IDS = range(7)


class KeyStore:
    """Per key, the store holds two dictionary entries, ``key ID -> key`` and ``key ID ->
    delivery number``, and no object of its own: bytes, strings and ints are not tracked by
    the cyclic garbage collector, and neither are dictionaries holding only them, so a store
    of millions of keys adds nothing to the collector's passes. What the keys of one delivery
    share is kept once per delivery."""

    def __init__(self, ttl_s: float, max_bits: int, clock: Callable[[], float] = time.monotonic):
        self._ttl = ttl_s
        self._max_bits = max_bits
        self._clock = clock
        self._keys: dict[str, bytes] = {}
        self._delivery_of: dict[str, int] = {}
        # Deliveries that still hold keys, by number. Numbers grow with insertion and nearly all
        # share one TTL, so the lowest number expires first: expiry looks at `_oldest` only. A
        # delivery put with less time left (keys held again, see ``put``) may wait behind a
        # younger one to be dropped, but is not handed out past its time.
        self._deliveries: dict[int, list] = {}
        self._next = 0
        self._oldest = 0
        self._bits = 0

    @property
    def ttl_s(self) -> float:
        return self._ttl

    @property
    def bits(self) -> int:
        return self._bits

    def __len__(self) -> int:
        return len(self._keys)

    def expire(self) -> int:
        """Drop keys past their time to live; returns how many."""
        deliveries, keys, delivery_of = self._deliveries, self._keys, self._delivery_of
        oldest, newest = self._oldest, self._next
        now = self._clock()
        dropped = 0
        while oldest < newest:
            delivery = deliveries.get(oldest)
            if delivery is not None:
                if delivery[_EXPIRES] > now:
                    break
                del deliveries[oldest]
                for key_id in delivery[_IDS]:
                    if delivery_of.get(key_id) == oldest:  # not taken (nor taken and named again)
                        del delivery_of[key_id]
                        self._bits -= len(keys.pop(key_id)) * 8
                        dropped += 1
            oldest += 1
        self._oldest = oldest
        return dropped

    def put(self, master: str, slaves: frozenset[str], keys: list[tuple[str, bytes]],
            extension: dict | None = None, *, ttl_s: float | None = None, holder: object = None) -> None:
        """Hold keys for their slaves; ``ttl_s`` (at most the store's) for keys that were
        held elsewhere before and bring what is left of their time."""
        self.expire()
        key_ids = [key_id for key_id, _ in keys]
        material = [key for _, key in keys]
        incoming = sum(map(len, material)) * 8
        if self._bits + incoming > self._max_bits:
            raise StoreFull(
                f"{incoming} bits would exceed the bound of {self._max_bits} bits for keys "
                f"waiting for slave SAEs ({self._bits} held)"
            )
        store = self._keys
        if not store.keys().isdisjoint(key_ids):
            duplicates = [key_id for key_id in key_ids if key_id in store]
            raise KeysNotFound(f"key IDs already in use: {duplicates[:3]}")
        if not key_ids:
            return
        held = len(store)
        store.update(zip(key_ids, material))
        if len(store) != held + len(key_ids):  # an ID named twice in this delivery
            for key_id in key_ids:
                store.pop(key_id, None)
            raise KeysNotFound("the same key ID is named more than once")
        number = self._next
        self._next = number + 1
        self._delivery_of.update(zip(key_ids, repeat(number)))
        ttl = self._ttl if ttl_s is None else min(ttl_s, self._ttl)
        self._deliveries[number] = [master, slaves, self._clock() + ttl, extension, holder, len(key_ids),
                                    tuple(key_ids)]  # a tuple of strings: not tracked by the collector
        self._bits += incoming

    def take(self, caller: str, master: str, key_ids: list[str]) -> list[tuple[str, StoredKey]]:
        """Remove and return the keys, all or none."""
        self.expire()
        if len(set(key_ids)) != len(key_ids):
            raise KeysNotFound("the same key ID is named more than once")
        delivery_of, deliveries = self._delivery_of, self._deliveries
        found = [delivery_of.get(key_id) for key_id in key_ids]
        numbers = set(found)
        if None in numbers or any(deliveries[number][_MASTER] != master for number in numbers):
            raise KeysNotFound(next(key_id for key_id, number in zip(key_ids, found)
                                    if number is None or deliveries[number][_MASTER] != master))
        now = self._clock()
        if any(deliveries[number][_EXPIRES] <= now for number in numbers):
            raise KeysNotFound(next(key_id for key_id, number in zip(key_ids, found)
                                    if deliveries[number][_EXPIRES] <= now))
        if any(caller not in deliveries[number][_SLAVES] for number in numbers):
            raise NotASlave(caller)
        pop = self._keys.pop
        keys = [pop(key_id) for key_id in key_ids]
        for key_id in key_ids:
            del delivery_of[key_id]
        if len(numbers) == 1:  # the usual case: keys of one delivery
            number = numbers.pop()
            delivery = deliveries[number]
            slaves, expires, extension = delivery[_SLAVES], delivery[_EXPIRES], delivery[_EXTENSION]
            taken = list(zip(key_ids, _stored_keys(keys, master, slaves, expires, extension, delivery[_HOLDER])))
            counts = {number: len(key_ids)}
        else:
            taken = [(key_id, StoredKey(key, master, *deliveries[number][_SLAVES:_LEFT]))
                     for key_id, key, number in zip(key_ids, keys, found)]
            counts = Counter(found)
        for number, count in counts.items():
            delivery = deliveries[number]
            delivery[_LEFT] -= count
            if not delivery[_LEFT]:
                del deliveries[number]
        self._bits -= sum(map(len, keys)) * 8
        return taken

    def _live(self, key_id: str, now: float) -> int | None:
        number = self._delivery_of.get(key_id)
        return number if number is not None and self._deliveries[number][_EXPIRES] > now else None

    def held(self, key_ids: list[str]) -> dict[str, object]:
        """Of ``key_ids``, those held (for any master), each with its delivery's holder."""
        now, deliveries = self._clock(), self._deliveries
        return {key_id: deliveries[number][_HOLDER] for key_id in key_ids
                if (number := self._live(key_id, now)) is not None}

    def copied_at(self, holder: object) -> list[tuple[int, list[tuple[str, StoredKey]]]]:
        """The deliveries whose copy is at ``holder``, by number, each with the keys of it still
        held here (they stay)."""
        self.expire()
        keys, delivery_of = self._keys, self._delivery_of
        found = []
        for number, delivery in self._deliveries.items():
            if delivery[_HOLDER] == holder:
                ids = [key_id for key_id in delivery[_IDS] if delivery_of.get(key_id) == number]
                found.append((number, list(zip(ids, _stored_keys(
                    [keys[key_id] for key_id in ids], delivery[_MASTER], delivery[_SLAVES], delivery[_EXPIRES],
                    delivery[_EXTENSION], holder)))))
        return found

    def move_copy(self, number: int, holder: object) -> None:
        """The copy of delivery ``number`` is at ``holder`` now (None: nowhere)."""
        delivery = self._deliveries.get(number)
        if delivery is not None:
            delivery[_HOLDER] = holder

    def take_held(self, caller: str, master: str, key_ids: list[str]) -> list[tuple[str, StoredKey]]:
        """Remove and return those of ``key_ids`` held here for ``master`` (distinct IDs); the
        others are left to whoever holds them. ``NotASlave``, and nothing taken, if ``caller``
        is not a slave of one of them."""
        self.expire()
        now, deliveries = self._clock(), self._deliveries
        here = [key_id for key_id in key_ids
                if (number := self._live(key_id, now)) is not None and deliveries[number][_MASTER] == master]
        return self.take(caller, master, here) if here else []

    def drop(self, key_ids: list[str]) -> int:
        """Forget those of ``key_ids`` held here, whoever they are for; returns how many."""
        deliveries, delivery_of = self._deliveries, self._delivery_of
        dropped = 0
        for key_id in key_ids:
            number = delivery_of.pop(key_id, None)
            if number is None:
                continue
            self._bits -= len(self._keys.pop(key_id)) * 8
            dropped += 1
            delivery = deliveries[number]
            delivery[_LEFT] -= 1
            if not delivery[_LEFT]:
                del deliveries[number]
        return dropped
