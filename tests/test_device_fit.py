"""How a KM fits itself to its QKD devices: block size, draw size, link health and when its pool is full (pure)."""

from __future__ import annotations

import pytest

from vqkd.km.config import LinkEndConfig
from vqkd.km.domain.devices import (
    DOWN_AFTER_FAILURES,
    MIN_BLOCK_BITS,
    TROUBLE_WINDOW_S,
    DrawSizer,
    EndLimits,
    LimitsMismatch,
    LinkHealth,
    fit_block_bits,
)
from vqkd.km.domain.links import Link
from vqkd.km.domain.vocabulary import LinkState
from vqkd.km.rpc.control_service import link_stats

from builders import Clock


def limits(max_key_size: int = 65536, min_key_size: int = 8, per_request: int = 4096) -> EndLimits:
    return EndLimits(key_size=min(256, max_key_size), min_key_size=min_key_size, max_key_size=max_key_size,
                     max_key_per_request=per_request)


def test_the_block_is_the_largest_size_both_ends_accept_within_the_configured_bound():
    assert fit_block_bits(8192, {"A": limits(), "B": limits()}) == 8192
    assert fit_block_bits(8192, {"A": limits(1024), "B": limits()}) == 1024
    assert fit_block_bits(8192, {"A": limits(2048), "B": limits(256)}) == 256
    assert fit_block_bits(8192, {"A": limits(1001), "B": limits()}) == 1000  # whole bytes


@pytest.mark.parametrize(("bound", "ends", "words"), [
    (8192, {"node A's end": limits(32), "node B's end": limits()},
     ["node A's end", "at most 32 bits (max_key_size)", f"at least {MIN_BLOCK_BITS} bits"]),
    (1024, {"node A's end": limits(min_key_size=2048), "node B's end": limits()},
     ["node A's end", "at least 2048 bits (min_key_size)", "block size of 1024 bits"]),
    (8192, {"node A's end": limits(512), "node B's end": limits(min_key_size=1024)},
     ["at most 512 bits", "at least 1024 bits", "no key size suits both ends"]),
])
def test_limits_that_cannot_serve_are_refused_with_the_limit_named(bound, ends, words):
    with pytest.raises(LimitsMismatch) as e:
        fit_block_bits(bound, ends)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_draws_shrink_at_once_for_a_slow_slave_end_and_grow_back_gradually():
    sizer = DrawSizer(target_s=2.5, initial=16, ceiling=512)
    sizer.observe(0.0001)
    assert sizer.limit == 32  # probing: at most twice as many per measurement
    for _ in range(10):
        sizer.observe(0.0001)
    assert sizer.limit == 512
    sizer.observe(0.04)  # 40 ms a key: 62 keys fit in 2.5 s
    assert sizer.limit == 62
    limits_seen = []
    for _ in range(20):
        sizer.observe(0.001)
        limits_seen.append(sizer.limit)
    assert limits_seen == sorted(limits_seen) and limits_seen[-1] == 512
    assert limits_seen[0] < 200, "one fast answer does not restore the full size"


def test_link_health_down_after_repeated_failures_degraded_while_recent_up_after():
    clock = [0.0]
    health = LinkHealth(lambda: clock[0])
    assert health.verdict().state is LinkState.DOWN  # nothing reached yet
    health.succeeded("device")
    assert health.verdict().state is LinkState.UP
    health.failed("device", "DeviceUnavailable", "HTTP 503: end b is out of service")
    verdict = health.verdict()
    assert verdict.state is LinkState.DEGRADED and "out of service" in verdict.message
    for _ in range(DOWN_AFTER_FAILURES - 1):
        health.failed("device", "DeviceUnavailable", "HTTP 503: end b is out of service")
    verdict = health.verdict()
    assert (verdict.state, verdict.reason) == (LinkState.DOWN, "DeviceUnavailable")
    assert "out of service" in verdict.message
    health.succeeded("device")
    assert health.verdict().state is LinkState.DEGRADED
    clock[0] += TROUBLE_WINDOW_S + 1
    assert health.verdict().state is LinkState.UP


def test_the_own_end_verdict_ignores_what_the_peer_reported():
    health = LinkHealth()
    health.succeeded("device")
    health.block("peer-device", "PeerDeviceUnavailable", "the QKD module end of node B: out of service")
    assert health.verdict().state is LinkState.DOWN
    assert health.verdict(("device",)).state is LinkState.UP


def test_a_pool_within_one_block_of_its_target_counting_keys_awaiting_the_peer_is_full():
    link = Link(LinkEndConfig(name="a-b", peer_node="b", peer_kme_id="b", peer_grpc="b:1", module_url="https://m:1",
                              module_sae_id="a", peer_module_sae_id="b", pool_target_bits=8192), "i-a")
    link.outgoing.add([("k1", bytes(512))])  # 4096 bits
    link.devices.block_bits = 1024
    assert (link.lacking_bits, link.pool_full) == (4096, False)
    link.devices.awaiting_peer_bits = 3072
    assert (link.lacking_bits, link.pool_full) == (1024, False)
    link.devices.awaiting_peer_bits = 3584  # what is lacking is less than one block: no more is drawn
    assert link.pool_full and link_stats(link).pool_full


def test_a_peer_refusing_calls_before_it_first_answered_leaves_no_degraded_trail():
    clock = Clock(0.0)
    health = LinkHealth(clock)
    health.succeeded("device")
    health.failed("peer", "PeerUnavailable", "connection refused")  # both KMs starting
    health.succeeded("peer")
    assert health.verdict().state is LinkState.UP
    health.failed("peer", "PeerUnavailable", "connection refused")  # once it answered, a failure counts
    assert health.verdict().state is LinkState.DEGRADED
    clock.advance(11)
    assert health.verdict().state is LinkState.UP
