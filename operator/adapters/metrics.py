"""Prometheus metrics of the control plane, the same in both runtimes (prefix ``vqkd_control_``).

Gauges are read from the control core's views (and the host's count of KM replicas) at
scrape time; counters are fed by its event log, so every transition the core records is
counted once.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.events import Event, Subject
from vqkd.operator.resources.models import SessionPhase

LINK_STATES = [str(s) for s in LinkState]
SESSION_PHASES = [str(p) for p in SessionPhase]
PUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ControlMetrics:
    """``replicas`` says, at scrape time, how many KM replicas each node has: (ready, desired)."""

    def __init__(self, core: ControlCore, registry: CollectorRegistry | None = None,
                 replicas: Callable[[], Mapping[str, tuple[int, int]]] = dict):
        self.registry = registry or CollectorRegistry()
        self.core = core
        self.replicas = replicas
        self.push_seconds = Histogram(
            "vqkd_control_push_duration_seconds", "Time for a KM to confirm a configuration push or deletion",
            ["call"], buckets=PUSH_BUCKETS, registry=self.registry).labels
        self.km_replacements = Counter(
            "vqkd_control_km_replacements", "KM instances (of any replica) replaced and configured again", ["node"],
            registry=self.registry).labels
        self._refusals: Tally[str] = Tally()
        core.events.subscribe(self._on_event)
        self.registry.register(_CoreCollector(self))

    def _on_event(self, event: Event) -> None:
        # A session that ends without ever having been Active was refused (SLA, no route, access).
        if event.subject is Subject.SESSION and event.to_state == "Terminated" and event.from_state in (None, "Accepted"):
            self._refusals[event.reason] += 1


class _CoreCollector:
    def __init__(self, metrics: ControlMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        core = self.metrics.core
        phases = GaugeMetricFamily("vqkd_control_sessions", "Sessions by phase", labels=["phase"])
        tally = Tally(s["phase"] for s in core.sessions())
        for phase in SESSION_PHASES:
            phases.add_metric([phase], tally.get(phase, 0))
        held = GaugeMetricFamily("vqkd_control_sessions_held", "Active sessions held without a route")
        held.add_metric([], sum(1 for s in core.sessions() if s["state"] == "Held"))
        state = GaugeMetricFamily("vqkd_control_link_state", "1 for the link's current state", labels=["link", "state"])
        rate = GaugeMetricFamily("vqkd_control_link_key_rate_bits_per_second", "Measured secret key rate per link",
                                 labels=["link"])
        qber = GaugeMetricFamily("vqkd_control_link_qber", "Measured QBER per link", labels=["link"])
        threshold = GaugeMetricFamily("vqkd_control_link_qber_threshold",
                                      "QBER at which the control plane takes the link Down (spec.qberThreshold)",
                                      labels=["link"])
        reserved = GaugeMetricFamily("vqkd_control_link_reserved_bits_per_second",
                                     "Key rate reserved by sessions per link", labels=["link"])
        burned = GaugeMetricFamily("vqkd_control_link_burned_bits",
                                   "Key the link's KMs drew from the QKD modules and gave up, as they count it",
                                   labels=["link"])
        for link in core.links():
            for s in LINK_STATES:
                state.add_metric([link["name"], s], 1 if link["state"] == s else 0)
            rate.add_metric([link["name"]], link["keyRateBps"] or 0)
            if link["qber"] is not None:
                qber.add_metric([link["name"]], link["qber"])
            threshold.add_metric([link["name"]], link["qberThreshold"])
            reserved.add_metric([link["name"]], link["reservedBps"])
            if link["burnedBits"] is not None:
                burned.add_metric([link["name"]], link["burnedBits"])
        user_sessions = GaugeMetricFamily("vqkd_control_user_sessions", "Active sessions per UserProfile",
                                          labels=["user"])
        user_reserved = GaugeMetricFamily("vqkd_control_user_reserved_bits_per_second",
                                          "Key rate reserved by a UserProfile's active sessions", labels=["user"])
        user_keys = GaugeMetricFamily("vqkd_control_user_keys_delivered",
                                      "Keys delivered by a UserProfile's active sessions, as their KMs count them",
                                      labels=["user"])
        for user in core.users():
            user_sessions.add_metric([user["name"]], user["sessions"])
            user_reserved.add_metric([user["name"]], user["reservedBps"])
            user_keys.add_metric([user["name"]], user["keysDelivered"])
        refusals = CounterMetricFamily("vqkd_control_session_refusals", "Sessions refused, by reason",
                                       labels=["reason"])
        for reason, count in self.metrics._refusals.items():
            refusals.add_metric([reason], count)
        alarms = CounterMetricFamily("vqkd_control_alarms", "Alarms raised (possible eavesdropping)",
                                     labels=["link", "kind"])
        for (link, kind), count in Tally((a.link, str(a.kind)) for a in core.alarms()).items():
            alarms.add_metric([link, kind], count)
        desired = GaugeMetricFamily("vqkd_control_km_replicas", "KM replicas a node declares (spec.km.replicas)",
                                    labels=["node"])
        ready = GaugeMetricFamily("vqkd_control_km_replicas_ready", "KM replicas of a node that answer",
                                  labels=["node"])
        for node, (answering, declared) in sorted(self.metrics.replicas().items()):
            desired.add_metric([node], declared)
            ready.add_metric([node], answering)
        yield from (phases, held, state, rate, qber, threshold, reserved, burned, user_sessions, user_reserved,
                    user_keys, refusals, alarms, desired, ready)
