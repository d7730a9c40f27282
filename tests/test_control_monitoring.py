"""The monitoring element: samples from raw readings, link health from samples, alarms, recovery."""

from __future__ import annotations

import pytest

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.control.events import EventLog
from vqkd.operator.control.monitoring import (
    AlarmKind, KMReport, LinkReading, LinkSample, LinkSampler, ModuleReading, Monitoring, MonitoringSettings,
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


DEVICE_DOWN = KMReport(LinkState.DOWN, "DeviceUnavailable", "QKD module at https://qkd-a:8443 answered 503: laser off")
DEVICE_TROUBLE = KMReport(LinkState.DEGRADED, "DeviceRefused",
                          "QKD module refused enc_keys (1 problem in the last 10 s)")
KM_UP = KMReport(LinkState.UP, "Healthy", "both QKD module ends and the peer KM answer")


def test_a_link_its_kms_report_down_is_down_in_the_devices_words_and_recovers_after_healthy_samples():
    monitoring, topology = watched()
    change = monitoring.ingest(sample(1.0, rate=0, reported=DEVICE_DOWN), reserved_bps=0)
    link = topology.links["ab"]
    assert (change.after, link.reason, link.message) == (LinkState.DOWN, "DeviceUnavailable", DEVICE_DOWN.message)
    assert not monitoring.alarms, "a failing device is not an attack"
    assert monitoring.reassess(link, reserved_bps=0, now=1.5) is None, "still Down until samples say otherwise"
    monitoring.ingest(sample(40.0, rate=0, reported=DEVICE_DOWN), reserved_bps=0)
    assert link.reason == "DeviceUnavailable", "the device's reason, not the no-key window's"
    assert monitoring.ingest(sample(41.0, reported=DEVICE_TROUBLE), reserved_bps=0) is None
    assert monitoring.ingest(sample(42.0, reported=KM_UP), reserved_bps=0) is None
    change = monitoring.ingest(sample(43.0, reported=KM_UP), reserved_bps=0)
    assert (change.after, link.reason) == (LinkState.UP, "Healthy")


def test_a_link_its_kms_report_degraded_is_degraded_with_their_reason_and_routable():
    monitoring, topology = watched()
    change = monitoring.ingest(sample(1.0, reported=DEVICE_TROUBLE), reserved_bps=0)
    link = topology.links["ab"]
    assert (change.after, link.reason, link.message) == (LinkState.DEGRADED, "DeviceRefused", DEVICE_TROUBLE.message)
    assert link.usable
    change = monitoring.ingest(sample(2.0, reported=KM_UP), reserved_bps=0)
    assert change.after is LinkState.UP, "Degraded is no outage: no recovery count"


def test_a_qber_above_the_threshold_outranks_what_the_kms_report():
    monitoring, topology = watched()
    monitoring.ingest(sample(1.0, qber=0.2, reported=DEVICE_DOWN), reserved_bps=0)
    assert topology.links["ab"].reason == "QBERAboveThreshold" and len(monitoring.alarms) == 1


def test_the_link_record_keeps_the_bits_its_kms_burned():
    monitoring, topology = watched()
    monitoring.ingest(sample(1.0, burned_bits=3072, reported=DEVICE_TROUBLE), reserved_bps=0)
    assert topology.links["ab"].burned_bits == 3072


def test_link_state_changes_are_events():
    monitoring, topology = watched()
    monitoring.ingest(sample(1.0, qber=0.5), reserved_bps=0)
    (registered, down) = topology.events.about("ab")
    assert (down.from_state, down.to_state, down.reason) == (LinkState.UP, LinkState.DOWN, "QBERAboveThreshold")


# --- readings into samples --------------------------------------------------------------


def module(generated, buffered=0.0, capacity=1e6, skr=5e5, qber=0.02) -> ModuleReading:
    return ModuleReading(generated_bits=generated, buffer_bits=buffered, buffer_capacity_bits=capacity,
                         secret_key_rate_bps=skr, qber=qber)


def reading(at: float, drawn: float = 0, pools: int = 0, module: ModuleReading | None = None,
            **reported) -> LinkReading:
    return LinkReading("ab", at, drawn_bits=drawn, pool_bits=pools, module=module, **reported)


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


def test_what_the_kms_report_and_burned_is_carried_into_the_sample():
    sampler = LinkSampler()
    sampler.sample(reading(10.0))
    sample = sampler.sample(reading(11.0, reported=DEVICE_DOWN, burned_bits=2048))
    assert (sample.reported, sample.burned_bits) == (DEVICE_DOWN, 2048)


def test_a_device_link_whose_kms_pools_are_full_is_idle_at_its_last_measured_rate():
    sampler = LinkSampler()
    sampler.sample(reading(10.0, drawn=0))
    assert sampler.sample(reading(11.0, drawn=4000)).key_rate_bps == 4000
    assert sampler.sample(reading(12.0, drawn=4000, pools_full=True)).key_rate_bps == 4000
    assert sampler.sample(reading(13.0, drawn=4000, pools=9000, pools_full=True)).key_rate_bps == 4000
    assert sampler.sample(reading(14.0, drawn=4000)).key_rate_bps == 0, "pools with room and nothing drawn: no key"


def test_an_idle_device_link_never_measured_has_no_rate_rather_than_zero():
    sampler = LinkSampler()
    sampler.sample(reading(10.0, drawn=4000, pools_full=True))
    assert sampler.sample(reading(11.0, drawn=4000, pools_full=True)).key_rate_bps is None


def test_an_idle_device_link_stays_up_past_the_no_key_window():
    monitoring, topology = watched()
    sampler = LinkSampler()
    sampler.sample(reading(0.0))
    monitoring.ingest(sampler.sample(reading(1.0, drawn=8192)), reserved_bps=0)
    for at in range(2, 70):
        sample = sampler.sample(reading(float(at), drawn=8192, pools_full=True, reported=KM_UP))
        monitoring.ingest(sample, reserved_bps=0)
    assert monitoring.silent(70.0) == []
    link = topology.links["ab"]
    assert (link.state, link.key_rate_bps) == (LinkState.UP, 8192)


def test_an_idle_device_link_never_measured_stays_up_without_a_rate():
    monitoring, topology = watched()
    sampler = LinkSampler()
    sampler.sample(reading(0.0, drawn=8192, pools_full=True))
    for at in range(1, 70):
        monitoring.ingest(sampler.sample(reading(float(at), drawn=8192, pools_full=True)), reserved_bps=0)
    assert monitoring.silent(70.0) == []
    link = topology.links["ab"]
    assert (link.state, link.key_rate_bps, link.reason) == (LinkState.UP, None, "Healthy")
