"""Prometheus metrics of a KM process (prefix ``vqkd_km_``, labels of bounded cardinality).

Every series is exposed with the KM's ``replica`` ordinal (``KMMetrics.exposed``), so the
replicas of one node are told apart; the metrics are defined without it. A KM holds one end
of a link per KM replica of the peer node: its per-link series sum those ends (the state is
the worst of them).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vqkd.km.domain import errors
from vqkd.km.domain.devices import BURN_REASONS
from vqkd.km.domain.tokenbucket import TokenBucketRefusal
from vqkd.km.domain.vocabulary import LinkState

if TYPE_CHECKING:
    from vqkd.km.domain.keymanager import KeyManager

# Why a KM refused a key request; every reason is exported from the start (at 0), so a
# first refusal shows in rate() and increase() like any later one.
REFUSAL_REASONS = ("insufficient_key", "token_bucket", "no_path", "peer_unavailable", "not_authorized",
                   "invalid_request", "peer_not_connected", "timeout", "qos_not_met", "unavailable")
RELAY_REJECTION_REASONS = ("tampered", "replayed", "unknown_session", "bad_material", "malformed", "no_route",
                           "unknown_relay", "fallback_not_allowed")


def refusal_reason(error: errors.KMError) -> str:
    """The refusal-reason label of a KM error (most specific class first)."""
    for cls, reason in ((TokenBucketRefusal, "token_bucket"), (errors.InsufficientKey, "insufficient_key"),
                        (errors.NoPath, "no_path"), (errors.PeerUnavailable, "peer_unavailable"),
                        (errors.NotAuthorized, "not_authorized"), (errors.Unavailable, "unavailable")):
        if isinstance(error, cls):
            return reason
    return "invalid_request"


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class KMMetrics:
    def __init__(self, km: KeyManager, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        node = km.node
        r = self.registry
        self.keys_delivered = Counter(
            "vqkd_km_keys_delivered", "Keys handed to SAEs", ["node", "role"], registry=r).labels
        self.key_bits_delivered = Counter(
            "vqkd_km_key_delivered_bits", "Key bits handed to SAEs", ["node", "role"], registry=r).labels
        self.responses = Counter(
            "vqkd_km_responses", "Application API responses by call and status code",
            ["node", "call", "code"], registry=r).labels
        self.request_seconds = Histogram(
            "vqkd_km_request_duration_seconds", "Application API request latency", ["node", "call"],
            buckets=LATENCY_BUCKETS, registry=r).labels
        self._link_drawn_bits = Counter(
            "vqkd_km_link_drawn_bits", "Key bits drawn from the QKD module into the outgoing pool",
            ["node", "link"], registry=r)
        self.link_drawn_bits = self._link_drawn_bits.labels
        self.relayed_bits = Counter(
            "vqkd_km_relayed_bits", "End-to-end key bits relayed, by this KM's role on the path",
            ["node", "role"], registry=r).labels
        self.relay_rejected = Counter(
            "vqkd_km_relay_rejected", "Relay messages refused (tampered, replayed, unknown session, ...)",
            ["node", "reason"], registry=r).labels
        self.fallback_keys = Counter(
            "vqkd_km_fallback_keys", "Keys made by the hybrid ML-KEM-768 + X25519 fallback instead of QKD",
            ["node"], registry=r).labels
        self.refusals = Counter(
            "vqkd_km_refusals", "Key requests refused, by reason (ETSI 014 and 004)", ["node", "reason"],
            registry=r).labels
        self.relay_seconds = Histogram(
            "vqkd_km_relay_duration_seconds", "From taking link key at the source to the destination's commit",
            ["node", "direct"], buckets=LATENCY_BUCKETS, registry=r).labels
        self.keys_held_once = Counter(
            "vqkd_km_keys_held_once", "Keys committed for slave SAEs while no other KM replica of the node answered: "
            "held by this replica only", ["node"], registry=r).labels
        self.copies_promoted = Counter(
            "vqkd_km_copies_promoted", "Copies of keys this KM replica handed out because the replica holding the key "
            "was gone", ["node"], registry=r).labels
        self.keys_held_once(node)
        self.copies_promoted(node)
        for reason in REFUSAL_REASONS:
            self.refusals(node, reason)
        for role in ("source", "intermediate", "destination"):
            self.relayed_bits(node, role)
        for direct in ("yes", "no"):
            self.relay_seconds(node, direct)
        for reason in RELAY_REJECTION_REASONS:
            self.relay_rejected(node, reason)
        self.fallback_keys(node)
        self.node = node
        r.register(_PoolCollector(km))
        self.exposed = CollectorRegistry()  # what /metrics serves: every series with the replica label
        self.exposed.register(_WithReplica(r, km.replica))

    def forget_link(self, link: str) -> None:
        """The link's last end is gone: its series go with it (the collector's follow ``km.links``)."""
        self._link_drawn_bits.remove(self.node, link)


class _WithReplica:
    """The series of a registry, each with the ``replica`` label added at exposition."""

    def __init__(self, registry: CollectorRegistry, replica: int):
        self.registry = registry
        self.replica = str(replica)

    def describe(self):
        return []

    def collect(self):
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, "replica": self.replica}) for s in family.samples]
            yield labelled


_WORST_FIRST = (LinkState.DOWN, LinkState.DEGRADED, LinkState.UP)


class _PoolCollector:
    """Pool levels read at scrape time, so they are never stale."""

    def __init__(self, km: KeyManager):
        self.km = km

    def describe(self):
        return []

    def collect(self):
        pool = GaugeMetricFamily("vqkd_km_pool_bits", "QKD key material held per link and direction",
                                 labels=["node", "link", "direction"])
        peer = CounterMetricFamily("vqkd_km_peer_restarts", "Restarts of the peer KM seen per link",
                                 labels=["node", "link"])
        # By reason, not by link: what a removed link had is counted after its series are gone.
        flushed = CounterMetricFamily(
            "vqkd_km_flushed_bits", "Link key material dropped: the peer KM's end of the link was new "
            "(peer_restarted), or the link was removed or reconfigured by a topology change", labels=["node", "reason"])
        taken = CounterMetricFamily(
            "vqkd_km_module_drawn_bits", "Key bits taken from this KM's QKD module end as master, agreed or not",
            labels=["node", "link"])
        burned = CounterMetricFamily(
            "vqkd_km_burned_bits", "Key bits taken from the QKD module as master and given up, by reason",
            labels=["node", "link", "reason"])
        state = GaugeMetricFamily("vqkd_km_link_state", "1 for the link's state as this KM sees it",
                                  labels=["node", "link", "state"])
        block = GaugeMetricFamily("vqkd_km_link_block_bits", "Size of the keys drawn from the QKD module now",
                                  labels=["node", "link"])
        awaiting = GaugeMetricFamily(
            "vqkd_km_awaiting_peer_bits", "Key bits drawn as master that the peer's module end has not handed over yet",
            labels=["node", "link"])
        latency = GaugeMetricFamily(
            "vqkd_km_module_seconds_per_key", "Time this KM's QKD module end takes per key to answer dec_keys",
            labels=["node", "link"])
        node = self.km.node
        ends_of = defaultdict(list)
        for link in self.km.links.values():
            ends_of[link.name].append(link)
        for name, ends in ends_of.items():
            pool.add_metric([node, name, "outgoing"], sum(link.outgoing.available_bits for link in ends))
            pool.add_metric([node, name, "incoming"], sum(link.incoming.available_bits for link in ends))
            peer.add_metric([node, name], sum(link.peer_restarts for link in ends))
            taken.add_metric([node, name], sum(link.module_drawn_bits for link in ends))
            for reason in BURN_REASONS:
                burned.add_metric([node, name, reason], sum(link.burned_bits.get(reason, 0) for link in ends))
            states = {link.devices.health.verdict().state for link in ends}
            worst = next(s for s in _WORST_FIRST if s in states)
            for s in LinkState:
                state.add_metric([node, name, s.value], float(s is worst))
            # All ends draw from the same module end: its block size and latency are the largest seen.
            block.add_metric([node, name], max(link.devices.block_bits or 0 for link in ends))
            latency.add_metric([node, name], max(link.devices.seconds_per_key or 0.0 for link in ends))
            awaiting.add_metric([node, name], sum(link.devices.awaiting_peer_bits for link in ends))
        for reason, bits in self.km.flushed_bits().items():
            flushed.add_metric([node, reason], bits)
        store = GaugeMetricFamily("vqkd_km_stored_key_bits", "Key bits waiting for slave SAEs", labels=["node"])
        store.add_metric([node], self.km.store.bits)
        yield from (pool, peer, flushed, taken, burned, state, block, latency, awaiting, store)
