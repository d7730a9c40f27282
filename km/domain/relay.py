"""Trusted-node relay of end-to-end keys along a session's path (paper Fig. 3b).

The source KM makes the keys (adjacent endpoints: the link key itself; otherwise fresh
random keys) and sends them one-time-pad encrypted with fresh key of the next link; each
intermediate KM decrypts with the key of the link the message came in on and re-encrypts
with key of the link it goes out on. Every message carries a one-time Poly1305 tag keyed
with 32 bytes of fresh link key, so tampering on any hop is detected; a relay ID seen twice
is a replay and refused.

A key is delivered to both applications or to neither: the destination holds relayed keys
as *pending* until a commit from the source travels the same path, and the source hands
the keys to its application only after that commit was acknowledged. If any KM on the path
fails first, the pending keys expire unseen. At a node with several KM replicas the
destination acknowledges a commit once the keys are held twice (``replicas.NodeReplicas``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from vqkd.km.domain import errors, hybrid, relay_crypto
from vqkd.km.domain.keyids import new_key_ids
from vqkd.km.domain.keymanager import KeyManager
from vqkd.km.domain.keypool import Span, SpanError
from vqkd.km.domain.keyqueue import QueueTimeout
from vqkd.km.domain.links import Link
from vqkd.km.domain.peer import HybridMessage
from vqkd.km.domain.relay_crypto import MAC_KEY_BYTES
from vqkd.km.domain.replicas import NodeReplicas
from vqkd.km.domain.sessions import Session, SessionTable
from vqkd.km.domain.vocabulary import Role

log = logging.getLogger(__name__)

CONFIGURATION_GRACE_S = 1.0
# How long relayed keys wait for their commit (and intermediates remember the way on). It
# bounds a relay's round trip, not the application's call: the commit follows the relay
# within the source's RPC deadlines, whatever timeout the application chose.
COMMIT_WAIT_S = 30.0
HYBRID_EXTENSION = {"vqkd_key_origin": "hybrid-x25519-mlkem768"}


class RelayRejected(Exception):
    """A relay or commit message cannot be accepted; ``reason`` is a metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class Pending:
    session_id: str
    master: str
    slaves: list[str]
    keys: list[tuple[str, bytes]]
    extension: dict | None
    expires: float
    stream_index: int | None = None  # ETSI 004 chunks from this index, else ETSI 014 keys


@dataclass(slots=True)
class Forwarded:
    link: Link
    expires: float


