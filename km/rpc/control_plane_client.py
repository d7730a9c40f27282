"""The KM's gRPC client of the control plane (``vqkd.km.domain.control_plane``, paper Fig. 2a).

Key requests are signalled the first of a session at once, then at most one signal per
``SIGNAL_INTERVAL_S`` and session, carrying the count: the control plane's load does not
grow with the key request rate.
"""

from __future__ import annotations

import asyncio
import logging
import math

import grpc

from vqkd.km.domain import errors
from vqkd.km.domain.control_plane import OpenRequest, OpenResult
from vqkd.km.domain.vocabulary import QoS
from vqkd.km.v1 import km_pb2, km_pb2_grpc

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5.0
SIGNAL_INTERVAL_S = 1.0  # at most one key-request signal per session in this time


def qos_to_pb(q: QoS) -> km_pb2.QoS:
    return km_pb2.QoS(key_chunk_size=q.key_chunk_size, max_bps=q.max_bps, min_bps=q.min_bps, jitter=q.jitter,
                      priority=q.priority, timeout_ms=q.timeout_ms, ttl_s=q.ttl_s, fallback=q.fallback)


def qos_from_pb(q: km_pb2.QoS) -> QoS:
    return QoS(q.key_chunk_size, q.max_bps, q.min_bps, q.jitter, q.priority, q.timeout_ms, q.ttl_s, q.fallback)


class GrpcControlPlane:
    def __init__(self, node: str, channel: grpc.aio.Channel, replica: int = 0,
                 signal_interval_s: float = SIGNAL_INTERVAL_S):
        self.node = node
        self.replica = replica  # this KM's ordinal among the node's replicas, named in every call
        self.stub = km_pb2_grpc.ControlPlaneStub(channel)
        self.signal_interval_s = signal_interval_s
        self._signals: set[asyncio.Task] = set()
        self._unsignalled: dict[str, int] = {}  # session -> key requests waiting for their signal
        self._signalled_at: dict[str, float] = {}  # session -> when its last key-request signal left

    async def open_session(self, request: OpenRequest) -> OpenResult:
        try:
            reply = await self.stub.OpenSession(km_pb2.OpenSessionRequest(
                node=request.node, caller_sae_id=request.caller_sae_id,
                source=km_pb2.Endpoint(node=request.source.node, sae_id=request.source.sae_id),
                destination=km_pb2.Endpoint(node=request.destination.node, sae_id=request.destination.sae_id),
                qos=qos_to_pb(request.qos), session_id=request.session_id, implicit=request.implicit,
                replica=self.replica,
            ), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            raise errors.Unavailable(f"control plane unreachable: {e.code().name}: {e.details()}") from None
        return OpenResult(reply.accepted, reply.session_id, reply.reason, qos_from_pb(reply.qos),
                          reply.peer_registered, reply.etsi004_status, reply.unauthorized)

    def _signal(self, call, session_id: str, reason: str = "", requests: int = 0) -> None:
        """Fire and forget: the key request must not wait for the control plane."""
        async def send():
            try:
                await call(km_pb2.SessionSignal(node=self.node, session_id=session_id, reason=reason,
                                                requests=requests, replica=self.replica), timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                log.warning("control plane did not take a signal for session %s: %s", session_id, e.code().name)
        task = asyncio.create_task(send())
        self._signals.add(task)
        task.add_done_callback(self._signals.discard)

    async def key_requested(self, session_id: str) -> None:
        waiting = self._unsignalled.get(session_id)
        if waiting is not None:  # its signal is scheduled: this request rides along
            self._unsignalled[session_id] = waiting + 1
            return
        self._unsignalled[session_id] = 1
        loop = asyncio.get_running_loop()
        due = self._signalled_at.get(session_id, -math.inf) + self.signal_interval_s - loop.time()
        if due <= 0:
            self._flush(session_id)
        else:
            loop.call_later(due, self._flush, session_id)

    def _flush(self, session_id: str) -> None:
        requests = self._unsignalled.pop(session_id, 0)
        if not requests:
            return  # the session was closed meanwhile
        now = asyncio.get_running_loop().time()
        self._signalled_at[session_id] = now
        if len(self._signalled_at) > 4 * len(self._unsignalled) + 1024:
            # Forget sessions quiet for longer than the interval: they would be signalled at once anyway.
            self._signalled_at = {sid: at for sid, at in self._signalled_at.items()
                                  if now - at < self.signal_interval_s}
        self._signal(self.stub.KeyRequested, session_id, requests=requests)

    async def session_closed(self, session_id: str, reason: str) -> None:
        self._unsignalled.pop(session_id, None)
        self._signalled_at.pop(session_id, None)
        self._signal(self.stub.SessionClosed, session_id, reason)
