"""The monitoring element: samples from raw readings, link health from samples, alarms, recovery."""

from __future__ import annotations

import pytest

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.control.events import EventLog
from vqkd.operator.control.monitoring import (
    AlarmKind, LinkReading, LinkSample, LinkSampler, ModuleReading, Monitoring, MonitoringSettings,
)
from vqkd.operator.control.topology import Topology
from vqkd.operator.resources.models import QKDLink

from builders import node


def watched(qber: float = 0.02, threshold: float = 0.11, **settings) -> tuple[Monitoring, Topology]:
    topology = Topology(EventLog())
    for name in ("a", "b"):
        topology.apply_node(node(name), 0.0)
    link = QKDLink.model_validate({"metadata": {"name": "ab"}, "spec": {
        "nodes": ["a", "b"], "qberThreshold": threshold, "emulated": {"keyRateBps": 1000, "qber": qber}}})
    record, _ = topology.apply_link(link, 0.0)
    monitoring = Monitoring(topology, MonitoringSettings(no_key_window_s=30, recovery_samples=3, **settings))
    monitoring.watch(record, 0.0)
    return monitoring, topology


def sample(at: float, rate: float = 1000, qber: float | None = 0.02, **extra) -> LinkSample:
    return LinkSample("ab", at, rate, qber, **extra)


def test_samples_keep_the_metrics_current():
    monitoring, topology = watched()
    monitoring.ingest(sample(1.0, 900, 0.03, stored_key_bits=4096, load_bps=100), reserved_bps=0)
    link = topology.links["ab"]
    assert (link.key_rate_bps, link.qber, link.stored_key_bits, link.load_bps, link.measured_at) == (
        900, 0.03, 4096, 100, 1.0)
    assert link.available_bps == 900
    monitoring.ingest(sample(0.5, 10, 0.01), reserved_bps=0)
    assert link.key_rate_bps == 900, "a sample older than the latest is ignored"
    assert monitoring.ingest(LinkSample("gone", 2.0, 1), reserved_bps=0) is None


def test_qber_at_the_threshold_is_down_with_one_alarm_and_recovers_after_healthy_samples():
    monitoring, topology = watched()
    change = monitoring.ingest(sample(1.0, qber=0.11), reserved_bps=0)
    assert (change.before, change.after) == (LinkState.UP, LinkState.DOWN)
    assert topology.links["ab"].reason == "QBERAboveThreshold"
    assert "possible eavesdropping" in topology.links["ab"].message
    monitoring.ingest(sample(2.0, qber=0.2), reserved_bps=0)
    (alarm,) = monitoring.alarms
    assert alarm.active and alarm.kind is AlarmKind.POSSIBLE_EAVESDROPPING and alarm.qber == 0.11
    assert alarm.threshold == 0.11 and "link ab (a - b)" in alarm.message

    assert monitoring.ingest(sample(3.0), reserved_bps=0) is None
    assert monitoring.ingest(sample(4.0), reserved_bps=0) is None
    change = monitoring.ingest(sample(5.0), reserved_bps=0)
    assert change.after is LinkState.UP and not alarm.active and alarm.cleared_at == 5.0
    assert monitoring.active_alarms() == []


def test_an_unhealthy_sample_restarts_the_recovery_count():
    monitoring, topology = watched()
    monitoring.ingest(sample(1.0, qber=0.3), reserved_bps=0)
    for at, qber in ((2.0, 0.02), (3.0, 0.02), (4.0, 0.5), (5.0, 0.02), (6.0, 0.02)):
        monitoring.ingest(sample(at, qber=qber), reserved_bps=0)
    assert topology.links["ab"].state is LinkState.DOWN
    monitoring.ingest(sample(7.0), reserved_bps=0)
    assert topology.links["ab"].state is LinkState.UP
    assert len(monitoring.alarms) == 1, "one alarm per episode"


def test_no_key_over_the_window_is_down():
    monitoring, topology = watched()
    monitoring.ingest(sample(1.0), reserved_bps=0)
    assert monitoring.ingest(sample(10.0, rate=0), reserved_bps=0) is None
    change = monitoring.ingest(sample(31.0, rate=0), reserved_bps=0)
    assert change.after is LinkState.DOWN and topology.links["ab"].reason == "NoKeyProduced"
    assert not monitoring.alarms, "no key is a failure, not an attack"


