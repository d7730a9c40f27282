"""Serving key requests: keys shared between a master SAE here and its slave SAEs.

Slaves on this node get fresh random keys. Otherwise the keys go within the SAE pair's
session, relayed along its path (``relay.RelayService``) and limited by its token bucket;
an ETSI 014 request finding no session opens one on the applications' behalf. A KM without
a control plane serves adjacent nodes directly: the master's KM cuts the keys from its
outgoing pool of the link towards the slave's node and names the material to the peer KM,
which stores the same bytes under the same key IDs for the slave SAEs. The master gets its
keys only after the peer confirmed; if the peer fails, the material is gone on both sides
and nobody has the keys.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

from vqkd.km.domain import errors
from vqkd.km.domain.control_plane import ControlPlaneClient, OpenRequest
from vqkd.km.domain.keyids import new_key_ids
from vqkd.km.domain.keymanager import KeyManager
from vqkd.km.domain.keypool import Span, SpanError
from vqkd.km.domain.keystore import StoreFull
from vqkd.km.domain.links import Link
from vqkd.km.domain.relay import RelayService
from vqkd.km.domain.sessions import Session, SessionTable
from vqkd.km.domain.vocabulary import Endpoint, QoS


IMPLICIT_ROUTE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Issued:
    keys: list[tuple[str, bytes]]
    extension: dict | None = None  # attached to every key, e.g. marking hybrid (PQC) keys


def split(material: bytes, size_bytes: int) -> list[bytes]:
    return [material[i:i + size_bytes] for i in range(0, len(material), size_bytes)]


class KeyExchange:
    """Serves key requests: within the SAE pair's session when the control plane set one up
    (relayed along its path, limited by its token bucket), otherwise — a KM running without
    a control plane — directly over the link to an adjacent node."""

    def __init__(self, km: KeyManager, sessions: SessionTable | None = None, relays: RelayService | None = None,
                 control_plane: ControlPlaneClient | None = None):
        self.km = km
        self.sessions = sessions
        self.relays = relays
        self.control_plane = control_plane
        self._opening: dict[frozenset[str], asyncio.Future] = {}

    async def issue(self, master: str, slaves: list[str], number: int, size_bits: int) -> Issued:
        """New keys for ``master``, held for every slave by the slave's KM when this returns."""
        km = self.km
        slave_nodes = {km.node_of(s) for s in slaves}
        if len(slave_nodes) != 1 or None in slave_nodes:
            raise errors.InvalidRequest(f"slave SAEs {slaves} must all be known and attached to one node")
        (slave_node,) = slave_nodes
        size_bytes = size_bits // 8
        if slave_node == km.node:
            keys = list(zip(new_key_ids(number), (secrets.token_bytes(size_bytes) for _ in range(number))))
            try:
                if self.relays is not None:  # with a copy at another replica of this node, if it has one
                    await self.relays.replicas.hold(master, frozenset(slaves), keys, None)
                else:
                    self._store(master, slaves, keys)
            except errors.DeliveryRefused as e:
                raise errors.Unavailable(f"cannot hold keys for {slaves}: {e}") from None
            return Issued(keys)
        session = self.sessions.between(master, slaves[0]) if self.sessions is not None else None
        if session is None and self.control_plane is not None:
            session = await self._open_implicit(master, Endpoint(slave_node, slaves[0]))
        if session is not None:
            return await self._in_session(session, master, slaves, number, size_bits)
        link = km.end_towards(slave_node, number * size_bytes * 8)
        if link is None:
            raise errors.NoPath(f"node {km.node} has no QKD link to node {slave_node}, where {slaves[0]} is attached")
        try:
            material, spans = link.outgoing.take(number * size_bytes)
        except errors.InsufficientKey as e:
            raise errors.InsufficientKey(
                f"not enough QKD key on link {link.name} to node {slave_node}: {e}; retry later or ask for fewer bits"
            ) from None
        ids = new_key_ids(number)
        await link.peer.deliver(master, slaves, ids, size_bits, spans)
        return Issued(list(zip(ids, split(material, size_bytes))))

    async def _open_implicit(self, master: str, slave: Endpoint) -> Session:
        """ETSI 014 "Get key" is OPEN_CONNECT + GET_KEY + CLOSE: open the pair's session on the
        applications' behalf with the user's default QoS, once, however many requests race."""
        pair = frozenset((master, slave.sae_id))
        opening = self._opening.get(pair)
        if opening is None:
            opening = asyncio.ensure_future(self._open(master, slave))
            self._opening[pair] = opening
            opening.add_done_callback(lambda _: self._opening.pop(pair, None))
        return await asyncio.shield(opening)

    async def _open(self, master: str, slave: Endpoint) -> Session:
        source = Endpoint(self.km.node, master)
        result = await self.control_plane.open_session(OpenRequest(
            node=self.km.node, caller_sae_id=master, source=source, destination=slave, qos=QoS(), implicit=True,
        ))
        if not result.accepted:
            error = errors.NotAuthorized if result.unauthorized else errors.Unavailable
            raise error(f"session {master} -> {slave.sae_id} refused by the control plane: {result.reason}")
        session = self.sessions.open(result.session_id, source, slave, detail="ETSI 014", implicit=True)
        try:
            await asyncio.wait_for(session.configured.wait(), IMPLICIT_ROUTE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise errors.Unavailable(
                f"session {result.session_id} ({master} -> {slave.sae_id}) got no route within "
                f"{IMPLICIT_ROUTE_TIMEOUT_S:g} s; retry later"
            ) from None
        if session.config is None:
            raise errors.Unavailable(f"session {result.session_id} was deleted before it got a route")
        return session

    async def issue_stream(self, session: Session, source: str, destination: str, index: int, count: int,
                           size_bits: int) -> Issued:
        """ETSI 004 chunks ``index`` … ``index + count - 1`` of the session's key stream."""
        return await self._in_session(session, source, [destination], count, size_bits, stream_index=index)

    async def _in_session(self, session: Session, master: str, slaves: list[str], number: int,
                          size_bits: int, stream_index: int | None = None) -> Issued:
        bits = number * size_bits
        if session.config is None:
            raise errors.Unavailable(f"session {session.session_id} has no route yet (peer not registered); retry")
        if not session.bucket.try_take(bits):
            session.refused_by_bucket += 1
            raise session.bucket.refusal(bits)
        self.sessions.key_exchange_started(session)
        try:
            if self.control_plane is not None:
                await self.control_plane.key_requested(session.session_id)
            keys, extension = await self.relays.send(session, master, slaves, number, size_bits,
                                                     stream=stream_index is not None, index=stream_index or 0)
        except errors.KMError as e:
            self.sessions.key_exchange_done(session, 0, 0, detail=str(e))
            raise
        except BaseException:
            # The application hung up (the request was cancelled) or something unforeseen
            # failed: the exchange is over either way, or the session would stay busy and
            # its inactivity timer could never end it.
            self.sessions.key_exchange_done(session, 0, 0, detail="key request abandoned")
            raise
        self.sessions.key_exchange_done(session, number, bits)
        return Issued(keys, extension)

    def accept(self, link: Link, master: str, slaves: list[str], key_ids: list[str],
               size_bits: int, spans: list[Span]) -> int:
        """Store keys the peer KM of ``link`` made from shared link material, all of ``size_bits``;
        returns the bits stored."""
        km = self.km
        if not key_ids:
            raise errors.DeliveryRefused("a delivery needs at least one key")
        try:
            material = link.incoming.consume(spans)
        except SpanError as e:
            raise errors.DeliveryRefused(f"link {link.name}: {e}") from None
        # The material is consumed from here on: whatever is refused below is lost on both
        # sides (the sender dropped it too), never used for something else.
        if size_bits <= 0 or size_bits % 8 or len(key_ids) * size_bits != len(material) * 8:
            raise errors.DeliveryRefused(f"{len(key_ids)} keys of {size_bits} bits do not match "
                                  f"{len(material) * 8} bits of material")
        not_here = [s for s in slaves if not km.is_local(s)]
        if not slaves or not_here:
            raise errors.DeliveryRefused(f"slave SAEs {not_here or slaves} are not attached to node {km.node}")
        self._store(master, slaves, list(zip(key_ids, split(material, size_bits // 8))))
        return len(material) * 8

    def _store(self, master: str, slaves: list[str], keys: list[tuple[str, bytes]]) -> None:
        try:
            self.km.store.put(master, frozenset(slaves), keys)
        except (StoreFull, errors.KeysNotFound) as e:
            raise errors.DeliveryRefused(str(e)) from None
