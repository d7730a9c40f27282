"""The control plane's gRPC side, shared by both runtimes through the control-plane host.

``GrpcKMs`` is the host's way to the KMs: every call goes to one KM instance, replica
``replica`` of a node's KMs — session configuration (which the host fans out to every
replica of a node), topologies (the topology pusher's ``TopologyClient``) and stats.
``ControlPlaneService`` answers the KMs' calls (paper Fig. 2a: open, key-request signal,
close) by handing them to the control core, which thinks in nodes: any replica of a node
speaks for it. Both use mutual TLS: the control plane presents a ``controller`` identity and
accepts only KM identities, each KM (every replica of a node presents the node's) speaking
only for its own node.
"""

from __future__ import annotations

from typing import Callable

import grpc

from vqkd.km import identity
from vqkd.km.config import KMTopology
from vqkd.km.rpc.control_service import topology_to_pb
from vqkd.km.rpc.credentials import grpc_channel_credentials, peer_identity
from vqkd.km.tls import TLSFiles
from vqkd.km.v1 import km_pb2, km_pb2_grpc
from vqkd.operator.control.access import Credentials
from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.session_config import KMSessionConfig
from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.resources.models import QoS

PUSH_TIMEOUT_S = 5.0


def config_to_pb(c: KMSessionConfig) -> km_pb2.SessionConfig:
    return km_pb2.SessionConfig(
        session_id=c.session_id, version=c.version, role=km_pb2.Role.Value(c.role.value), user=c.user,
        source=km_pb2.Endpoint(node=c.source.node, sae_id=c.source.sae_id),
        destination=km_pb2.Endpoint(node=c.destination.node, sae_id=c.destination.sae_id),
        prev_hop=c.prev_hop, next_hop=c.next_hop, priority=c.priority, rate_bps=c.rate_bps,
        bucket_bits=c.bucket_bits, inactivity_timeout_ms=c.inactivity_timeout_ms,
        request_timeout_ms=c.request_timeout_ms, key_chunk_size=c.key_chunk_size, ttl_s=c.ttl_s,
        fallback="" if c.fallback in ("", "none") else c.fallback,
    )


class GrpcKMs:
    """The host's KM client over gRPC; ``resolve(node, replica)`` gives that KM instance's
    current gRPC address."""

    def __init__(self, resolve: Callable[[str, int], str], tls: TLSFiles):
        self.resolve = resolve
        self.credentials = grpc_channel_credentials(tls)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, node: str, replica: int) -> km_pb2_grpc.KeyManagerControlStub:
        address = self.resolve(node, replica)
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.secure_channel(address, self.credentials, options=[
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)])
            self._channels[address] = channel
        return km_pb2_grpc.KeyManagerControlStub(channel)

    async def configure_topology(self, node: str, replica: int, topology: KMTopology,
                                 version: int) -> km_pb2.ConfigureTopologyReply:
        return await self._stub(node, replica).ConfigureTopology(topology_to_pb(topology, node, version),
                                                                 timeout=PUSH_TIMEOUT_S)

    async def configure(self, node: str, replica: int, config: KMSessionConfig) -> None:
        await self._stub(node, replica).ConfigureSession(config_to_pb(config), timeout=PUSH_TIMEOUT_S)

    async def delete(self, node: str, replica: int, session_id: str, reason: str) -> None:
        await self._stub(node, replica).DeleteSession(
            km_pb2.DeleteSessionRequest(session_id=session_id, reason=reason), timeout=PUSH_TIMEOUT_S)

    async def stats(self, node: str, replica: int, timeout: float = 2.0) -> km_pb2.Stats:
        return await self._stub(node, replica).GetStats(km_pb2.GetStatsRequest(), timeout=timeout)

    async def sessions(self, node: str, replica: int, timeout: float = 2.0) -> km_pb2.ListSessionsReply:
        return await self._stub(node, replica).ListSessions(km_pb2.ListSessionsRequest(), timeout=timeout)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def qos_from_pb(q: km_pb2.QoS) -> QoS | None:
    """Zero means unset in the proto; unset fields take the user's defaults in the core."""
    fields = {
        "key_chunk_size": q.key_chunk_size or None, "max_bps": int(q.max_bps) or None,
        "min_bps": int(q.min_bps) or None, "jitter": int(q.jitter) or None, "priority": q.priority or None,
        "timeout": q.timeout_ms or None, "ttl": q.ttl_s or None, "fallback": q.fallback or None,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    return QoS.model_validate(fields) if fields else None


def qos_to_pb(q: QoS | None) -> km_pb2.QoS:
    if q is None:
        return km_pb2.QoS()
    return km_pb2.QoS(
        key_chunk_size=q.key_chunk_size or 0, max_bps=q.max_bps or 0, min_bps=q.min_bps or 0, jitter=q.jitter or 0,
        priority=q.priority or 0, timeout_ms=q.timeout or 0, ttl_s=q.ttl or 0,
        fallback="" if q.fallback in (None, "none") else str(q.fallback),
    )


class ControlPlaneService(km_pb2_grpc.ControlPlaneServicer):
    def __init__(self, core: ControlCore):
        self.core = core

    async def _node(self, request, context) -> str:
        caller = peer_identity(context)
        if caller is None or caller.kind is not identity.PrincipalKind.KM or caller.name != request.node:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"only the KM of node {request.node!r} may speak for it, not {caller}")
        return request.node

    async def OpenSession(self, request, context):
        node = await self._node(request, context)
        try:
            qos = qos_from_pb(request.qos)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"QoS: {e}")
        result = await self.core.open_session(
            node, Credentials(sae_id=request.caller_sae_id),
            Endpoint(request.source.node, request.source.sae_id),
            Endpoint(request.destination.node, request.destination.sae_id),
            qos=qos, session_id=request.session_id or None, implicit=request.implicit,
        )
        return km_pb2.OpenSessionReply(
            accepted=result.accepted, session_id=result.session_id,
            reason=f"{result.reason}: {result.message}" if result.message else result.reason,
            qos=qos_to_pb(result.qos), peer_registered=result.peer_registered,
            etsi004_status=result.etsi004_status, unauthorized=result.unauthorized,
        )

    async def KeyRequested(self, request, context):
        node = await self._node(request, context)
        await self.core.key_requested(request.session_id, node, max(1, request.requests))
        return km_pb2.SignalReply()

    async def SessionClosed(self, request, context):
        node = await self._node(request, context)
        await self.core.session_closed(request.session_id, node, request.reason)
        return km_pb2.SignalReply()
