"""The topology pusher: every KM's topology, pushed live as the network changes.

It works per KM instance, ``(node, replica)``: each replica of a node's KMs holds the node's
topology (the same for all of them) under its own version and incarnation, and is pushed on
its own. A KM starts with its identity only. What changes with the network — its SAE directory, its
links, its key limits (``KMTopology``) — the control plane pushes over
KeyManagerControl.ConfigureTopology, and the KM applies it without a restart.

The runtime hands over, once, the live object holding its declared resources and its
addressing (``track``). ``refresh`` plans each declared node's topology with the network
plan and pushes it to every KM instance (each replica ``spec.km.replicas`` declares) whose
topology changed since its last confirmed push; the others get nothing. A KM is pushed again, unchanged, when it needs it: a new instance (its
incarnation changed), one reporting a version below the one pushed, one holding none. A
push that fails is owed, and made again once the KM answers (the host asks at every tick).

Versions come from ``next_version`` (milliseconds of the wall clock), so a restarted control
plane pushes above what its predecessor did. A KM holding a newer version than offered
answers with it; the push is made again above it.

Order with sessions: a session's configuration names hops the KM must hold as links, so the
host settles a KM instance's topology before every session push to it (``settle``). Removal runs the
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
from vqkd.operator.plan import Addressing, DeclaredNetwork, PlanError, km_topology, replicas_of

log = logging.getLogger(__name__)

KMInstance = tuple[str, int]  # (node, replica): one KM process, the unit pushed, watched and replaced


def instance_name(node: str, replica: int) -> str:
    """How logs and messages name one KM instance: ``a/0`` is replica 0 of node a's KMs."""
    return f"{node}/{replica}"


def declared_instances(network: DeclaredNetwork) -> list[KMInstance]:
    """Every KM instance the network declares: each replica of each node, in order."""
    return [(node, replica) for node in sorted(network.nodes) for replica in replicas_of(network, node)]


class TopologyClient(Protocol):
    async def configure_topology(self, node: str, replica: int, topology: KMTopology,
                                 version: int) -> km_pb2.ConfigureTopologyReply:
        """Push ``topology`` as ``version`` to replica ``replica`` of the KMs of ``node``; the reply
        names the version it holds afterwards (a newer one it already held wins) and its incarnation."""


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
        self._held: dict[KMInstance, HeldTopology] = {}
        self._owed: dict[KMInstance, str] = {}  # why the instance needs a push whatever its topology
        self._locks: dict[KMInstance, asyncio.Lock] = defaultdict(asyncio.Lock)

    def track(self, network: DeclaredNetwork, addressing: Addressing) -> None:
        """Plan the KMs' topologies from ``network`` (read afresh at each push) and ``addressing``.

        The runtime keeps ``network`` current: a resource goes in once the control core took it,
        and comes out once the core deleted it. ``addressing`` must know every declared KM
        instance and emulated link.
        """
        self.network, self.addressing = network, addressing

    def declared(self) -> list[KMInstance]:
        """The KM instances of the tracked network, each of which gets its node's topology."""
        return declared_instances(self.network) if self.network is not None else []

    def _declares(self, node: str, replica: int) -> bool:
        return self.network is not None and node in self.network.nodes and replica in replicas_of(self.network, node)

    async def refresh(self) -> None:
        """Push each declared KM instance its node's topology where it changed or is owed, all
        at once; returns when every instance that answers has confirmed."""
        instances = self.declared()
        for gone in set(self._held) | set(self._owed) | set(self._locks):
            if gone not in instances:
                self._forget(gone)
        await asyncio.gather(*(self.settle(node, replica) for node, replica in instances))

    async def settle(self, node: str, replica: int) -> bool:
        """Bring replica ``replica`` of the KMs of ``node`` to its current topology; True once it
        holds it (or it is not declared, so it has none to hold)."""
        if not self._declares(node, replica):
            return True
        instance = (node, replica)
        async with self._locks[instance]:
            try:
                wanted = km_topology(self.network, node, self.addressing)
            except PlanError as e:
                self._owe(instance, f"cannot plan its topology: {e}")
                return False
            held = self._held.get(instance)
            if held is not None and held.topology == wanted and instance not in self._owed:
                return True
            return await self._push(instance, wanted)

    async def _push(self, instance: KMInstance, wanted: KMTopology) -> bool:
        started = time.perf_counter()
        try:
            reply = await self._offer(instance, wanted)
        except Exception as e:  # whatever the transport's reason, the push is owed
            self._owe(instance, f"push failed: {type(e).__name__}: {_details(e)}")
            return False
        self.observe(time.perf_counter() - started)
        self._held[instance] = HeldTopology(wanted, reply.version, reply.incarnation)
        self._owed.pop(instance, None)
        log.info("the KM %s holds topology version %d: %d link ends, %d SAEs", instance_name(*instance),
                 reply.version, len(wanted.links), len(wanted.saes))
        return True

    async def _offer(self, instance: KMInstance, wanted: KMTopology) -> km_pb2.ConfigureTopologyReply:
        node, replica = instance
        version = self._version = next_version(self._version, self.clock())
        reply = await self.kms.configure_topology(node, replica, wanted, version)
        if reply.version > version:
            # The KM held a newer version (pushed by a control plane whose clock ran ahead): it kept
            # that one, so offer this topology above it.
            version = self._version = next_version(max(self._version, reply.version), self.clock())
            reply = await self.kms.configure_topology(node, replica, wanted, version)
        if reply.version != version:
            raise RuntimeError(f"the KM holds version {reply.version}, not {version} as pushed")
        return reply

    def observed(self, node: str, replica: int, incarnation: str, version: int) -> bool:
        """What the host saw of one KM instance: its incarnation and the topology version it
        holds (0: none). True when it is owed a push."""
        if not self._declares(node, replica):
            return False
        instance = (node, replica)
        held = self._held.get(instance)
        if held is None:
            self._owed.setdefault(instance, "no topology pushed to it yet")
        elif held.incarnation != incarnation:
            self._owed[instance] = f"a new instance (incarnation {incarnation[:8]})"
        elif version < held.version:
            self._owed[instance] = f"it holds topology version {version}, below {held.version} pushed"
        return instance in self._owed

    def due(self) -> list[KMInstance]:
        """The declared KM instances owed a push."""
        return [instance for instance in self.declared() if instance in self._owed]

    def unconfirmed(self) -> dict[KMInstance, str]:
        """The declared KM instances that have not confirmed their topology, and why."""
        return {instance: self._owed.get(instance, "not pushed yet") for instance in self.declared()
                if instance in self._owed or instance not in self._held}

    def held(self, node: str, replica: int = 0) -> HeldTopology | None:
        """What replica ``replica`` of the KMs of ``node`` last confirmed holding."""
        return self._held.get((node, replica))

    def _owe(self, instance: KMInstance, why: str) -> None:
        # Logged once per reason: a KM that stays away is asked again at every tick.
        if self._owed.get(instance) != why:
            log.warning("the KM %s is owed its topology: %s; pushing again once it answers",
                        instance_name(*instance), why)
        self._owed[instance] = why

    def _forget(self, instance: KMInstance) -> None:
        self._held.pop(instance, None)
        self._owed.pop(instance, None)
        lock = self._locks.get(instance)
        if lock is not None and not lock.locked():
            del self._locks[instance]


def _details(error: Exception) -> str:
    details = getattr(error, "details", None)
    return (details() if callable(details) else None) or str(error)
