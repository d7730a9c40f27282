"""The topology pusher: every KM's topology, pushed live as the network changes.

A KM starts with its identity only. What changes with the network — its SAE directory, its
links, its key limits (``KMTopology``) — the control plane pushes over
KeyManagerControl.ConfigureTopology, and the KM applies it without a restart.

The runtime hands over, once, the live object holding its declared resources and its
addressing (``track``). ``refresh`` plans each declared node's topology with the network
plan and pushes it to every KM whose topology changed since its last confirmed push; the
others get nothing. A KM is pushed again, unchanged, when it needs it: a new instance (its
incarnation changed), one reporting a version below the one pushed, one holding none. A
push that fails is owed, and made again once the KM answers (the host asks at every tick).

Versions come from ``next_version`` (milliseconds of the wall clock), so a restarted control
plane pushes above what its predecessor did. A KM holding a newer version than offered
answers with it; the push is made again above it.

Order with sessions: a session's configuration names hops the KM must hold as links, so the
host settles a KM's topology before every session push to it (``settle``). Removal runs the
other way round: a runtime drops a link or node from its declared resources only once the
control core has rerouted the sessions off it, so the push removing it from the KMs comes
after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vqkd.km.config import KMTopology
from vqkd.km.v1 import km_pb2
from vqkd.operator.control.session_config import next_version
from vqkd.operator.plan import Addressing, DeclaredNetwork, PlanError, km_topology

log = logging.getLogger(__name__)


class TopologyClient(Protocol):
    async def configure_topology(self, node: str, topology: KMTopology,
                                 version: int) -> km_pb2.ConfigureTopologyReply:
        """Push ``topology`` as ``version`` to the KM of ``node``; the reply names the version it
        holds afterwards (a newer one it already held wins) and its incarnation."""


@dataclass(frozen=True, slots=True)
class HeldTopology:
    """What a KM confirmed holding: the planned topology, under the version pushed, by which instance."""

    topology: KMTopology  # as planned, version 0
    version: int
    incarnation: str


class TopologyPusher:
    def __init__(self, kms: TopologyClient, *, clock: Callable[[], float] = time.time,
                 observe: Callable[[float], None] = lambda seconds: None):
        self.kms = kms
        self.clock = clock  # wall time: versions must outlast the process
        self.observe = observe  # seconds each confirmed push took
        self.network: DeclaredNetwork | None = None
        self.addressing: Addressing | None = None
        self._version = 0
        self._held: dict[str, HeldTopology] = {}
        self._owed: dict[str, str] = {}  # node -> why its KM needs a push whatever its topology
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def track(self, network: DeclaredNetwork, addressing: Addressing) -> None:
        """Plan the KMs' topologies from ``network`` (read afresh at each push) and ``addressing``.

        The runtime keeps ``network`` current: a resource goes in once the control core took it,
        and comes out once the core deleted it. ``addressing`` must know every declared node and
        emulated link.
        """
        self.network, self.addressing = network, addressing

    def declared(self) -> list[str]:
        """The nodes of the tracked network, whose KMs get a topology."""
        return sorted(self.network.nodes) if self.network is not None else []

    def _declares(self, node: str) -> bool:
        return self.network is not None and node in self.network.nodes

    async def refresh(self) -> None:
        """Push each declared node's topology to its KM where it changed or is owed, all at
        once; returns when every KM that answers has confirmed."""
        nodes = self.declared()
        for gone in set(self._held) | set(self._owed) | set(self._locks):
            if gone not in nodes:
                self._forget(gone)
        await asyncio.gather(*(self.settle(node) for node in nodes))

    async def settle(self, node: str) -> bool:
        """Bring the KM of ``node`` to its current topology; True once it holds it (or ``node``
        is not declared, so it has none to hold)."""
        if not self._declares(node):
            return True
        async with self._locks[node]:
            try:
                wanted = km_topology(self.network, node, self.addressing)
            except PlanError as e:
                self._owe(node, f"cannot plan its topology: {e}")
                return False
            held = self._held.get(node)
            if held is not None and held.topology == wanted and node not in self._owed:
                return True
            return await self._push(node, wanted)

    async def _push(self, node: str, wanted: KMTopology) -> bool:
        started = time.perf_counter()
        try:
            reply = await self._offer(node, wanted)
        except Exception as e:  # whatever the transport's reason, the push is owed
            self._owe(node, f"push failed: {type(e).__name__}: {_details(e)}")
            return False
        self.observe(time.perf_counter() - started)
        self._held[node] = HeldTopology(wanted, reply.version, reply.incarnation)
        self._owed.pop(node, None)
        log.info("the KM of %s holds topology version %d: %d links, %d SAEs", node, reply.version,
                 len(wanted.links), len(wanted.saes))
        return True

    async def _offer(self, node: str, wanted: KMTopology) -> km_pb2.ConfigureTopologyReply:
        version = self._version = next_version(self._version, self.clock())
        reply = await self.kms.configure_topology(node, wanted, version)
        if reply.version > version:
            # The KM held a newer version (pushed by a control plane whose clock ran ahead): it kept
            # that one, so offer this topology above it.
            version = self._version = next_version(max(self._version, reply.version), self.clock())
            reply = await self.kms.configure_topology(node, wanted, version)
        if reply.version != version:
            raise RuntimeError(f"the KM holds version {reply.version}, not {version} as pushed")
        return reply

    def observed(self, node: str, incarnation: str, version: int) -> bool:
        """What the host saw of the KM of ``node``: its incarnation and the topology version it
        holds (0: none). True when it is owed a push."""
        if not self._declares(node):
            return False
        held = self._held.get(node)
        if held is None:
            self._owed.setdefault(node, "no topology pushed to it yet")
        elif held.incarnation != incarnation:
            self._owed[node] = f"a new instance (incarnation {incarnation[:8]})"
        elif version < held.version:
            self._owed[node] = f"it holds topology version {version}, below {held.version} pushed"
        return node in self._owed

    def due(self) -> list[str]:
        """The declared nodes whose KM is owed a push."""
        return [node for node in self.declared() if node in self._owed]

    def unconfirmed(self) -> dict[str, str]:
        """The declared nodes whose KM has not confirmed its topology, and why."""
        return {node: self._owed.get(node, "not pushed yet") for node in self.declared()
                if node in self._owed or node not in self._held}

    def held(self, node: str) -> HeldTopology | None:
        """What the KM of ``node`` last confirmed holding."""
        return self._held.get(node)

    def _owe(self, node: str, why: str) -> None:
        # Logged once per reason: a KM that stays away is asked again at every tick.
        if self._owed.get(node) != why:
            log.warning("the KM of %s is owed its topology: %s; pushing again once it answers", node, why)
        self._owed[node] = why

    def _forget(self, node: str) -> None:
        self._held.pop(node, None)
        self._owed.pop(node, None)
        lock = self._locks.get(node)
        if lock is not None and not lock.locked():
            del self._locks[node]


def _details(error: Exception) -> str:
    details = getattr(error, "details", None)
    return (details() if callable(details) else None) or str(error)
