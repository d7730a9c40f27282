"""The monitoring element's eyes: reads the KMs' stats and the QKD modules' metrics.

One round asks every KM instance (each replica of each node's KMs) for its stats over gRPC
and scrapes every module's ``/metrics``, concurrently, and returns what they said as raw
numbers: per instance its stats (or why it did not answer), per link a ``LinkReading`` with
what every end of it drew, holds and gave up — a node's KMs have an end of the link per
replica of the peer node, so a link of nodes with n and m replicas has 2·n·m ends — the
state they report for it (a link serves while one pair of its KMs does), and what its module
reports.
Interpreting them — rates, idle or broken, down or replaced — is the monitoring element's
and the host's business, not this adapter's.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from vqkd.km.domain.vocabulary import LinkState
from vqkd.km.v1 import km_pb2
from vqkd.operator.control.monitoring import KMReport, LinkReading, ModuleReading

STATS_TIMEOUT_S = 2.0
SCRAPE_TIMEOUT_S = 2.0
SEVERITY = {LinkState.UP: 0, LinkState.DEGRADED: 1, LinkState.DOWN: 2}


class KMStats(Protocol):
    async def stats(self, node: str, replica: int, timeout: float = STATS_TIMEOUT_S) -> km_pb2.Stats:
        """The stats of replica ``replica`` of the KMs of ``node``; raises when it does not answer in time."""


@dataclass(frozen=True)
class Round:
    """What one round read: each KM instance's stats or the error it answered with, and each
    link's counters."""

    stats: dict[tuple[str, int], km_pb2.Stats | Exception]
    links: list[LinkReading]


async def read_km(kms: KMStats, node: str, replica: int) -> km_pb2.Stats | Exception:
    try:
        return await kms.stats(node, replica, STATS_TIMEOUT_S)
    except Exception as e:  # every way a KM can fail to answer is an answer here
        return e


async def read_round(kms: KMStats, replicas: Mapping[str, int], links: Mapping[str, tuple[str, str]],
                     module_metrics: Mapping[str, str], clock: Callable[[], float]) -> Round:
    """Read every KM instance (``replicas``: node -> how many) and every module in
    ``module_metrics`` (link -> URL) once."""
    instances = [(node, replica) for node, count in replicas.items() for replica in range(count)]
    answers = await asyncio.gather(*(read_km(kms, node, replica) for node, replica in instances))
    stats = dict(zip(instances, answers))
    scraped = await asyncio.gather(*(asyncio.to_thread(scrape_module, url) for url in module_metrics.values()),
                                   return_exceptions=True)
    modules = {link: reading for link, reading in zip(module_metrics, scraped) if isinstance(reading, ModuleReading)}
    at = clock()
    readings = []
    for link, (a, b) in links.items():
        by_instance = [(node, replica, ls) for (node, replica), s in stats.items()
                       if node in (a, b) and isinstance(s, km_pb2.Stats) for ls in s.links if ls.link == link]
        per_end = [ls for _, _, ls in by_instance]
        ends = 2 * replicas.get(a, 1) * replicas.get(b, 1)
        readings.append(LinkReading(
            link=link, at=at, drawn_bits=float(sum(ls.drawn_bits_total for ls in per_end)),
            pool_bits=sum(ls.outgoing_bits + ls.incoming_bits for ls in per_end), module=modules.get(link),
            reported=link_report(a, by_instance),
            burned_bits=sum(sum(ls.burned_bits_total.values()) for ls in per_end),
            pools_full=len(per_end) == ends and all(ls.pool_full for ls in per_end)))
    return Round(stats, readings)


def link_report(a: str, ends: list[tuple[str, int, km_pb2.LinkStats]]) -> KMReport | None:
    """The link's state from its ends (node, replica, stats): per pair of KM replicas across it
    the worse of its two ends, and of the pairs the best — requests pass over the ends whose
    peer replica is away, so the link serves while one pair does. With one KM at each node,
    the worse of its two ends. An end that reports no state says nothing."""
    pairs: dict[tuple[int, int], list[KMReport]] = {}
    for node, replica, ls in ends:
        if ls.state in SEVERITY:
            pair = (replica, ls.peer_replica) if node == a else (ls.peer_replica, replica)
            pairs.setdefault(pair, []).append(KMReport(LinkState(ls.state), ls.reason, ls.message))
    worst = [max(reports, key=lambda report: SEVERITY[report.state]) for _, reports in sorted(pairs.items())]
    return min(worst, key=lambda report: SEVERITY[report.state], default=None)


def scrape_module(url: str) -> ModuleReading:
    """A module's metrics (a module serves one link, so every family is summed over its labels)."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:
        text = resp.read().decode()
    return module_reading(text)


def module_reading(text: str) -> ModuleReading:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return ModuleReading(
        generated_bits=values.get("vqkd_module_generated_bits_total"),
        buffer_bits=values.get("vqkd_module_buffer_bits", 0.0),
        buffer_capacity_bits=values.get("vqkd_module_buffer_capacity_bits", 0.0),
        secret_key_rate_bps=values.get("vqkd_module_secret_key_rate_bits_per_second", 0.0),
        qber=values.get("vqkd_module_qber"),
    )
