"""Making keys shared between a master SAE here and slave SAEs on this or an adjacent node.

The master's KM cuts the keys from its outgoing pool of the link towards the slave's node
and names the material to the peer KM, which stores the same bytes under the same key IDs
for the slave SAEs. The master gets its keys only after the peer confirmed; if the peer
fails, the material is gone on both sides and nobody has the keys.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from vqkd.km import errors
from vqkd.km.keyids import new_key_ids
from vqkd.km.keypool import InsufficientKey, Span, SpanError
from vqkd.km.keystore import KeysNotFound, StoreFull

if TYPE_CHECKING:
    from vqkd.km.manager import KeyManager
    from vqkd.km.relaying import RelayService
    from vqkd.km.sessions import Session, SessionTable


class DeliveryRefused(Exception):
    """The peer's delivery cannot be accepted; the message says why."""


def split(material: bytes, size_bytes: int) -> list[bytes]:
    return [material[i:i + size_bytes] for i in range(0, len(material), size_bytes)]


class KeyExchange:
    """Serves key requests: within the SAE pair's session when the control plane set one up
    (relayed along its path, limited by its token bucket), otherwise — a KM running without
    a control plane — directly over the link to an adjacent node."""

    def __init__(self, km: KeyManager, sessions: SessionTable | None = None, relays: RelayService | None = None):
        self.km = km
        self.sessions = sessions
        self.relays = relays

    async def issue(self, master: str, slaves: list[str], number: int, size_bits: int) -> list[tuple[str, bytes]]:
        """New keys for ``master``, held for every slave by the slave's KM when this returns."""
        km = self.km
        slave_nodes = {km.node_of(s) for s in slaves}
        if len(slave_nodes) != 1 or None in slave_nodes:
            raise errors.InvalidRequest(f"slave SAEs {slaves} must all be known and attached to one node")
        (slave_node,) = slave_nodes
        size_bytes = size_bits // 8
        ids = new_key_ids(number)
        if slave_node == km.node:
            keys = list(zip(ids, (secrets.token_bytes(size_bytes) for _ in ids)))
            try:
                self._store(master, slaves, keys)
            except DeliveryRefused as e:
                raise errors.Unavailable(f"cannot hold keys for {slaves}: {e}") from None
            return keys
        session = self.sessions.between(master, slaves[0]) if self.sessions is not None else None
        if session is not None:
            return await self._in_session(session, master, slaves, number, size_bits)
        link = km.link_to.get(slave_node)
        if link is None or link.peer is None:
            raise errors.NoPath(f"node {km.node} has no QKD link to node {slave_node}, where {slaves[0]} is attached")
        try:
            material, spans = link.outgoing.take(number * size_bytes)
        except InsufficientKey as e:
            raise errors.InsufficientKey(
                f"not enough QKD key on link {link.name} to node {slave_node}: {e}; retry later or ask for fewer bits"
            ) from None
        await link.peer.deliver(master, slaves, ids, size_bits, spans)
        return list(zip(ids, split(material, size_bytes)))

    async def _in_session(self, session: Session, master: str, slaves: list[str], number: int,
                          size_bits: int) -> list[tuple[str, bytes]]:
        bits = number * size_bits
        if not session.bucket.try_take(bits):
            session.refused_by_bucket += 1
            raise session.bucket.refusal(bits)
        self.sessions.key_exchange_started(session)
        try:
            keys = await self.relays.send(session, master, slaves, number, size_bits)
        except errors.KMError as e:
            self.sessions.key_exchange_done(session, 0, 0, detail=str(e))
            raise
        self.sessions.key_exchange_done(session, number, bits)
        return keys

    def accept(self, link_name: str, master: str, slaves: list[str], key_ids: list[str],
               sizes_bits: list[int], spans: list[Span]) -> int:
        """Store keys a peer KM made from shared link material; returns the bits stored."""
        km = self.km
        link = km.links[link_name]
        if not key_ids or len(key_ids) != len(sizes_bits):
            raise DeliveryRefused("a delivery needs one size per key and at least one key")
        try:
            material = link.incoming.consume(spans)
        except SpanError as e:
            raise DeliveryRefused(f"link {link_name}: {e}") from None
        # The material is consumed from here on: whatever is refused below is lost on both
        # sides (the sender dropped it too), never used for something else.
        if sum(sizes_bits) != len(material) * 8 or any(s <= 0 or s % 8 for s in sizes_bits):
            raise DeliveryRefused(f"key sizes {sum(sizes_bits)} bits do not match {len(material) * 8} bits of material")
        not_here = [s for s in slaves if not km.is_local(s)]
        if not slaves or not_here:
            raise DeliveryRefused(f"slave SAEs {not_here or slaves} are not attached to node {km.node}")
        keys, offset = [], 0
        for key_id, size in zip(key_ids, sizes_bits):
            keys.append((key_id, material[offset:offset + size // 8]))
            offset += size // 8
        self._store(master, slaves, keys)
        return len(material) * 8

    def _store(self, master: str, slaves: list[str], keys: list[tuple[str, bytes]]) -> None:
        try:
            self.km.store.put(master, frozenset(slaves), keys)
        except (StoreFull, KeysNotFound) as e:
            raise DeliveryRefused(str(e)) from None