class RelayService:
    def __init__(self, km: KeyManager, sessions: SessionTable, clock: Callable[[], float] = time.monotonic,
                 on_reject: Callable[[str], None] = lambda reason: None,
                 on_relayed: Callable[[str, int], None] = lambda role, bits: None,
                 on_fallback: Callable[[int], None] = lambda keys: None,
                 configuration_grace_s: float = CONFIGURATION_GRACE_S,
                 on_relay_done: Callable[[bool, float], None] = lambda direct, seconds: None,
                 replicas: NodeReplicas | None = None):
        self.km = km
        self.sessions = sessions
        self.clock = clock
        self.pending: dict[str, Pending] = {}
        self.forwarded: dict[str, Forwarded] = {}
        self.guard = relay_crypto.ReplayGuard(capacity=1_000_000, ttl_s=3600.0, clock=clock)
        self.on_reject = on_reject
        self.on_relayed = on_relayed
        self.on_fallback = on_fallback
        self.configuration_grace_s = configuration_grace_s
        self.on_relay_done = on_relay_done
        # Where committed keys go: this KM's store, and a copy at a sibling replica if any.
        self.replicas = replicas or NodeReplicas(km, clock)

    # -- source ------------------------------------------------------------------------

    def next_link(self, session: Session, master: str, nbytes: int) -> tuple[Link, bool]:
        """The link end towards the slave's node for ``nbytes`` of keys, and whether the slave's
        KM is at its far end."""
        towards = session.config.peer_sae(master).node
        hop = session.config.hop_towards(towards)
        link = self.km.end_towards(hop, (nbytes + MAC_KEY_BYTES) * 8)
        if link is None:
            raise errors.NoPath(f"session {session.session_id}: node {self.km.node} has no link to next hop {hop!r}")
        return link, hop == towards

    async def _take(self, link: Link, session: Session, nbytes: int) -> tuple[bytes, list, bytes, list]:
        """Pad and MAC key for one hop, waiting in the link's priority queue while key is short."""
        c = session.config
        need = (nbytes + MAC_KEY_BYTES) * 8
        try:
            with await link.queue.acquire(c.priority, lambda: link.outgoing.available_bits >= need,
                                          c.request_timeout_s):
                mac_key, mac_spans = link.outgoing.take(MAC_KEY_BYTES)
                pad, pad_spans = link.outgoing.take(nbytes)
        except QueueTimeout:
            raise errors.InsufficientKey(
                f"not enough QKD key on link {link.name} for session {session.session_id} within its "
                f"timeout of {c.request_timeout_s:g} s: {need} bits needed, {link.outgoing.available_bits} "
                f"available; retry later or ask for fewer bits"
            ) from None
        return mac_key, mac_spans, pad, pad_spans

    async def send(self, session: Session, master: str, slaves: list[str], number: int, size_bits: int,
                   stream: bool = False, index: int = 0) -> tuple[list[tuple[str, bytes]], dict | None]:
        """Relay new keys to the slaves' KM; returns them (and their key extension) once the
        destination committed. With ``stream`` they are ETSI 004 chunks from ``index`` on."""
        nbytes = number * size_bits // 8
        link, direct = self.next_link(session, master, nbytes)
        try:
            mac_key, mac_spans, pad, pad_spans = await self._take(link, session, nbytes)
        except errors.InsufficientKey:
            if session.config.fallback != "pqc":
                raise
            return await self._send_hybrid(session, link, master, slaves, number, size_bits, stream, index)
        self.sessions.note(session, "QKD key available", f"{nbytes * 8} bits on link {link.name}")
        started = self.clock()
        keys_material = pad if direct else secrets.token_bytes(nbytes)
        ids = new_key_ids(number)
        fields = relay_crypto.RelayFields(
            link=link.name, sender_incarnation=link.incarnation, receiver_incarnation=link.peer_incarnation or "",
            session_id=session.session_id, relay_id=uuid.uuid4().hex, index=index,
            master_sae_id=master, slave_sae_ids=tuple(slaves), key_ids=tuple(ids), key_size_bits=size_bits,
            direct=direct, ciphertext=b"" if direct else relay_crypto.xor(keys_material, pad),
            pad=tuple((s.block_id, s.offset, s.length) for s in pad_spans),
            mac_key=tuple((s.block_id, s.offset, s.length) for s in mac_spans),
            key_extension="", stream=stream,
        )
        await link.peer.relay(fields, relay_crypto.tag(mac_key, relay_crypto.authenticated_bytes(fields)))
        await link.peer.commit(link.name, session.session_id, fields.relay_id)
        self.on_relay_done(direct, self.clock() - started)
        self.on_relayed("source", nbytes * 8)
        return list(zip(ids, relay_crypto.split_keys(keys_material, number, size_bits))), None

    async def _send_hybrid(self, session: Session, link: Link, master: str, slaves: list[str], number: int,
                           size_bits: int, stream: bool, index: int) -> tuple[list[tuple[str, bytes]], dict]:
        """The session asked for it: agree keys with the destination KM by ML-KEM-768 + X25519."""
        ids = new_key_ids(number)
        initiator = hybrid.HybridInitiator()
        message = HybridMessage(link.name, session.session_id, uuid.uuid4().hex, index, master, tuple(slaves),
                                tuple(ids), size_bits, stream, initiator.offer)
        reply = await link.peer.hybrid(message)
        try:
            secret = initiator.finish(reply, hybrid.session_context(session.session_id, ids, size_bits))
        except (ValueError, hybrid.HybridFailure) as e:
            raise errors.PeerUnavailable(f"hybrid key exchange for session {session.session_id} failed: {e}") from None
        await link.peer.commit(link.name, session.session_id, message.relay_id)
        self.on_fallback(number)
        return list(zip(ids, hybrid.derive_keys(secret, ids, size_bits))), dict(HYBRID_EXTENSION)

    # -- every hop ---------------------------------------------------------------------

    def _reject(self, reason: str, message: str) -> RelayRejected:
        self.on_reject(reason)
        log.warning("relay refused (%s): %s", reason, message)
        return RelayRejected(reason, f"{reason}: {message}")

    def _expire(self) -> None:
        now = self.clock()
        for table in (self.pending, self.forwarded):
            for relay_id in [r for r, entry in table.items() if entry.expires <= now]:
                del table[relay_id]

    async def receive(self, link_in: Link, fields: relay_crypto.RelayFields, tag: bytes) -> None:
        """Handle one relay message from the KM at the other end of ``link_in``."""
        self._expire()
        if (fields.link, fields.receiver_incarnation) != (link_in.name, link_in.incarnation):
            raise self._reject("malformed", f"relay {fields.relay_id} names link {fields.link!r} and receiver "
                                            f"incarnation {fields.receiver_incarnation!r}; it arrived on link "
                                            f"{link_in.name} at incarnation {link_in.incarnation}")
        if fields.relay_id in self.guard:  # known genuine: refuse before touching any material
            raise self._reject("replayed", f"relay {fields.relay_id} was seen before")
        try:
            mac_key = link_in.incoming.consume([Span(*s) for s in fields.mac_key])
            pad = link_in.incoming.consume([Span(*s) for s in fields.pad])
        except SpanError as e:
            raise self._reject("bad_material", f"link {link_in.name}: {e}") from None
        # The tag first: a forged message must not get its relay ID remembered, or the
        # genuine one would then be refused as a replay.
        if len(mac_key) != MAC_KEY_BYTES or not relay_crypto.verify(mac_key, relay_crypto.authenticated_bytes(fields), tag):
            raise self._reject("tampered", f"relay {fields.relay_id} on link {link_in.name}: tag does not verify")
        if self.guard.seen_before(fields.relay_id):
            raise self._reject("replayed", f"relay {fields.relay_id} was seen before")
        session = await self.sessions.configured(fields.session_id, self.configuration_grace_s)
        if session is None:
            raise self._reject("unknown_session", f"node {self.km.node} holds no session {fields.session_id}")
        if not fields.direct and len(fields.ciphertext) != len(pad):
            raise self._reject("malformed", "ciphertext and pad lengths differ")
        plain = pad if fields.direct else relay_crypto.xor(fields.ciphertext, pad)
        try:
            relay_crypto.check_keys(len(plain), len(fields.key_ids), fields.key_size_bits)
        except ValueError as e:
            raise self._reject("malformed", f"the keys do not match the relayed material: {e}") from None

        link_out = self._onward(session, link_in, (len(plain) + MAC_KEY_BYTES) * 8)
        self.sessions.note(session, "relayed key received", f"{len(plain) * 8} bits from {link_in.peer_node}")
        if link_out is None:
            keys = list(zip(fields.key_ids, relay_crypto.split_keys(plain, len(fields.key_ids), fields.key_size_bits)))
            extension = json.loads(fields.key_extension) if fields.key_extension else None
            self._hold(session, fields.relay_id, fields.master_sae_id, fields.slave_sae_ids, keys, extension,
                       fields.index if fields.stream else None)
            self.on_relayed("destination", len(plain) * 8)
            return
        mac_key, mac_spans, pad_out, pad_spans = await self._take(link_out, session, len(plain))
        onward = relay_crypto.RelayFields(
            link=link_out.name, sender_incarnation=link_out.incarnation,
            receiver_incarnation=link_out.peer_incarnation or "", session_id=session.session_id,
            relay_id=fields.relay_id, index=fields.index, master_sae_id=fields.master_sae_id,
            slave_sae_ids=fields.slave_sae_ids, key_ids=fields.key_ids, key_size_bits=fields.key_size_bits,
            direct=False,
            ciphertext=relay_crypto.xor(plain, pad_out),
            pad=tuple((s.block_id, s.offset, s.length) for s in pad_spans),
            mac_key=tuple((s.block_id, s.offset, s.length) for s in mac_spans),
            key_extension=fields.key_extension, stream=fields.stream,
        )
        await link_out.peer.relay(onward, relay_crypto.tag(mac_key, relay_crypto.authenticated_bytes(onward)))
        self.forwarded[fields.relay_id] = Forwarded(link_out, self.clock() + COMMIT_WAIT_S)
        self.on_relayed("intermediate", len(plain) * 8)

    def _onward(self, session: Session, link_in: Link, need_bits: int = 0) -> Link | None:
        """The link end a message from ``link_in`` goes on to, taking ``need_bits`` of its key,
        or None when it arrived."""
        c = session.config
        if c is None:
            raise self._reject("unknown_session", f"session {session.session_id} has no route at {self.km.node} yet")
        towards_destination = link_in.peer_node == c.prev_hop
        if link_in.peer_node not in (c.prev_hop, c.next_hop):
            raise self._reject("no_route", f"session {c.session_id}: {link_in.peer_node} is not a hop of it at "
                                           f"{self.km.node}")
        if c.role is (Role.DESTINATION if towards_destination else Role.SOURCE):
            return None
        hop = c.next_hop if towards_destination else c.prev_hop
        link_out = self.km.end_towards(hop, need_bits)
        if link_out is None or c.role is not Role.INTERMEDIATE:
            raise self._reject("no_route", f"session {c.session_id}: no hop from {self.km.node} towards {hop!r}")
        return link_out

    def _hold(self, session: Session, relay_id: str, master: str, slaves: tuple[str, ...],
              keys: list[tuple[str, bytes]], extension: dict | None, stream_index: int | None) -> None:
        not_here = [s for s in slaves if not self.km.is_local(s)]
        if not slaves or not_here:
            raise self._reject("malformed", f"slave SAEs {not_here or '[]'} are not attached to node {self.km.node}")
        self.pending[relay_id] = Pending(session.session_id, master, list(slaves), keys, extension,
                                         self.clock() + COMMIT_WAIT_S, stream_index)

    async def receive_hybrid(self, link_in: Link, message: HybridMessage) -> bytes:
        """Pass the offer on along the path, or answer it at the destination KM."""
        self._expire()
        if self.guard.seen_before(message.relay_id):
            raise self._reject("replayed", f"hybrid exchange {message.relay_id} was seen before")
        session = await self.sessions.configured(message.session_id, self.configuration_grace_s)
        if session is None:
            raise self._reject("unknown_session", f"node {self.km.node} holds no session {message.session_id}")
        if session.config.fallback != "pqc":
            raise self._reject("fallback_not_allowed", f"session {message.session_id} did not opt in to the "
                                                       "hybrid fallback")
        link_out = self._onward(session, link_in)
        if link_out is not None:
            onward = dataclasses.replace(message, link=link_out.name)
            reply = await link_out.peer.hybrid(onward)
            self.forwarded[message.relay_id] = Forwarded(link_out, self.clock() + COMMIT_WAIT_S)
            return reply
        context = hybrid.session_context(message.session_id, list(message.key_ids), message.size_bits)
        try:
            reply, secret = hybrid.respond(message.offer, context)
            derived = hybrid.derive_keys(secret, list(message.key_ids), message.size_bits)
        except ValueError as e:
            raise self._reject("malformed", f"hybrid offer for session {message.session_id}: {e}") from None
        self._hold(session, message.relay_id, message.master_sae_id, message.slave_sae_ids,
                   list(zip(message.key_ids, derived)), dict(HYBRID_EXTENSION),
                   message.index if message.stream else None)
        return reply

    async def commit(self, link_in: Link, session_id: str, relay_id: str) -> None:
        """Release pending keys at the destination, or pass the commit on along the path."""
        self._expire()
        forwarded = self.forwarded.pop(relay_id, None)
        if forwarded is not None:
            await forwarded.link.peer.commit(forwarded.link.name, session_id, relay_id)
            return
        pending = self.pending.pop(relay_id, None)
        if pending is None or pending.session_id != session_id:
            raise self._reject("unknown_relay", f"no pending relay {relay_id} for session {session_id} "
                                                f"at {self.km.node} (expired or never received)")
        session = self.sessions.get(session_id)
        if session is not None:
            self.sessions.note(session, "key committed", f"{len(pending.keys)} keys ready for {pending.slaves[0]}")
        if pending.stream_index is not None:
            if session is None:
                raise self._reject("unknown_session", f"session {session_id} ended before its key arrived")
            await self.replicas.hand_chunks(session, pending.stream_index, pending.keys)
        else:
            await self.replicas.hold(pending.master, frozenset(pending.slaves), pending.keys, pending.extension)
        if session is not None:
            self.sessions.touch(session)  # counted as delivered where they were issued, not here
