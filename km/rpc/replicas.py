"""gRPC between the KM replicas of one node (NodeReplicas): the servicer and a sibling's client.

Every replica of a node presents the node's KM certificate; the servicer answers that
identity only, so no other KM, application or controller can take keys or copies here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import grpc

from vqkd.km import identity
from vqkd.km.domain import errors
from vqkd.km.domain.keystore import NotASlave, StoreFull
from vqkd.km.domain.replicas import HeldKeys, NodeReplicas, SiblingTimedOut, SiblingUnavailable
from vqkd.km.etsi004.service import GetKeyResult, Status
from vqkd.km.rpc.credentials import peer_identity
from vqkd.km.v1 import km_pb2, km_pb2_grpc

if TYPE_CHECKING:
    from vqkd.km.domain.keymanager import KeyManager
    from vqkd.km.domain.sessions import SessionTable
    from vqkd.km.etsi004.service import ETSI004Service

RPC_TIMEOUT_S = 2.0
# Forwarded GET_KEY calls wait at the owner up to the session's request timeout.
FORWARD_MARGIN_S = 2.0


def held_to_pb(held: HeldKeys) -> km_pb2.HeldKeys:
    return km_pb2.HeldKeys(
        master_sae_id=held.master, slave_sae_ids=sorted(held.slaves), key_ids=[key_id for key_id, _ in held.keys],
        keys=[key for _, key in held.keys], key_extension=json.dumps(held.extension) if held.extension else "",
        ttl_s=held.ttl_s)


def held_from_pb(pb: km_pb2.HeldKeys) -> HeldKeys:
    return HeldKeys(pb.master_sae_id, frozenset(pb.slave_sae_ids), list(zip(pb.key_ids, pb.keys)),
                    json.loads(pb.key_extension) if pb.key_extension else None, pb.ttl_s)


class NodeReplicasService(km_pb2_grpc.NodeReplicasServicer):
    def __init__(self, km: KeyManager, replicas: NodeReplicas, sessions: SessionTable, streams: ETSI004Service):
        self.km = km
        self.replicas = replicas
        self.sessions = sessions
        self.streams = streams

    async def _from_sibling(self, context) -> None:
        caller = peer_identity(context)
        if caller != identity.km(self.km.node):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"NodeReplicas of node {self.km.node} serves {identity.km(self.km.node)}, not {caller}")

    async def Incarnation(self, request, context):
        await self._from_sibling(context)
        return km_pb2.IncarnationReply(replica=self.replicas.replica, incarnation=self.km.incarnation)

    async def HoldCopies(self, request, context):
        await self._from_sibling(context)
        try:
            self.replicas.keep_copies(request.sender_replica, request.sender_incarnation,
                                      [held_from_pb(h) for h in request.held])
        except StoreFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except errors.KeysNotFound as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        return km_pb2.HoldCopiesReply()

    async def DropCopies(self, request, context):
        await self._from_sibling(context)
        self.replicas.drop_copies(request.sender_replica, list(request.key_ids))
        return km_pb2.DropCopiesReply()

    async def TakeKeys(self, request, context):
        await self._from_sibling(context)
        try:
            held, undecided = await self.replicas.give(request.sender_replica, request.sender_incarnation,
                                                       request.caller_sae_id, request.master_sae_id,
                                                       list(request.key_ids))
        except NotASlave:
            return km_pb2.TakeKeysReply(not_a_slave=True)
        return km_pb2.TakeKeysReply(held=[held_to_pb(h) for h in held], undecided=undecided)

    async def ForwardGetKey(self, request, context):
        await self._from_sibling(context)
        try:
            result = await self.streams.get_key(request.caller_sae_id, request.key_stream_id,
                                                request.index if request.has_index else None, request.metadata_size,
                                                forwarded=True)
        except errors.KMError as e:
            result = GetKeyResult(Status.NO_QKD_CONNECTION, request.index, message=str(e))
        return km_pb2.ForwardGetKeyReply(status=int(result.status), index=result.index, key=result.key,
                                         key_id=result.key_id, message=result.message)

    async def ForwardClose(self, request, context):
        await self._from_sibling(context)
        try:
            status = await self.streams.close(request.caller_sae_id, request.key_stream_id, forwarded=True)
        except errors.KMError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return km_pb2.ForwardCloseReply(status=int(status))

    async def HandChunks(self, request, context):
        await self._from_sibling(context)
        session = self.sessions.get(request.session_id)
        if session is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"KM replica {self.replicas.replica} of node {self.km.node} holds no session "
                                f"{request.session_id}")
        session.add_chunks(request.index, list(zip(request.key_ids, request.keys)))
        self.sessions.touch(session)
        return km_pb2.HandChunksReply()


class SiblingClient:
    """Another KM replica of this node, as the domain's ``Sibling`` and as the owner ETSI 004
    calls are forwarded to; every call has a deadline, failures are ``SiblingUnavailable``."""

    def __init__(self, replica: int, ordinal: int, channel: grpc.aio.Channel):
        self.replica = replica  # this one's, sent with every request
        self.ordinal = ordinal
        self.stub = km_pb2_grpc.NodeReplicasStub(channel)

    async def _call(self, method, request, timeout: float = RPC_TIMEOUT_S):
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            # Out of time, the sibling may be alive and working: not the same as one that
            # cannot be reached (connection refused, gone from the network).
            error = SiblingTimedOut if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else SiblingUnavailable
            raise error(f"KM replica {self.ordinal}: {e.code().name}: {e.details()}") from None
        except grpc.aio.UsageError:  # the channel was closed: a topology change removed the replica
            raise SiblingUnavailable(f"KM replica {self.ordinal} is no longer one of this node") from None

    async def incarnation(self) -> str:
        reply = await self._call(self.stub.Incarnation, km_pb2.IncarnationRequest(sender_replica=self.replica))
        return reply.incarnation

    async def hold_copies(self, incarnation: str, held: list[HeldKeys]) -> None:
        await self._call(self.stub.HoldCopies, km_pb2.HoldCopiesRequest(
            sender_replica=self.replica, sender_incarnation=incarnation, held=[held_to_pb(h) for h in held]))

    async def drop_copies(self, key_ids: list[str]) -> None:
        await self._call(self.stub.DropCopies, km_pb2.DropCopiesRequest(sender_replica=self.replica, key_ids=key_ids))

    async def take_keys(self, incarnation: str, caller: str, master: str,
                        key_ids: list[str]) -> tuple[list[HeldKeys], bool]:
        reply = await self._call(self.stub.TakeKeys, km_pb2.TakeKeysRequest(
            sender_replica=self.replica, sender_incarnation=incarnation, caller_sae_id=caller, master_sae_id=master,
            key_ids=key_ids))
        if reply.not_a_slave:
            raise NotASlave(caller)
        return [held_from_pb(h) for h in reply.held], reply.undecided

    async def hand_chunks(self, session_id: str, index: int, chunks: list[tuple[str, bytes]]) -> None:
        await self._call(self.stub.HandChunks, km_pb2.HandChunksRequest(
            sender_replica=self.replica, session_id=session_id, index=index,
            key_ids=[key_id for key_id, _ in chunks], keys=[key for _, key in chunks]))

    async def forward_get_key(self, caller: str, key_stream_id: str, index: int | None, metadata_size: int,
                              wait_s: float) -> GetKeyResult:
        reply = await self._call(self.stub.ForwardGetKey, km_pb2.ForwardGetKeyRequest(
            sender_replica=self.replica, caller_sae_id=caller, key_stream_id=key_stream_id,
            has_index=index is not None, index=index or 0, metadata_size=metadata_size), wait_s + FORWARD_MARGIN_S)
        return GetKeyResult(Status(reply.status), reply.index, reply.key, reply.key_id, reply.message)

    async def forward_close(self, caller: str, key_stream_id: str) -> Status:
        reply = await self._call(self.stub.ForwardClose, km_pb2.ForwardCloseRequest(
            sender_replica=self.replica, caller_sae_id=caller, key_stream_id=key_stream_id))
        return Status(reply.status)
