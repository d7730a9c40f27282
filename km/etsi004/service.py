"""ETSI GS QKD 004 (OPEN_CONNECT, GET_KEY, CLOSE) at a KM, independent of HTTP.

OPEN_CONNECT asks the control plane for the session (paper Fig. 2a): the source passes no
Key_stream_ID and receives the one assigned; the destination passes that ID. The call
waits for the route configuration up to the QoS timeout and answers 0 when the session is
Operative, 1 when the peer has not connected yet.

GET_KEY works on the session's key stream. The source application's KM makes chunk
``index`` (and any chunk before it not made yet) and relays it to the destination KM; the
destination application's GET_KEY for an index waits, up to the timeout, until that chunk
has arrived. Both ends therefore get the same chunk at the same index.

A node with several KM replicas keeps each stream at one owner replica
(``replicas.stream_owner``): GET_KEY and CLOSE reaching another replica are checked there
and forwarded to the owner, which answers them as its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Callable, Protocol

from vqkd.km.domain import errors
from vqkd.km.domain.control_plane import OpenRequest
from vqkd.km.domain.replicas import SiblingUnavailable
from vqkd.km.domain.sessions import Session, State
from vqkd.km.domain.vocabulary import Endpoint, QoS

if TYPE_CHECKING:
    from vqkd.km.domain.control_plane import ControlPlaneClient
    from vqkd.km.domain.exchange import KeyExchange
    from vqkd.km.domain.keymanager import KeyManager
    from vqkd.km.domain.sessions import SessionTable

DEFAULT_TIMEOUT_MS = 5_000
# GET_KEY's metadata is {"key_ID": "<uuid>"} as JSON: what a Metadata buffer must hold.
METADATA_BYTES = len('{"key_ID": "00000000-0000-0000-0000-000000000000"}')
DEFAULT_CHUNK_BYTES = 32
MAX_CHUNK_BYTES = 1024


class Status(IntEnum):
    """The status codes of ETSI GS QKD 004."""

    SUCCESS = 0
    PEER_NOT_CONNECTED = 1
    INSUFFICIENT_KEY = 2
    GET_KEY_PEER_NOT_CONNECTED = 3
    NO_QKD_CONNECTION = 4
    KSID_IN_USE = 5
    TIMEOUT = 6
    QOS_NOT_MET = 7
    METADATA_TOO_SMALL = 8


@dataclass(frozen=True, slots=True)
class OpenConnectResult:
    """What OPEN_CONNECT answers the application."""

    status: Status
    key_stream_id: str
    qos: QoS
    message: str = ""


@dataclass(frozen=True, slots=True)
class GetKeyResult:
    """What GET_KEY answers the application."""

    status: Status
    index: int
    key: bytes = b""
    key_id: str = ""
    message: str = ""


class StreamOwner(Protocol):
    """The KM replica of this node that owns a stream, as calls are forwarded to it; both
    raise ``SiblingUnavailable`` when it does not answer."""

    ordinal: int

    async def forward_get_key(self, caller: str, key_stream_id: str, index: int | None, metadata_size: int,
                              wait_s: float) -> GetKeyResult: ...

    async def forward_close(self, caller: str, key_stream_id: str) -> Status: ...


class ETSI004Service:
    def __init__(self, km: KeyManager, sessions: SessionTable, exchange: KeyExchange,
                 control_plane: ControlPlaneClient | None,
                 owner_of: Callable[[str], StreamOwner | None] = lambda key_stream_id: None):
        """``owner_of``: the replica owning a stream when it is not this one."""
        self.km = km
        self.sessions = sessions
        self.exchange = exchange
        self.control_plane = control_plane
        self.owner_of = owner_of

    def _endpoint(self, sae_id: str, what: str) -> Endpoint:
        node = self.km.node_of(sae_id)
        if node is None:
            raise errors.InvalidRequest(f"{what} {sae_id!r} is not an SAE known to KME {self.km.kme_id}")
        return Endpoint(node, sae_id)

    async def open_connect(self, caller: str, source: str, destination: str, qos: QoS,
                           key_stream_id: str = "") -> OpenConnectResult:
        self.km.check_configured()
        if caller not in (source, destination) or not self.km.is_local(caller):
            raise errors.NotAuthorized(f"SAE {caller} may open sessions only as itself, at the KM of its node")
        src, dst = self._endpoint(source, "source"), self._endpoint(destination, "destination")
        if source == destination:
            raise errors.InvalidRequest("source and destination must be different SAEs")
        if self.control_plane is None:
            return OpenConnectResult(Status.NO_QKD_CONNECTION, key_stream_id, qos,
                              f"KM {self.km.node} runs without a control plane; ETSI 004 sessions need one")
        timeout_s = (qos.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
        result = await self.control_plane.open_session(OpenRequest(
            node=self.km.node, caller_sae_id=caller, source=src, destination=dst, qos=qos,
            session_id=key_stream_id,
        ))
        if not result.accepted:
            if result.unauthorized:
                raise errors.NotAuthorized(result.reason)
            return OpenConnectResult(Status(result.etsi004_status or Status.NO_QKD_CONNECTION), key_stream_id,
                              result.qos, result.reason)
        session = self.sessions.open(result.session_id, src, dst, detail=f"ETSI 004 OPEN_CONNECT by {caller}")
        try:
            await asyncio.wait_for(session.configured.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        if session.config is None:
            return OpenConnectResult(Status.PEER_NOT_CONNECTED, result.session_id, result.qos,
                              "the peer application has not connected yet")
        return OpenConnectResult(Status.SUCCESS, result.session_id, result.qos)

    def _session_of(self, caller: str, key_stream_id: str) -> Session:
        self.km.check_configured()
        if not self.km.is_local(caller):
            raise errors.NotAuthorized(f"SAE {caller} is not attached to node {self.km.node}; "
                                       f"call the KM of its own node")
        session = self.sessions.get(key_stream_id)
        if session is None or session.state is State.TERMINATED:
            raise errors.InvalidRequest(f"no open session with Key_stream_ID {key_stream_id!r} at this KM")
        if caller not in (session.source.sae_id, session.destination.sae_id):
            raise errors.NotAuthorized(f"SAE {caller} is not an application of session {key_stream_id}")
        return session

    async def get_key(self, caller: str, key_stream_id: str, index: int | None,
                      metadata_size: int = 0, forwarded: bool = False) -> GetKeyResult:
        """``metadata_size`` 0 means the caller takes metadata of any size; ``forwarded``:
        another replica passed the call on, this one answers it whoever owns the stream."""
        session = self._session_of(caller, key_stream_id)
        owner = None if forwarded else self.owner_of(key_stream_id)
        if owner is not None:
            wait_s = session.config.request_timeout_s if session.config is not None else 0.0
            try:
                return await owner.forward_get_key(caller, key_stream_id, index, metadata_size, wait_s)
            except SiblingUnavailable as e:
                raise self._owner_lost(key_stream_id, owner, e) from None
        if 0 < metadata_size < METADATA_BYTES:  # refuse before anything is taken
            return GetKeyResult(Status.METADATA_TOO_SMALL, index or 0,
                             message=f"the metadata needs {METADATA_BYTES} bytes, the buffer has {metadata_size}")
        c = session.config
        if c is None:
            return GetKeyResult(Status.GET_KEY_PEER_NOT_CONNECTED, index or 0,
                             message="the peer application has not connected yet")
        if index is not None and not 0 <= index < 2**32:
            raise errors.InvalidRequest(f"index must be an unsigned 32-bit integer, got {index}")
        if index in session.stream:
            key_id, key = session.stream.pop(index)
            self.sessions.touch(session)
            return GetKeyResult(Status.SUCCESS, index, key, key_id)
        producer = caller == session.source.sae_id
        if producer:
            return await self._produce(session, caller, index)
        return await self._await_chunk(session, index)

    async def _produce(self, session: Session, caller: str, index: int | None) -> GetKeyResult:
        wanted = session.next_index if index is None else index
        if wanted < session.next_index:
            return GetKeyResult(Status.INSUFFICIENT_KEY, wanted,
                             message=f"chunk {wanted} was already delivered to this application")
        chunk = session.config.key_chunk_size or DEFAULT_CHUNK_BYTES
        first, count = session.next_index, wanted - session.next_index + 1
        if count > 1024:
            raise errors.InvalidRequest(f"index {wanted} is {count} chunks ahead of the stream; at most 1024")
        session.next_index = wanted + 1  # claimed now, so concurrent calls make distinct chunks
        try:
            issued = await self.exchange.issue_stream(session, caller, session.peer_of(caller), first, count, chunk * 8)
        except errors.InsufficientKey as e:
            session.next_index = min(session.next_index, first)
            return GetKeyResult(Status.INSUFFICIENT_KEY, wanted, message=str(e))
        except errors.KMError as e:
            session.next_index = min(session.next_index, first)
            return GetKeyResult(Status.NO_QKD_CONNECTION, wanted, message=str(e))
        chunks = issued.keys
        if count > 1:
            session.add_chunks(first, chunks[:-1])
        key_id, key = chunks[-1]
        return GetKeyResult(Status.SUCCESS, wanted, key, key_id)

    async def _await_chunk(self, session: Session, index: int | None) -> GetKeyResult:
        timeout_s = session.config.request_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            wanted = min(session.stream) if index is None and session.stream else index
            if wanted is not None and wanted in session.stream:
                key_id, key = session.stream.pop(wanted)
                self.sessions.touch(session)
                return GetKeyResult(Status.SUCCESS, wanted, key, key_id)
            if session.state is State.TERMINATED:
                return GetKeyResult(Status.GET_KEY_PEER_NOT_CONNECTED, wanted or 0, message="the session was closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                return GetKeyResult(Status.TIMEOUT, wanted or 0,
                                 message=f"no chunk {'' if wanted is None else wanted} arrived within "
                                         f"{timeout_s:g} s; the peer application has to ask for it first")
            try:
                await asyncio.wait_for(session.stream_changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _owner_lost(self, key_stream_id: str, owner: StreamOwner, error: SiblingUnavailable) -> errors.KMError:
        return errors.Unavailable(f"the key stream {key_stream_id} lives at KM replica {owner.ordinal} of node "
                                  f"{self.km.node}, which did not answer: {error}")

    async def close(self, caller: str, key_stream_id: str, forwarded: bool = False) -> Status:
        session = self._session_of(caller, key_stream_id)
        owner = None if forwarded else self.owner_of(key_stream_id)
        if owner is not None:
            try:
                status = await owner.forward_close(caller, key_stream_id)
            except SiblingUnavailable as e:
                raise self._owner_lost(key_stream_id, owner, e) from None
            # The owner signalled the close; this replica's copy of the session goes too.
            self.sessions.terminate(session.session_id, f"close request from {caller}, at the stream's owner")
            return status
        self.sessions.terminate(session.session_id, f"close request from {caller}")
        if self.control_plane is not None:
            await self.control_plane.session_closed(session.session_id, f"closed by application {caller}")
        return Status.SUCCESS
