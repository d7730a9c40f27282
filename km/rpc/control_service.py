"""gRPC KeyManagerControl: how the control plane configures this KM's topology and sessions.

Only a ``controller`` identity may call it. Every call is idempotent: a configuration
carries a version and one not newer than what the KM holds changes nothing, so the control
plane can push everything again to a KM that was replaced.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc

from vqkd.km import identity
from vqkd.km.domain.links import Link
from vqkd.km.config import InvalidTopology, KeyLimits, KMTopology, LinkEndConfig, TLSPaths, parse_topology
from vqkd.km.domain.sessions import InvalidConfiguration, SessionConfig, SessionTable
from vqkd.km.domain.vocabulary import Endpoint, Role
from vqkd.km.rpc.credentials import peer_identity
from vqkd.km.v1 import km_pb2, km_pb2_grpc

if TYPE_CHECKING:
    from vqkd.km.domain.keymanager import KeyManager

DEFAULT_INACTIVITY_MS = 60_000
DEFAULT_REQUEST_TIMEOUT_MS = 5_000
DEFAULT_TTL_S = 3600


def config_from_pb(pb: km_pb2.SessionConfig) -> SessionConfig:
    if pb.role == km_pb2.ROLE_UNSPECIFIED:
        raise InvalidConfiguration(f"session {pb.session_id or '?'}: role must be SOURCE, INTERMEDIATE or DESTINATION")
    return SessionConfig(
        session_id=pb.session_id, version=pb.version, role=Role(km_pb2.Role.Name(pb.role)), user=pb.user,
        source=Endpoint(pb.source.node, pb.source.sae_id),
        destination=Endpoint(pb.destination.node, pb.destination.sae_id),
        prev_hop=pb.prev_hop, next_hop=pb.next_hop, priority=pb.priority,
        rate_bps=pb.rate_bps, bucket_bits=pb.bucket_bits,
        inactivity_timeout_s=(pb.inactivity_timeout_ms or DEFAULT_INACTIVITY_MS) / 1000,
        request_timeout_s=(pb.request_timeout_ms or DEFAULT_REQUEST_TIMEOUT_MS) / 1000,
        key_chunk_size=pb.key_chunk_size, ttl_s=pb.ttl_s or DEFAULT_TTL_S, fallback=pb.fallback,
    )


def config_to_pb(c: SessionConfig) -> km_pb2.SessionConfig:
    return km_pb2.SessionConfig(
        session_id=c.session_id, version=c.version, role=km_pb2.Role.Value(c.role.value), user=c.user,
        source=km_pb2.Endpoint(node=c.source.node, sae_id=c.source.sae_id),
        destination=km_pb2.Endpoint(node=c.destination.node, sae_id=c.destination.sae_id),
        prev_hop=c.prev_hop, next_hop=c.next_hop, priority=c.priority, rate_bps=c.rate_bps,
        bucket_bits=c.bucket_bits, inactivity_timeout_ms=round(c.inactivity_timeout_s * 1000),
        request_timeout_ms=round(c.request_timeout_s * 1000), key_chunk_size=c.key_chunk_size,
        ttl_s=round(c.ttl_s), fallback=c.fallback,
    )


def topology_from_pb(pb: km_pb2.TopologyConfig, node: str, replica: int = 0) -> KMTopology:
    """A pushed topology for ``node``'s KM replica ``replica``; ``InvalidTopology`` naming the
    field if it is not one.

    Zero numbers, empty strings and unset messages are left out, so the KM's defaults apply
    and a missing required field is named as such.
    """
    if pb.node != node:
        raise InvalidTopology(f"node: this topology is for node {pb.node!r}, this KM serves node {node}")
    if pb.version < 1:
        raise InvalidTopology(f"version: a pushed topology needs a version >= 1, got {pb.version}")
    data: dict = {"version": pb.version, "saes": dict(pb.saes), "links": [_set_fields(link) for link in pb.links]}
    if pb.HasField("limits"):
        data["limits"] = _set_fields(pb.limits)
    if pb.replicas:
        data["replicas"] = dict(pb.replicas)
    return parse_topology(data, node, replica)


def _set_fields(message) -> dict:
    """The fields of a proto message that are set, nested messages as dicts."""
    return {field.name: _set_fields(value) if field.message_type else value
            for field, value in message.ListFields()}


def topology_to_pb(topology: KMTopology, node: str, version: int | None = None) -> km_pb2.TopologyConfig:
    """What the control plane pushes to ``node``'s KM; ``version`` overrides the topology's own."""
    return km_pb2.TopologyConfig(
        version=topology.version if version is None else version, node=node, saes=topology.saes,
        links=[_link_end_to_pb(link) for link in topology.links], limits=_limits_to_pb(topology.limits),
        replicas=topology.replicas,
    )


def _link_end_to_pb(link: LinkEndConfig) -> km_pb2.LinkEnd:
    return km_pb2.LinkEnd(
        name=link.name, peer_node=link.peer_node, peer_kme_id=link.peer_kme_id, peer_grpc=link.peer_grpc,
        module_url=link.module_url, module_sae_id=link.module_sae_id, peer_module_sae_id=link.peer_module_sae_id,
        module_tls=_tls_to_pb(link.module_tls) if link.module_tls else None,
        block_bits=link.block_bits, pool_target_bits=link.pool_target_bits, peer_replica=link.peer_replica,
    )


def _tls_to_pb(tls: TLSPaths) -> km_pb2.TLSPaths:
    return km_pb2.TLSPaths(ca=str(tls.ca), cert=str(tls.cert), key=str(tls.key))


def _limits_to_pb(limits: KeyLimits) -> km_pb2.KeyLimits:
    return km_pb2.KeyLimits(key_size=limits.key_size, min_key_size=limits.min_key_size,
                            max_key_size=limits.max_key_size, max_key_per_request=limits.max_key_per_request)


class KeyManagerControlService(km_pb2_grpc.KeyManagerControlServicer):
    """``configure_topology`` applies a topology live and returns the version held afterwards."""

    def __init__(self, km: KeyManager, sessions: SessionTable,
                 configure_topology: Callable[[KMTopology], Awaitable[int]]):
        self.km = km
        self.sessions = sessions
        self.configure_topology = configure_topology

    async def _authorize(self, context) -> None:
        caller = peer_identity(context)
        if caller is None or caller.kind is not identity.PrincipalKind.CONTROLLER:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"only the control plane (vqkd://controller/...) may configure KMs, not {caller}")

    async def ConfigureTopology(self, request, context):
        await self._authorize(context)
        try:
            topology = topology_from_pb(request, self.km.node, self.km.config.replica)
        except InvalidTopology as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"topology version {request.version} for node {self.km.node} refused: {e}")
        version = await self.configure_topology(topology)
        return km_pb2.ConfigureTopologyReply(version=version, incarnation=self.km.incarnation)

    async def ConfigureSession(self, request, context):
        await self._authorize(context)
        try:
            config = config_from_pb(request)
            config.validate(self.km.node, set(self.km.link_to))
        except InvalidConfiguration as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        session = self.sessions.configure(config)
        return km_pb2.ConfigureSessionReply(state=session.state.value, version=session.config.version)

    async def DeleteSession(self, request, context):
        await self._authorize(context)
        if not request.session_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "DeleteSession needs a session_id")
        session = self.sessions.terminate(request.session_id, f"deletion signal: {request.reason or 'control plane'}")
        return km_pb2.DeleteSessionReply(existed=session is not None,
                                         keys_delivered=session.keys_delivered if session else 0)

    async def ListSessions(self, request, context):
        await self._authorize(context)
        now = self.sessions.clock()
        return km_pb2.ListSessionsReply(sessions=[
            km_pb2.SessionInfo(
                config=config_to_pb(s.config), state=s.state.value, keys_delivered=s.keys_delivered,
                bits_delivered=s.bits_delivered, refused_by_bucket=s.refused_by_bucket,
                last_activity_age_s=now - s.last_activity,
            )
            for s in self.sessions.sessions.values() if s.config is not None
        ])

    async def GetStats(self, request, context):
        await self._authorize(context)
        return km_pb2.Stats(
            node=self.km.node, incarnation=self.km.incarnation, topology_version=self.km.topology_version or 0,
            replica=self.km.replica,
            sessions=len(self.sessions.sessions),
            keys_delivered_total=sum(s.keys_delivered for s in self.sessions.sessions.values()),
            delivered=[km_pb2.SessionDelivered(session_id=s.session_id, keys=s.keys_delivered, bits=s.bits_delivered)
                       for s in self.sessions.sessions.values() if s.keys_delivered],
            links=[link_stats(link) for link in self.km.links.values()],
        )


def link_stats(link: Link) -> km_pb2.LinkStats:
    verdict = link.devices.health.verdict()
    return km_pb2.LinkStats(
        link=link.name, peer_node=link.peer_node, outgoing_bits=link.outgoing.available_bits,
        incoming_bits=link.incoming.available_bits, drawn_bits_total=link.drawn_bits,
        relayed_bits_total=link.relayed_bits, state=verdict.state.value, reason=verdict.reason,
        message=verdict.message, module_drawn_bits_total=link.module_drawn_bits,
        burned_bits_total=link.burned_bits, block_bits=link.devices.block_bits or 0, incarnation=link.incarnation,
        pool_full=link.pool_full, peer_replica=link.peer_replica,
    )
