"""Keys waiting for slave SAEs leave the store exactly once."""

import pytest

from vqkd.km.keystore import KeysNotFound, KeyStore, NotASlave, StoreFull


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def store(ttl=10.0, max_bits=10_000):
    clock = Clock()
    return KeyStore(ttl, max_bits, clock), clock


def test_taken_once_by_a_named_slave():
    s, _ = store()
    s.put("m", frozenset({"s"}), [("k1", b"a" * 32), ("k2", b"b" * 32)])
    assert [k for k, _ in s.take("s", "m", ["k2", "k1"])] == ["k2", "k1"]
    with pytest.raises(KeysNotFound):
        s.take("s", "m", ["k1"])
    assert s.bits == 0


def test_all_or_nothing():
    s, _ = store()
    s.put("m", frozenset({"s"}), [("k1", b"a" * 32)])
    with pytest.raises(KeysNotFound):
        s.take("s", "m", ["k1", "unknown"])
    assert len(s) == 1


def test_other_master_or_duplicate_ids_are_not_found():
    s, _ = store()
    s.put("m", frozenset({"s"}), [("k1", b"a" * 32)])
    with pytest.raises(KeysNotFound):
        s.take("s", "other", ["k1"])
    with pytest.raises(KeysNotFound):
        s.take("s", "m", ["k1", "k1"])
    assert len(s) == 1


def test_only_named_slaves():
    s, _ = store()
    s.put("m", frozenset({"s"}), [("k1", b"a" * 32)])
    with pytest.raises(NotASlave):
        s.take("intruder", "m", ["k1"])
    assert len(s) == 1


def test_expiry_and_bound():
    s, clock = store(ttl=10, max_bits=512)
    s.put("m", frozenset({"s"}), [("k1", b"a" * 32)])
    with pytest.raises(StoreFull):
        s.put("m", frozenset({"s"}), [("k2", b"a" * 33)])
    clock.t = 11
    with pytest.raises(KeysNotFound):
        s.take("s", "m", ["k1"])
    s.put("m", frozenset({"s"}), [("k2", b"a" * 64)])
    assert s.bits == 512