def test_a_link_that_stops_reporting_is_down():
    monitoring, topology = watched()
    assert monitoring.silent(100.0) == [], "silence counts only once a link reported"
    monitoring.ingest(sample(100.0), reserved_bps=0)
    assert monitoring.silent(129.0) == []
    (change,) = monitoring.silent(130.0)
    assert change.after is LinkState.DOWN and "no monitoring sample for 30 s" in topology.links["ab"].message


@pytest.mark.parametrize(("rate", "qber", "reserved", "state", "reason"), [
    (1000, 0.099, 0, LinkState.DEGRADED, "QBERNearThreshold"),
    (400, 0.02, 500, LinkState.DEGRADED, "KeyRateBelowReserved"),
    (1000, 0.02, 500, LinkState.UP, "Healthy"),
])
def test_degraded(rate, qber, reserved, state, reason):
    monitoring, topology = watched()
    monitoring.ingest(sample(1.0, rate, qber), reserved_bps=reserved)
    assert (topology.links["ab"].state, topology.links["ab"].reason) == (state, reason)


def test_a_spec_qber_above_the_threshold_is_down_without_an_alarm():
    monitoring, topology = watched(qber=0.2)
    assert topology.links["ab"].state is LinkState.DOWN and "configured QBER" in topology.links["ab"].message
    assert not monitoring.alarms


def test_link_state_changes_are_events():
    monitoring, topology = watched()
    monitoring.ingest(sample(1.0, qber=0.5), reserved_bps=0)
    (registered, down) = topology.events.about("ab")
    assert (down.from_state, down.to_state, down.reason) == (LinkState.UP, LinkState.DOWN, "QBERAboveThreshold")


# --- readings into samples --------------------------------------------------------------


def module(generated, buffered=0.0, capacity=1e6, skr=5e5, qber=0.02) -> ModuleReading:
    return ModuleReading(generated_bits=generated, buffer_bits=buffered, buffer_capacity_bits=capacity,
                         secret_key_rate_bps=skr, qber=qber)


def reading(at: float, drawn: float = 0, pools: int = 0, module: ModuleReading | None = None) -> LinkReading:
    return LinkReading("ab", at, drawn_bits=drawn, pool_bits=pools, module=module)


def test_rates_are_measured_between_readings():
    sampler = LinkSampler()
    assert sampler.sample(reading(10.0, module=module(0))) is None  # the first reading only sets the baseline
    sample = sampler.sample(reading(12.0, drawn=2e5, pools=150, module=module(1e6, buffered=1000)))
    assert (sample.at, sample.key_rate_bps, sample.load_bps, sample.qber, sample.stored_key_bits) == (
        12.0, 5e5, 1e5, 0.02, 1150)


def test_a_full_buffer_is_an_idle_link_not_a_dead_one():
    sampler = LinkSampler()
    sampler.sample(reading(10.0, module=module(1e6, buffered=1e6)))
    sample = sampler.sample(reading(12.0, module=module(1e6, buffered=1e6)))
    assert sample.key_rate_bps == 5e5  # what the module says it produces, not 0


def test_a_link_that_stops_producing_reports_zero():
    sampler = LinkSampler()
    sampler.sample(reading(10.0, module=module(1e6, buffered=10)))
    assert sampler.sample(reading(12.0, module=module(1e6, buffered=10, skr=0))).key_rate_bps == 0


def test_without_module_metrics_the_key_drawn_is_the_rate():
    sampler = LinkSampler()
    sampler.sample(reading(10.0, drawn=1000))
    sample = sampler.sample(reading(11.0, drawn=5000, pools=64))
    assert (sample.key_rate_bps, sample.load_bps, sample.qber, sample.stored_key_bits) == (4000, 4000, None, 64)


def test_a_restarted_km_counting_from_zero_draws_nothing_rather_than_less_than_nothing():
    sampler = LinkSampler()
    sampler.sample(reading(10.0, drawn=9000, module=module(1e6)))
    assert sampler.sample(reading(11.0, drawn=100, module=module(2e6))).load_bps == 0


def test_a_link_created_again_starts_from_a_new_baseline():
    sampler = LinkSampler()
    sampler.sample(reading(10.0, module=module(1e6)))
    sampler.retain([])
    assert sampler.sample(reading(11.0, module=module(0))) is None
