"""Keys waiting for slave SAEs leave the store exactly once."""

import gc

import pytest

from vqkd.km.domain.errors import KeysNotFound
from vqkd.km.domain.keystore import KeyStore, NotASlave, StoreFull

from builders import Clock


def store(ttl=10.0, max_bits=10_000):
    clock = Clock(0.0)
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
    clock.now = 11
    with pytest.raises(KeysNotFound):
        s.take("s", "m", ["k1"])
    s.put("m", frozenset({"s"}), [("k2", b"a" * 64)])
    assert s.bits == 512


def test_expiry_drops_each_delivery_when_its_time_is_up():
    s, clock = store(ttl=10)
    s.put("m", frozenset({"s"}), [("k1", b"a" * 32), ("k2", b"b" * 32)])
    clock.now = 5
    s.put("m", frozenset({"s"}), [("k3", b"c" * 32)])
    assert [k for k, _ in s.take("s", "m", ["k1"])] == ["k1"]
    clock.now = 10
    assert s.expire() == 1  # k2; k1 was taken
    assert len(s) == 1 and s.bits == 256
    with pytest.raises(KeysNotFound):
        s.take("s", "m", ["k2"])
    clock.now = 15
    assert s.expire() == 1
    assert len(s) == 0 and s.bits == 0


def test_a_key_id_taken_and_named_again_lives_by_its_new_delivery():
    s, clock = store(ttl=10)
    s.put("m", frozenset({"s"}), [("k1", b"a" * 32)])
    s.take("s", "m", ["k1"])
    clock.now = 5
    s.put("m", frozenset({"s"}), [("k1", b"b" * 32)])
    clock.now = 11
    assert s.expire() == 0
    assert [(k, e.key) for k, e in s.take("s", "m", ["k1"])] == [("k1", b"b" * 32)]


def test_a_key_id_named_twice_in_one_delivery_is_refused():
    s, _ = store()
    with pytest.raises(KeysNotFound):
        s.put("m", frozenset({"s"}), [("k1", b"a" * 32), ("k1", b"b" * 32)])
    assert len(s) == 0 and s.bits == 0
    s.put("m", frozenset({"s"}), [("k1", b"a" * 32)])
    assert len(s) == 1


def test_keys_of_several_deliveries_keep_their_own_slaves_and_extension():
    s, clock = store(ttl=10)
    s.put("m", frozenset({"s", "t"}), [("k1", b"a" * 32), ("k2", b"b" * 32)], {"hybrid": True})
    clock.now = 1
    s.put("m", frozenset({"s"}), [("k3", b"c" * 32)])
    with pytest.raises(NotASlave):
        s.take("t", "m", ["k1", "k3"])
    got = s.take("s", "m", ["k3", "k1"])
    assert [(k, e.key, e.master, e.slaves, e.expires, e.extension) for k, e in got] == [
        ("k3", b"c" * 32, "m", frozenset({"s"}), 11, None),
        ("k1", b"a" * 32, "m", frozenset({"s", "t"}), 10, {"hybrid": True}),
    ]
    assert len(s) == 1 and s.bits == 256
    assert [(k, e.key) for k, e in s.take("t", "m", ["k2"])] == [("k2", b"b" * 32)]
    assert len(s) == 0 and s.bits == 0


def test_stored_keys_add_no_objects_for_the_garbage_collector():
    # A store holding millions of keys must not make every full collection walk them all.
    s, _ = store(max_bits=10**9)
    gc.collect()
    before = len(gc.get_objects())
    for d in range(10):
        s.put("m", frozenset({"s"}), [(f"{d}-{i}", i.to_bytes(32, "big")) for i in range(1000)])
    gc.collect()
    assert len(s) == 10_000
    assert len(gc.get_objects()) - before < 100


def test_take_held_takes_only_what_is_here_for_that_master():
    s, _ = store()
    s.put("m", frozenset({"s"}), [("k1", b"a" * 32)], holder=1)
    s.put("other", frozenset({"s"}), [("k2", b"b" * 32)])
    taken = s.take_held("s", "m", ["k1", "k2", "elsewhere"])
    assert [(k, e.holder) for k, e in taken] == [("k1", 1)]
    assert s.take_held("s", "m", ["k1"]) == [] and len(s) == 1
    with pytest.raises(NotASlave):
        s.take_held("intruder", "other", ["k2"])
    assert len(s) == 1


def test_keys_held_again_keep_their_time_left_even_behind_younger_ones():
    s, clock = store(ttl=10)
    s.put("m", frozenset({"s"}), [("young", b"a" * 32)])
    s.put("m", frozenset({"s"}), [("old", b"b" * 32)], ttl_s=2, holder=(0, "inc"))
    assert s.held(["old", "young", "none"]) == {"old": (0, "inc"), "young": None}
    clock.now = 3
    with pytest.raises(KeysNotFound):
        s.take("s", "m", ["old"])
    assert s.take_held("s", "m", ["old", "young"])[0][0] == "young"
    assert s.held(["old"]) == {}


def test_drop_forgets_keys_whoever_they_are_for():
    s, _ = store()
    s.put("m", frozenset({"s"}), [("k1", b"a" * 32), ("k2", b"b" * 32)])
    assert s.drop(["k1", "unknown"]) == 1
    assert len(s) == 1 and s.bits == 256
    assert s.drop(["k2"]) == 1
    assert len(s) == 0 and s.bits == 0 and s.expire() == 0
