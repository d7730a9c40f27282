"""The monitoring element's eyes: polls KMs and QKD modules and feeds the control core.

Per link, each poll yields a ``LinkSample``: the secret key the module produced per second
since the last poll (from its ``vqkd_module_generated_bits_total``; for a device without
metrics, what the two KMs drew), its QBER when the module reports one, the key waiting in
the module and both KM pools, and what the KMs drew per second (the load). A KM that does
not answer is reported down to the core, and up again when it answers — with a new
incarnation meaning it was replaced and must get its sessions pushed again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.monitoring import LinkSample
from vqkd.operator.adapters.kms import GrpcKMs

log = logging.getLogger(__name__)

BUFFER_FULL_SHARE = 0.99  # a module buffer this full has paused production


@dataclass
class _Previous:
    at: float
    generated_bits: float | None
    drawn_bits: float


@dataclass
class LinkMonitor:
    core: ControlCore
    kms: GrpcKMs
    nodes: list[str]
    links: dict[str, tuple[str, str]]  # link -> its two nodes
    module_metrics: dict[str, str] = field(default_factory=dict)  # link -> module /metrics URL
    clock: Callable[[], float] = time.time
    on_replaced: Callable[[str], None] = lambda node: None
    _previous: dict[str, _Previous] = field(default_factory=dict)
    _incarnations: dict[str, str] = field(default_factory=dict)
    _down: set[str] = field(default_factory=set)

    async def poll(self) -> None:
        stats = dict(zip(self.nodes, await asyncio.gather(
            *(self.kms.stats(node) for node in self.nodes), return_exceptions=True)))
        for node, result in stats.items():
            await self._liveness(node, result)
        modules = dict(zip(self.module_metrics, await asyncio.gather(
            *(asyncio.to_thread(_scrape, url) for url in self.module_metrics.values()), return_exceptions=True)))
        now = self.clock()
        for link, (a, b) in self.links.items():
            ends = [s for s in (stats.get(a), stats.get(b)) if not isinstance(s, BaseException) and s is not None]
            per_end = [ls for s in ends for ls in s.links if ls.link == link]
            module = modules.get(link)
            if isinstance(module, BaseException):
                module = None
            sample = self._sample(link, now, per_end, module)
            if sample is not None:
                await self.core.link_sample(sample)

    async def _liveness(self, node: str, result) -> None:
        if isinstance(result, BaseException):
            if node not in self._down:
                self._down.add(node)
                await self.core.node_down(node, "KMUnreachable", f"KM of {node} does not answer: {result}")
            return
        replaced = node in self._incarnations and self._incarnations[node] != result.incarnation
        self._incarnations[node] = result.incarnation
        self.core.keys_issued(node, result.incarnation, ((d.session_id, d.keys, d.bits) for d in result.delivered))
        if node in self._down or replaced:
            self._down.discard(node)
            await self.core.node_up(node, "KMReplaced" if replaced else "KMReady",
                                    f"KM of {node} answers (incarnation {result.incarnation[:8]})")
            if replaced:
                self.on_replaced(node)

    def _sample(self, link: str, now: float, per_end, module: dict | None) -> LinkSample | None:
        drawn = float(sum(ls.drawn_bits_total for ls in per_end))
        generated = module.get("vqkd_module_generated_bits_total") if module else None
        previous = self._previous.get(link)
        self._previous[link] = _Previous(now, generated, drawn)
        if previous is None or now <= previous.at:
            return None
        dt = now - previous.at
        load = max(0.0, drawn - previous.drawn_bits) / dt
        if generated is not None and previous.generated_bits is not None:
            rate = max(0.0, generated - previous.generated_bits) / dt
            if rate == 0 and _buffer_full(module):
                # Nobody drew key, so the module stopped at its bound: the link is idle, not
                # broken. Its own figure for what it would produce stands in for the measurement.
                rate = module.get("vqkd_module_secret_key_rate_bits_per_second", 0.0)
        else:
            rate = load
        pools = sum(ls.outgoing_bits + ls.incoming_bits for ls in per_end)
        buffered = module.get("vqkd_module_buffer_bits", 0) if module else 0
        return LinkSample(link=link, at=now, key_rate_bps=rate, qber=module.get("vqkd_module_qber") if module else None,
                          stored_key_bits=int(pools + buffered), load_bps=load)


def _buffer_full(module: dict[str, float]) -> bool:
    capacity = module.get("vqkd_module_buffer_capacity_bits", 0.0)
    return capacity > 0 and module.get("vqkd_module_buffer_bits", 0.0) >= capacity * BUFFER_FULL_SHARE


def _scrape(url: str) -> dict[str, float]:
    """Unlabelled totals of a module's metrics (a module serves one link)."""
    with urllib.request.urlopen(url, timeout=2) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values
