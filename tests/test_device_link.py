"""KMs in front of a QKD device pair that is not vqkd's own twin, with real processes.

The emulated pair plays a third-party ETSI 014 KME pair (see tests/device_pair.py): keys of at
most 1024 bits, 128 keys per request, a slave end that takes 40 ms per key to answer dec_keys
and knows a key only 300 ms after the master end issued it, TLS 1.2 only. The KMs are
configured by hand with the emulator's 8192-bit block size, as a lab would copy it, and must
fit themselves to the device, keep every key they draw, and report trouble as link state.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest
from device_pair import NODES, PEER, DevicePair, sae, start_device_pair

from vqkd.km.domain.devices import TROUBLE_WINDOW_S
from vqkd.km.etsi014.client import ETSI014Error

LAB_DEVICE = {"max_key_size": 1024, "key_size": 256, "max_keys_per_request": 128,
              "slave_latency_ms_per_key": 40, "sync_lag_ms": 300, "tls12_only": True}
# Below what the two slave ends can hand over (25 keys of 1024 bits a second each), so the
# module's buffer stays small and drains quickly once production stops.
KEY_RATE_BPS = 40_000


@dataclass
class Traffic:
    """What the applications got: per direction, (time, bits) of each completed round trip."""

    started: float
    rounds: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: {n: [] for n in NODES})
    material: list[bytes] = field(default_factory=list)
    refused: int = 0

    def bits(self) -> int:
        return sum(bits for rounds in self.rounds.values() for _, bits in rounds)


async def round_trips(pair: DevicePair, seconds: float, number: int = 4, size: int = 256) -> Traffic:
    """Both SAEs draw keys as master for ``seconds`` and the other SAE collects each batch."""
    traffic = Traffic(time.monotonic())
    end = traffic.started + seconds

    async def direction(master: str) -> None:
        slave = PEER[master]
        async with pair.client(master) as m, pair.client(slave) as s:
            while time.monotonic() < end:
                try:
                    keys = await m.enc_keys(sae(slave), number, size)
                except ETSI014Error as e:
                    assert e.status == 503, e
                    traffic.refused += 1
                    await asyncio.sleep(0.05)
                    continue
                assert await s.dec_keys(sae(master), [key_id for key_id, _ in keys]) == keys
                traffic.rounds[master].append((time.monotonic(), number * size))
                traffic.material.extend(key for _, key in keys)

    await asyncio.gather(*(direction(node) for node in NODES))
    return traffic


def totals(pair: DevicePair) -> dict[str, float]:
    """Bits taken from the module as master, agreed into pools, burned and still awaited (both KMs)."""
    out = {"module": 0.0, "pools": 0.0, "burned": 0.0, "awaiting": 0.0}
    for node in NODES:
        m = pair.metrics(node)
        out["module"] += m[("vqkd_km_module_drawn_bits_total",)]
        out["pools"] += m[("vqkd_km_link_drawn_bits_total",)]
        out["awaiting"] += m[("vqkd_km_awaiting_peer_bits",)]
        out["burned"] += sum(v for k, v in m.items() if k[0] == "vqkd_km_burned_bits_total")
    return out


async def drained(pair: DevicePair, timeout: float = 20.0) -> dict[str, float]:
    """Stop production and wait until no drawn key awaits the peer; the final totals."""
    pair.control(key_rate_bps=0)
    deadline = time.monotonic() + timeout
    while True:
        t = totals(pair)
        if t["awaiting"] == 0:
            return t
        assert time.monotonic() < deadline, f"keys still awaited after {timeout}s: {t}"
        await asyncio.sleep(0.2)


async def wait_state(pair: DevicePair, node: str, states: set[str], timeout: float) -> float:
    """Seconds until the KM of ``node`` reports link ``ab`` in one of ``states``."""
    started = time.monotonic()
    while (await pair.link_stats(node)).state not in states:
        assert time.monotonic() - started < timeout, f"{node} never saw the link in {states}: " \
                                                     f"{await pair.link_stats(node)}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def assert_steady(traffic: Traffic, seconds: float, buckets: int) -> list[float]:
    """Key bits per second in equal parts of the run after the first; each part delivers."""
    width = seconds / buckets
    rates = [0.0] * buckets
    for rounds in traffic.rounds.values():
        for at, bits in rounds:
            rates[min(buckets - 1, int((at - traffic.started) / width))] += bits / width
    assert all(rate > 0 for rate in rates[1:]), f"no key delivered in some part of the run: {rates}"
    return rates


@pytest.fixture
def lab_pair(pki, processes, tmp_path) -> DevicePair:
    return start_device_pair(pki, processes, tmp_path / "vendor", LAB_DEVICE, key_rate_bps=KEY_RATE_BPS)


async def test_kms_fit_a_slow_lagging_device_and_keep_what_they_draw(lab_pair):
    pair = lab_pair
    seconds = 12.0
    traffic = await round_trips(pair, seconds)
    final = await drained(pair)
    share = final["pools"] / final["module"]
    rates = assert_steady(traffic, seconds, buckets=4)
    print(f"\nlab device: {traffic.bits() / seconds:.0f} bit/s delivered to the SAEs in round trips "
          f"(per 3 s: {[round(r) for r in rates]}), {final['pools']:.0f} of {final['module']:.0f} bits drawn "
          f"from the device reached the pools ({share:.1%}), {final['burned']:.0f} burned, "
          f"{traffic.refused} requests refused while the pools filled")
    assert share >= 0.9 and final["burned"] == 0
    assert len(set(traffic.material)) == len(traffic.material), "some key was delivered twice"
    for node in NODES:
        stats = await pair.link_stats(node)
        assert stats.block_bits == 1024, "the block size is the device's max_key_size, not the 8192 configured"
        assert stats.state == "Up", stats
    # Draws are sized for the slave end: 40 ms a key within half the 5 s peer deadline.
    latency = pair.metrics("B")[("vqkd_km_module_seconds_per_key",)]
    assert 0.035 < latency < 0.2, latency


async def test_a_device_with_small_keys(pki, processes, tmp_path):
    pair = start_device_pair(pki, processes, tmp_path / "vendor", {**LAB_DEVICE, "max_key_size": 256},
                             key_rate_bps=KEY_RATE_BPS // 4)
    traffic = await round_trips(pair, 6.0, number=2, size=256)
    final = await drained(pair)
    assert traffic.bits() > 0 and final["burned"] == 0 and final["pools"] / final["module"] >= 0.9
    assert len(set(traffic.material)) == len(traffic.material)
    assert {(await pair.link_stats(node)).block_bits for node in NODES} == {256}
    print(f"\nmax key size 256: {traffic.bits() / 6:.0f} bit/s delivered, "
          f"{final['pools'] / final['module']:.1%} of the drawn bits reached the pools")


async def test_an_outage_of_one_end_makes_the_link_down_and_it_recovers_by_itself(lab_pair):
    pair = lab_pair
    for node in NODES:
        await wait_state(pair, node, {"Up"}, timeout=15)
    pair.control(end_outage={"b": True})
    went_down = time.monotonic()
    down = max(await wait_state(pair, "B", {"Down"}, timeout=5), await wait_state(pair, "A", {"Down"}, timeout=5))
    b, a = await pair.link_stats("B"), await pair.link_stats("A")
    assert b.reason == "DeviceUnavailable" and "out of service" in b.message, b
    assert a.reason == "PeerDeviceUnavailable" and "node B" in a.message and "out of service" in a.message, a
    await asyncio.sleep(max(0.0, went_down + 5 - time.monotonic()))
    pair.control(end_outage={"b": False})
    # Back within seconds, Degraded while the outage's errors are recent, then Up.
    serving = max([await wait_state(pair, node, {"Up", "Degraded"}, timeout=10) for node in NODES])
    traffic = await round_trips(pair, 3.0)
    assert traffic.bits() > 0
    up = max([await wait_state(pair, node, {"Up"}, timeout=TROUBLE_WINDOW_S + 10) for node in NODES])
    final = await drained(pair)
    assert final["burned"] == 0, "keys drawn before the outage were kept"
    print(f"\noutage of end b for 5 s: Down at both KMs after {down:.1f} s, serving again {serving:.1f} s after "
          f"the end came back, Up after "
          f"{serving + 3 + up:.1f} s")


async def test_keys_the_slave_end_never_hands_over_are_given_up_counted_and_shown(pki, processes, tmp_path):
    # The slave end synchronises later than the KMs wait: every draw is given up, none is used.
    pair = start_device_pair(pki, processes, tmp_path / "vendor", {**LAB_DEVICE, "sync_lag_ms": 5000},
                             key_rate_bps=KEY_RATE_BPS, sync_timeout_s=1.0)
    deadline = time.monotonic() + 15
    while (burned := pair.metrics("A")[("vqkd_km_burned_bits_total", "reason=not_synchronised")]) == 0:
        assert time.monotonic() < deadline, pair.processes.log("km-A")
        await asyncio.sleep(0.2)
    stats = await pair.link_stats("A")
    assert stats.burned_bits_total["not_synchronised"] == burned and stats.drawn_bits_total == 0
    assert (stats.state, stats.reason) == ("Degraded", "KeysBurned") and "given up" in stats.message, stats
    async with pair.client("A") as a:
        with pytest.raises(ETSI014Error) as e:
            await a.enc_keys(sae("B"), 1, 256)
    assert e.value.status == 503


async def test_a_device_whose_keys_are_too_small_takes_the_link_down_naming_the_limit(pki, processes, tmp_path):
    pair = start_device_pair(pki, processes, tmp_path / "vendor", {"max_key_size": 32, "key_size": 32},
                             key_rate_bps=KEY_RATE_BPS)
    await wait_state(pair, "A", {"Down"}, timeout=10)
    deadline = time.monotonic() + 10
    while (stats := await pair.link_stats("A")).reason != "DeviceLimits":
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.1)
    assert "at most 32 bits (max_key_size)" in stats.message and stats.module_drawn_bits_total == 0, stats


async def test_occasional_device_errors_degrade_the_link_but_lose_no_key(pki, processes, tmp_path):
    pair = start_device_pair(pki, processes, tmp_path / "vendor", {**LAB_DEVICE, "error_rate": 0.05},
                             key_rate_bps=KEY_RATE_BPS)
    traffic = await round_trips(pair, 6.0)
    states = {(await pair.link_stats(node)).reason for node in NODES}
    final = await drained(pair)
    assert traffic.bits() > 0 and final["burned"] == 0 and final["pools"] / final["module"] >= 0.9
    assert len(set(traffic.material)) == len(traffic.material)
    assert "DeviceUnavailable" in states, states
