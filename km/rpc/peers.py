"""gRPC between the two KMs of a link: the servicer answering the peer and the client calling it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc

from vqkd.km import identity
from vqkd.km.domain import errors, relay_crypto
from vqkd.km.domain.exchange import KeyExchange
from vqkd.km.domain.keypool import Span
from vqkd.km.domain.links import Link
from vqkd.km.domain.peer import HybridMessage
from vqkd.km.domain.relay import RelayRejected, RelayService
from vqkd.km.module_feed import CollectorFull, PeerKeyCollector
from vqkd.km.rpc.credentials import peer_identity
from vqkd.km.v1 import km_pb2, km_pb2_grpc

if TYPE_CHECKING:
    from vqkd.km.domain.keymanager import End, KeyManager
    from vqkd.km.etsi014.client import ETSI014Client

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 5.0
# Longest an AgreeKeys answer waits for the receiver to collect keys: well within the
# deadline, so a slow module end delays the answer, never fails it.
AGREE_WAIT_S = 2.0
# Keys per Deliver request, however many deliveries wait: bounds the message (~40 bytes a key)
# and the time the peer spends on one request. A single larger delivery still goes alone.
MAX_KEYS_PER_DELIVER = 4096
MAX_COMMITS_PER_REQUEST = 1024  # a commit is two IDs: this bounds the request to ~100 KB
# Relay messages per Relay request, weighed by their keys like deliveries.
MAX_RELAYED_KEYS_PER_REQUEST = 4096


class LinkPeerService(km_pb2_grpc.LinkPeerServicer):
    def __init__(self, km: KeyManager, exchange: KeyExchange, collectors: dict[End, PeerKeyCollector],
                 relays: RelayService):
        self.km = km
        self.exchange = exchange
        self.collectors = collectors
        self.relays = relays

    async def _link(self, request, context) -> Link:
        link = self.km.links.get((request.link, request.sender_replica))
        if link is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {self.km.node} has no end of link {request.link!r} "
                                                           f"towards replica {request.sender_replica} of its peer")
        caller = peer_identity(context)
        if caller != identity.km(link.peer_node):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"link {link.name} is served to {identity.km(link.peer_node)}, not to {caller}",
            )
        return link

    async def _check_incarnations(self, link: Link, request, context) -> None:
        if request.receiver_incarnation != link.incarnation:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale receiver incarnation {request.receiver_incarnation!r}: KM {self.km.node} restarted or "
                f"recreated its end of link {link.name}; say Hello again",
            )
        if link.observe_peer(request.sender_incarnation):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KM {self.km.node} did not know sender incarnation {request.sender_incarnation!r}; "
                "material shared before was dropped",
            )

    async def Hello(self, request, context):
        link = await self._link(request, context)
        link.observe_peer(request.incarnation)
        return km_pb2.HelloReply(incarnation=link.incarnation)

    async def AgreeKeys(self, request, context):
        link = await self._link(request, context)
        await self._check_incarnations(link, request, context)
        if not request.key_ids and not request.abandoned_key_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "AgreeKeys names no key ID")
        collector = self.collectors[link.end]
        collector.abandon(list(request.abandoned_key_ids))
        key_ids = list(request.key_ids)
        try:
            collector.announce(key_ids, request.sender_incarnation)
        except CollectorFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        remaining = context.time_remaining()
        wait_s = AGREE_WAIT_S if remaining is None else min(AGREE_WAIT_S, remaining / 2)
        held = await collector.held(key_ids, wait_s)
        if link.peer_incarnation != request.sender_incarnation:
            # The peer restarted while we waited: what we hold belongs to no one now.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the sender restarted during key agreement")
        reason, message = collector.waiting if len(held) < len(key_ids) else ("", "")
        return km_pb2.AgreeKeysReply(
            bits=link.incoming.bits_of(held), held_key_ids=held, waiting_reason=reason, waiting_message=message,
            seconds_per_key=link.devices.seconds_per_key or 0.0)

    async def DeviceStatus(self, request, context):
        link = await self._link(request, context)
        return device_end_to_pb(link)

    async def Deliver(self, request, context):
        link = await self._link(request, context)
        await self._check_incarnations(link, request, context)
        if not request.deliveries:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Deliver request needs at least one delivery")
        refused = []
        for d in request.deliveries:  # one by one, each whole or not at all
            spans = [Span(s.block_id, s.offset, s.length) for s in d.material]
            try:
                self.exchange.accept(link, d.master_sae_id, list(d.slave_sae_ids), list(d.key_ids), d.size_bits,
                                     spans)
            except errors.DeliveryRefused as e:
                refused.append(str(e) or "refused")
            else:
                refused.append("")
        return km_pb2.DeliverReply(refused=refused)

    async def Relay(self, request, context):
        link = await self._link(request, context)
        await self._check_incarnations(link, request, context)
        if not request.relays:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Relay request carries no relay message")

        async def receive(r: km_pb2.RelayRequest) -> str:
            try:
                await self.relays.receive(link, fields_from_pb(r), r.tag)
            except RelayRejected as e:
                code = grpc.StatusCode.PERMISSION_DENIED if e.reason in ("tampered", "replayed") \
                    else grpc.StatusCode.INVALID_ARGUMENT
                return f"{code.name}: {e}"
            except errors.KMError as e:  # a further hop failed or had no key: nobody gets the keys
                return f"{grpc.StatusCode.UNAVAILABLE.name}: {e}"
            return ""

        # Concurrently: an intermediate KM passes each message on and waits for its answer.
        return km_pb2.RelayBatchReply(refused=await asyncio.gather(*map(receive, request.relays)))

    async def Hybrid(self, request, context):
        link = await self._link(request, context)
        await self._check_incarnations(link, request, context)
        if not request.key_ids or request.key_size_bits <= 0 or request.key_size_bits % 8:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a hybrid exchange needs at least one key ID and "
                                f"a key size that is a positive multiple of 8 bits, got {request.key_size_bits}")
        message = HybridMessage(
            link=request.link, session_id=request.session_id, relay_id=request.relay_id, index=request.index,
            master_sae_id=request.master_sae_id, slave_sae_ids=tuple(request.slave_sae_ids),
            key_ids=tuple(request.key_ids), size_bits=request.key_size_bits, stream=request.stream,
            offer=request.offer,
        )
        try:
            reply = await self.relays.receive_hybrid(link, message)
        except RelayRejected as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED if e.reason == "replayed"
                                else grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except errors.KMError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return km_pb2.HybridReply(reply=reply)

    async def Commit(self, request, context):
        link = await self._link(request, context)
        await self._check_incarnations(link, request, context)
        if not request.commits:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Commit request names no relay")

        async def commit(c: km_pb2.RelayCommit) -> str:
            try:
                await self.relays.commit(link, c.session_id, c.relay_id)
            except RelayRejected as e:
                return f"{grpc.StatusCode.NOT_FOUND.name}: {e}"
            except (errors.KMError, errors.DeliveryRefused) as e:
                return f"{grpc.StatusCode.UNAVAILABLE.name}: {e}"
            return ""

        # Concurrently: an intermediate KM passes each commit on and waits for its answer.
        return km_pb2.CommitReply(refused=await asyncio.gather(*map(commit, request.commits)))


def device_end_to_pb(link: Link) -> km_pb2.DeviceEnd:
    """This KM's module end of ``link``: its limits and its own health, not the link's.

    Only this end's health: the peer's view of the link includes what it hears about our end
    from us, and passing that back would keep both ends Down after either recovered.
    """
    own, verdict = link.devices.own, link.devices.health.verdict(("device",))
    limits = dict(key_size=own.key_size, min_key_size=own.min_key_size, max_key_size=own.max_key_size,
                  max_key_per_request=own.max_key_per_request) if own else {}
    return km_pb2.DeviceEnd(known=own is not None, **limits, seconds_per_key=link.devices.seconds_per_key or 0.0,
                            state=verdict.state.value, reason=verdict.reason, message=verdict.message)


def fields_from_pb(r: km_pb2.RelayRequest) -> relay_crypto.RelayFields:
    return relay_crypto.RelayFields(
        link=r.link, sender_incarnation=r.sender_incarnation, receiver_incarnation=r.receiver_incarnation,
        session_id=r.session_id, relay_id=r.relay_id, index=r.index, master_sae_id=r.master_sae_id,
        slave_sae_ids=tuple(r.slave_sae_ids), key_ids=tuple(r.key_ids), key_size_bits=r.key_size_bits,
        direct=r.direct, ciphertext=r.ciphertext,
        pad=tuple((s.block_id, s.offset, s.length) for s in r.pad),
        mac_key=tuple((s.block_id, s.offset, s.length) for s in r.mac_key),
        key_extension=r.key_extension, stream=r.stream,
    )


def fields_to_pb(f: relay_crypto.RelayFields, tag: bytes) -> km_pb2.RelayRequest:
    return km_pb2.RelayRequest(
        link=f.link, sender_incarnation=f.sender_incarnation, receiver_incarnation=f.receiver_incarnation,
        session_id=f.session_id, relay_id=f.relay_id, index=f.index, master_sae_id=f.master_sae_id,
        slave_sae_ids=f.slave_sae_ids, key_ids=f.key_ids, key_size_bits=f.key_size_bits,
        direct=f.direct, ciphertext=f.ciphertext,
        pad=[km_pb2.Span(block_id=b, offset=o, length=n) for b, o, n in f.pad],
        mac_key=[km_pb2.Span(block_id=b, offset=o, length=n) for b, o, n in f.mac_key],
        key_extension=f.key_extension, stream=f.stream, tag=tag,
    )


class _Batches:
    """Items for one kind of request to the peer, sent together.

    An item submitted while a request is under way waits for it and then goes with the
    others submitted meanwhile, up to ``max_weight`` per request (a heavier item still goes
    alone): under load one request carries many items, and an idle link sends each at once.
    ``send`` makes one request of a batch and returns, per item, None or the exception its
    submitter gets; if it raises, every item of the batch fails with that. ``on_idle`` is
    called when nothing is left to send.
    """

    def __init__(self, name: str, send: Callable[[list], Awaitable[list[Exception | None]]], max_weight: int,
                 cancelled: Callable[[], Exception], on_idle: Callable[[], None] = lambda: None):
        self.name = name
        self.send = send
        self.max_weight = max_weight
        self.cancelled = cancelled
        self.on_idle = on_idle
        self._waiting: deque[tuple[Any, int, asyncio.Future]] = deque()
        self._sending: asyncio.Task | None = None

    async def submit(self, item: Any, weight: int = 1) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((item, weight, done))
        if self._sending is None:
            self._sending = asyncio.create_task(self._run(), name=self.name)
        await done

    async def _run(self) -> None:
        batch: list = []
        try:
            while self._waiting:
                batch, weight = [], 0
                while self._waiting and (not batch or weight + self._waiting[0][1] <= self.max_weight):
                    batch.append(self._waiting.popleft())
                    weight += batch[-1][1]
                try:
                    failures = await self.send([item for item, _, _ in batch])
                except Exception as e:  # not the peer's doing, but these items fail all the same
                    failures = [e] * len(batch)
                for (_, _, done), failure in zip(batch, failures):
                    if done.done():  # its submitter gave up waiting
                        continue
                    if failure is None:
                        done.set_result(None)
                    else:
                        done.set_exception(failure)
                batch = []
        finally:  # cancelled: whatever was not answered failed
            self._sending = None
            for _, _, done in [*batch, *self._waiting]:
                if not done.done():
                    done.set_exception(self.cancelled())
            self._waiting.clear()
            self.on_idle()


class PeerClient:
    """The domain's ``Peer`` over gRPC: calls the peer KM of one link, every call with a deadline,
    and maps failures to KM errors."""

    def __init__(self, link: Link, channel: grpc.aio.Channel, replica: int):
        self.link = link
        self.replica = replica  # this KM's, named in every request: the peer's end is picked by it
        self.stub = km_pb2_grpc.LinkPeerStub(channel)
        self._deliveries = self._batches(
            "deliver", "delivery", MAX_KEYS_PER_DELIVER,
            partial(self._send_batch, self.stub.Deliver, km_pb2.DeliverRequest, "deliveries",
                    describe=lambda reason: f"INVALID_ARGUMENT: {reason}"))
        # Relays are batched per session: at an intermediate KM a relay may wait for key on
        # its next link, and a request is answered when all of its relays are, so relays of
        # different sessions (different priorities, different paths) never wait for each other.
        self._relays: dict[str, _Batches] = {}
        self._commits = self._batches("commit", "commit", MAX_COMMITS_PER_REQUEST,
                                      partial(self._send_batch, self.stub.Commit, km_pb2.CommitRequest, "commits"))

    @property
    def peer(self) -> str:
        """The peer KM, as errors name it."""
        return f"KM replica {self.link.peer_replica} of node {self.link.peer_node} (link {self.link.name})"

    def _batches(self, kind: str, item: str, max_weight: int, send, on_idle: Callable[[], None] = lambda: None,
                 name: str = "") -> _Batches:
        return _Batches(f"{kind}-{name or self.link.name}", send, max_weight,
                        lambda: errors.PeerUnavailable(f"{self.peer}: the {item} was cancelled"), on_idle)

    async def hello(self) -> None:
        try:
            reply = await self.stub.Hello(
                km_pb2.HelloRequest(link=self.link.name, incarnation=self.link.incarnation,
                                    sender_replica=self.replica), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            self._failed(e)
            raise errors.PeerUnavailable(f"{self.peer}: {e.code().name}: {e.details()}") from None
        self.link.peer_unreachable_at = None
        self.link.observe_peer(reply.incarnation)

    async def _call(self, method, request_factory):
        try:
            if self.link.peer_incarnation is None:
                await self.hello()
            incarnation = self.link.peer_incarnation
            reply = await method(request_factory(incarnation), timeout=RPC_TIMEOUT_S)
            self.link.peer_unreachable_at = None
            return reply, incarnation
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                self.link.forget_peer()
            self._failed(e)
            raise errors.PeerUnavailable(f"{self.peer}: {e.code().name}: {e.details()}") from None
        except grpc.aio.UsageError:  # the channel was closed: a topology change removed the link
            raise errors.PeerUnavailable(f"{self.peer}: the link was removed") from None

    def _failed(self, error: grpc.aio.AioRpcError) -> None:
        """Note a call that did not reach the peer KM (not one it answered with a refusal)."""
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self.link.peer_unreachable_at = time.monotonic()

    async def _send_batch(self, method, request_type, field: str, items: list,
                          describe: Callable[[str], str] = lambda reason: reason) -> list[Exception | None]:
        """One request of ``request_type`` carrying ``items`` in its repeated ``field``; per
        item, None or the error of the peer's refusal (``describe`` words its reason)."""
        try:
            reply, _ = await self._call(method, lambda inc: request_type(
                link=self.link.name, sender_incarnation=self.link.incarnation, receiver_incarnation=inc,
                sender_replica=self.replica, **{field: items},
            ))
        except errors.KMError as e:
            return [errors.PeerUnavailable(str(e)) for _ in items]
        if len(reply.refused) != len(items):
            return [errors.PeerUnavailable(f"{self.peer}: INVALID_ARGUMENT: answered for {len(reply.refused)} of "
                                           f"{len(items)} {field}") for _ in items]
        return [errors.PeerUnavailable(f"{self.peer}: {describe(reason)}") if reason else None
                for reason in reply.refused]

    async def agree_keys(self, key_ids: list[str], abandoned: list[str]) -> tuple[km_pb2.AgreeKeysReply, str]:
        """Tell the peer which module keys we drew and which we gave up; returns its answer
        (which it holds) and the peer incarnation that answered."""
        return await self._call(self.stub.AgreeKeys, lambda inc: km_pb2.AgreeKeysRequest(
            link=self.link.name, sender_incarnation=self.link.incarnation, receiver_incarnation=inc,
            key_ids=key_ids, abandoned_key_ids=abandoned, sender_replica=self.replica,
        ))

    async def device_status(self) -> km_pb2.DeviceEnd:
        """The peer's module end as the peer last read it."""
        try:
            return await self.stub.DeviceStatus(
                km_pb2.DeviceStatusRequest(link=self.link.name, sender_replica=self.replica), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            raise errors.PeerUnavailable(f"{self.peer}: {e.code().name}: {e.details()}") from None

    async def relay(self, fields: relay_crypto.RelayFields, tag: bytes) -> None:
        """Send one relay hop; returns when the destination holds the keys."""
        if fields.receiver_incarnation != self.link.peer_incarnation or not fields.receiver_incarnation:
            raise errors.PeerUnavailable(f"{self.peer} is not known in its current incarnation; retry")
        batches = self._relays.get(fields.session_id) or self._relay_batches(fields.session_id)
        await batches.submit(fields_to_pb(fields, tag), len(fields.key_ids))

    def _relay_batches(self, session_id: str) -> _Batches:
        def idle() -> None:
            if self._relays.get(session_id) is batches:
                del self._relays[session_id]

        batches = self._relays[session_id] = self._batches(
            "relay", "relay", MAX_RELAYED_KEYS_PER_REQUEST, self._send_relays, idle,
            name=f"{self.link.name}-{session_id}")
        return batches

    async def _send_relays(self, relays: list[km_pb2.RelayRequest]) -> list[Exception | None]:
        return await self._send_batch(self.stub.Relay, km_pb2.RelayBatch, "relays", relays)

    async def hybrid(self, m: HybridMessage) -> bytes:
        reply, _ = await self._call(self.stub.Hybrid, lambda inc: km_pb2.HybridRequest(
            link=m.link, sender_incarnation=self.link.incarnation, receiver_incarnation=inc,
            sender_replica=self.replica, session_id=m.session_id, relay_id=m.relay_id, index=m.index,
            master_sae_id=m.master_sae_id, slave_sae_ids=m.slave_sae_ids, key_ids=m.key_ids, key_size_bits=m.size_bits,
            stream=m.stream, offer=m.offer,
        ))
        return reply.reply

    async def commit(self, link: str, session_id: str, relay_id: str) -> None:
        """Release a relay's keys at the destination (passed on by every intermediate KM);
        returns once they are released. Commits made meanwhile go in one request."""
        await self._commits.submit(km_pb2.RelayCommit(session_id=session_id, relay_id=relay_id))

    async def deliver(self, master: str, slaves: list[str], key_ids: list[str], size_bits: int,
                      spans: list[Span]) -> None:
        """Hand keys to the peer KM; returns once it holds them all, raises if it holds none.

        A delivery made while a Deliver request is under way waits for it and then goes with
        the others made meanwhile in one request: under load one request carries many
        deliveries, and an idle link sends each at once."""
        delivery = km_pb2.Delivery(
            master_sae_id=master, slave_sae_ids=slaves, key_ids=key_ids, size_bits=size_bits,
            material=[km_pb2.Span(block_id=s.block_id, offset=s.offset, length=s.length) for s in spans],
        )
        await self._deliveries.submit(delivery, len(key_ids))
