"""Moves key from a link's QKD module ends into the KM pools, fitted to the devices.

Master side, ``LinkFeed``: reads this end's ETSI 014 status and the peer's end (from the peer
KM), fits the block size to both, draws keys as master SAE in draws sized so that the slave
end hands them over within the KM ⇄ KM deadline, and names them to the peer (``AgreeKeys``).
Drawn keys wait aside until the peer holds the same keys; only then do they join the
outgoing pool. Keys the peer does not hold within ``sync_timeout_s`` are given up and counted
as burned by reason: they are gone from the module and shared with no one, so they can never
be used twice.

Slave side, ``PeerKeyCollector``: collects from this end, as slave SAE, the keys the peer
named, one dec_keys request at a time (a device answers them in turn), asking again with
backoff while the end says "not found" (it has not synchronised yet) or fails, and puts them
in the incoming pool.

What the devices and the peer answer goes into the link's health: errors become link state
and slower retries, never a crash or a tight loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vqkd.km.domain import errors
from vqkd.km.domain.devices import DrawSizer, EndLimits, LimitsMismatch, fit_block_bits
from vqkd.km.domain.keypool import SpanError
from vqkd.km.domain.links import Link
from vqkd.km.etsi014.client import ETSI014Error

if TYPE_CHECKING:
    from vqkd.km.etsi014.client import ETSI014Client
    from vqkd.km.etsi014.schema import Status

log = logging.getLogger(__name__)

IDLE_S = 0.05  # pool full, or nothing new at the module
MAX_BACKOFF_S = 2.0
# Blocks per draw, whatever the module allows: a module's whole max_key_per_request (4096
# blocks of 8192 bits is a 5.9 MB JSON body) is parsed in one go and stalls the event loop of
# both KMs (~40 ms) while SAE requests wait; 512 blocks keep each stall short.
MAX_BLOCKS_PER_DRAW = 512
# Draws waiting for the peer at once: while the slave end hands over one, the next is
# already named, so a slow slave end never idles between draws.
DRAWS_IN_FLIGHT = 2
PEER_END_MAX_AGE_S = 1.0  # how old the peer's view of its module end may be before a draw
# The slave KM asks its end again this much later after "not found", doubling up to 1 s.
NOT_FOUND_BACKOFF_S = 0.025
MAX_NOT_FOUND_BACKOFF_S = 1.0
MAX_ABANDONED = 4096  # given-up key IDs kept for the next AgreeKeys while the peer is away
# Keys the peer may ask one KM to collect at once (its draws in flight, with room to spare).
MAX_COLLECTING_KEYS = 8 * DRAWS_IN_FLIGHT * MAX_BLOCKS_PER_DRAW


def device_reason(e: ETSI014Error) -> str:
    """The link-state reason for a module end's failed answer."""
    if e.status == 0:
        return "DeviceUnreachable"
    if e.status in (400, 401, 403):
        return "DeviceRefused"
    if e.status == 200:
        return "DeviceMalformedAnswer"
    return "DeviceUnavailable"


def end_limits(status: Status) -> EndLimits:
    limits = EndLimits(key_size=status.key_size, min_key_size=status.min_key_size,
                       max_key_size=status.max_key_size, max_key_per_request=status.max_key_per_request)
    if limits.max_key_per_request < 1 or limits.key_size < 1:
        raise ETSI014Error(200, f"status announces max_key_per_request={limits.max_key_per_request} and "
                                f"key_size={limits.key_size}; both must be at least 1")
    return limits


@dataclass(slots=True)
class _Drawn:
    data: bytes
    drawn_at: float


class LinkFeed:
    """Keeps a link's outgoing pool filled from this KM's module end (master side)."""

    def __init__(self, node: str, link: Link, module: ETSI014Client, *, draw_target_s: float,
                 on_drawn: Callable[[Link, int], None] = lambda link, bits: None,
                 clock: Callable[[], float] = time.monotonic):
        self.node = node
        self.link = link
        self.module = module
        self.on_drawn = on_drawn
        self.clock = clock
        self.sizer = DrawSizer(draw_target_s, ceiling=MAX_BLOCKS_PER_DRAW)
        self._pending: OrderedDict[str, _Drawn] = OrderedDict()  # drawn, not yet held by the peer
        self._abandoned: deque[str] = deque(maxlen=MAX_ABANDONED)
        self._peer_end_read_at = -math.inf
        # Why the peer does not hold the pending keys yet: the burn reason if they expire.
        self._waiting = ("peer_unavailable", "the peer KM has not answered yet")
        self._backoff = IDLE_S

    def _pending_changed(self) -> None:
        self.link.devices.awaiting_peer_bits = 8 * sum(len(d.data) for d in self._pending.values())

    async def step(self) -> bool:
        """One round: agree what is pending, give up what waited too long, draw what is due.
        True if key moved."""
        agreed = await self._agree() if self._pending or self._abandoned else False
        self._give_up_expired()
        drawn = await self._draw()
        return agreed or drawn

    async def run(self) -> None:
        health = self.link.devices.health
        while True:
            try:
                if self.link.peer is not None and self.link.peer_incarnation is None:
                    # Announce ourselves first: a peer that knew a previous instance of this
                    # KM drops what it shared with it before it names any of it to us.
                    await self.link.peer.hello()
                moved = await self.step()
                self._backoff = IDLE_S
                if not moved:
                    await asyncio.sleep(IDLE_S)
                continue
            except asyncio.CancelledError:
                raise
            except ETSI014Error as e:
                health.failed("device", device_reason(e), f"QKD module end {self.module.base_url}: {e}")
                problem = f"its QKD module end {self.module.base_url} answered: {e}"
            except errors.KMError as e:
                health.failed("peer", "PeerUnavailable", str(e))
                problem = str(e)
            except Exception as e:  # a bug or an unforeseen answer: keep the feed alive, slower
                log.exception("link %s: unexpected failure while drawing key", self.link.name)
                health.failed("device", "FeedFailed", f"unexpected failure while drawing key: {e!r}")
                problem = repr(e)
            self._give_up_expired()
            log.info("link %s: cannot draw key now (%s); retrying in %.2fs", self.link.name, problem, self._backoff)
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    # -- reading both ends ------------------------------------------------------------------

    async def _read_own_end(self) -> Status:
        cfg, devices = self.link.config, self.link.devices
        status = await self.module.status(cfg.peer_module_sae_id)
        devices.own = end_limits(status)
        devices.health.succeeded("device")
        return status

    async def _read_peer_end(self) -> EndLimits | None:
        """The peer's module end, refreshed when stale; None while it cannot serve."""
        link, devices = self.link, self.link.devices
        now = self.clock()
        if now - self._peer_end_read_at >= PEER_END_MAX_AGE_S:
            end = await link.peer.device_status()
            # A peer that has not read its own end yet (its link end is new) is asked again
            # at the next round, not a whole refresh period later: a new link draws at once.
            self._peer_end_read_at = now if end.known else -math.inf
            devices.health.succeeded("peer")
            devices.peer = EndLimits(end.key_size, end.min_key_size, end.max_key_size,
                                     end.max_key_per_request) if end.known else None
            if end.seconds_per_key > 0:
                self.sizer.observe(end.seconds_per_key)
            if end.state == "Down":
                devices.health.block("peer-device", "PeerDeviceUnavailable",
                                     f"the QKD module end of node {link.peer_node}: {end.message}")
            else:
                devices.health.unblock("peer-device")
        if devices.peer is None or devices.health.blocking("peer-device"):
            return None
        return devices.peer

    def _fit(self, own: EndLimits, peer: EndLimits) -> int | None:
        link, devices = self.link, self.link.devices
        try:
            block = fit_block_bits(link.config.block_bits, {
                f"node {self.node}'s end": own, f"node {link.peer_node}'s end": peer})
        except LimitsMismatch as e:
            if devices.block_bits is not None or not devices.health.blocking("limits"):
                log.warning("link %s: %s", link.name, e)
            devices.block_bits = None
            devices.health.block("limits", "DeviceLimits", str(e))
            return None
        devices.health.unblock("limits")
        devices.block_bits = block
        return block

    # -- drawing ----------------------------------------------------------------------------

    async def _draw(self) -> bool:
        link, cfg = self.link, self.link.config
        if link.peer is None:
            return False
        status = await self._read_own_end()
        peer = await self._read_peer_end()
        if peer is None:
            return False
        block = self._fit(link.devices.own, peer)
        if block is None:
            return False
        module_bits = status.stored_key_count * status.key_size
        lacking = link.lacking_bits
        per_draw = min(self.sizer.limit, link.devices.own.max_key_per_request, peer.max_key_per_request)
        room = DRAWS_IN_FLIGHT * per_draw - len(self._pending)
        drew = False
        while (number := min(per_draw, room, module_bits // block, lacking // block)) > 0:
            try:
                keys = await self.module.enc_keys(cfg.peer_module_sae_id, number, block)
            except ETSI014Error as e:
                if e.status != 503:
                    raise
                # The key its status counted went elsewhere (the peer drew it meanwhile):
                # not a failure; the next status says what there is.
                break
            now = self.clock()
            for key_id, data in keys:
                self._pending[key_id] = _Drawn(data, now)
            self._pending_changed()
            bits = number * block
            link.module_drawn_bits += bits
            module_bits -= bits
            lacking -= bits
            room -= number
            drew = True
        return drew

    # -- agreeing with the peer ---------------------------------------------------------------

    async def _agree(self) -> bool:
        link = self.link
        if link.peer is None:
            return False
        abandoned = list(self._abandoned)
        try:
            reply, incarnation = await link.peer.agree_keys(list(self._pending), abandoned)
        except errors.KMError as e:
            self._waiting = ("peer_unavailable", str(e))
            raise
        for key_id in abandoned:  # delivered: the peer dropped them
            self._abandoned.popleft()
        if reply.seconds_per_key > 0:
            self.sizer.observe(reply.seconds_per_key)
        if link.peer_incarnation != incarnation:
            return False  # the peer restarted meanwhile: what the old one held is gone
        held = [key_id for key_id in reply.held_key_ids if key_id in self._pending]
        blocks = [(key_id, self._pending.pop(key_id).data) for key_id in held]
        self._pending_changed()
        if self._pending:
            self._waiting = (reply.waiting_reason or "not_synchronised", reply.waiting_message
                             or f"the QKD module end of node {link.peer_node} has not handed them over")
        if not blocks:
            return False
        link.outgoing.add(blocks)
        link.queue.notify()
        bits = sum(len(data) for _, data in blocks) * 8
        self.on_drawn(link, bits)
        return True

    def _give_up_expired(self) -> None:
        link = self.link
        deadline = self.clock() - link.config.sync_timeout_s
        expired = []
        for key_id, drawn in self._pending.items():
            if drawn.drawn_at > deadline:
                break
            expired.append(key_id)
        if not expired:
            return
        bits = 8 * sum(len(self._pending.pop(key_id).data) for key_id in expired)
        self._pending_changed()
        self._abandoned.extend(expired)
        reason, message = self._waiting
        link.burned_bits[reason] = link.burned_bits.get(reason, 0) + bits
        log.warning("link %s: gave up %d keys (%d bits) drawn from the QKD module %.0f s ago (%s): %s",
                    link.name, len(expired), bits, link.config.sync_timeout_s, reason, message)
        link.devices.health.trouble("KeysBurned", f"{bits} bits drawn from the QKD module were given up after "
                                                  f"{link.config.sync_timeout_s:.0f} s ({reason}): {message}")


@dataclass(slots=True, eq=False)  # compared by identity: a chunk's IDs change as the peer gives keys up
class _Chunk:
    """Key IDs to collect with one dec_keys request, all named by the same peer instance."""

    key_ids: list[str]
    incarnation: str
    announced_at: float
    attempts: int = 0
    next_try_at: float = 0.0


class CollectorFull(Exception):
    """The peer named more keys than this KM collects at once."""


class PeerKeyCollector:
    """Collects from this KM's module end the keys the peer KM drew as master (slave side)."""

    def __init__(self, node: str, link: Link, module: ETSI014Client, *, draw_target_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.node = node
        self.link = link
        self.module = module
        self.clock = clock
        self.sizer = DrawSizer(draw_target_s, ceiling=MAX_BLOCKS_PER_DRAW)
        self._chunks: deque[_Chunk] = deque()
        self._collecting: set[str] = set()
        self._progress = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.waiting = ("", "")  # (reason, message) of the last request that found nothing

    def announce(self, key_ids: list[str], incarnation: str) -> None:
        """Start collecting the keys the peer (in ``incarnation``) named, unless held already."""
        if any(chunk.incarnation != incarnation for chunk in self._chunks):
            # Named by a previous instance of the peer: that instance and its pools are gone.
            self._chunks = deque(chunk for chunk in self._chunks if chunk.incarnation == incarnation)
            self._collecting = {key_id for chunk in self._chunks for key_id in chunk.key_ids}
        incoming = self.link.incoming
        new = [key_id for key_id in dict.fromkeys(key_ids)
               if key_id not in self._collecting and not incoming.holds(key_id)]
        if not new:
            return
        if len(self._collecting) + len(new) > MAX_COLLECTING_KEYS:
            raise CollectorFull(f"KM collects at most {MAX_COLLECTING_KEYS} keys of link {self.link.name} at once; "
                                f"{len(self._collecting)} are waiting for its QKD module end")
        own = self.link.devices.own
        size = max(1, min(self.sizer.limit, own.max_key_per_request if own else self.sizer.limit))
        now = self.clock()
        for i in range(0, len(new), size):
            self._chunks.append(_Chunk(new[i:i + size], incarnation, now, next_try_at=now))
        self._collecting.update(new)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"collect-{self.link.name}-{self.link.peer_replica}")

    def abandon(self, key_ids: list[str]) -> None:
        """The peer gave these keys up: stop collecting them and drop those already held."""
        if not key_ids:
            return
        gone = set(key_ids)
        for chunk in self._chunks:
            chunk.key_ids = [key_id for key_id in chunk.key_ids if key_id not in gone]
        self._chunks = deque(chunk for chunk in self._chunks if chunk.key_ids)
        self._collecting -= gone
        self.link.incoming.discard(key_ids)

    async def held(self, key_ids: list[str], wait_s: float) -> list[str]:
        """The named keys held now; if none, waits up to ``wait_s`` for this KM to collect some."""
        incoming = self.link.incoming
        held = [key_id for key_id in key_ids if incoming.holds(key_id)]
        if held or wait_s <= 0:
            return held
        deadline = self.clock() + wait_s
        while not held and any(key_id in self._collecting for key_id in key_ids):
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                break
            held = [key_id for key_id in key_ids if incoming.holds(key_id)]
        return held

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _drop_expired(self, now: float) -> None:
        timeout = self.link.config.sync_timeout_s
        while self._chunks and now - self._chunks[0].announced_at > timeout:
            chunk = self._chunks.popleft()
            self._collecting.difference_update(chunk.key_ids)
            log.info("link %s: stopped collecting %d keys the module end did not hand over within %.0f s",
                     self.link.name, len(chunk.key_ids), timeout)

    async def _run(self) -> None:
        try:
            while True:
                now = self.clock()
                self._drop_expired(now)
                if not self._chunks:
                    break
                due = next((chunk for chunk in self._chunks if chunk.next_try_at <= now), None)
                if due is None:
                    await asyncio.sleep(min(chunk.next_try_at for chunk in self._chunks) - now)
                    continue
                await self._collect(due)
        finally:
            self._task = None
            self._notify()

    async def _collect(self, chunk: _Chunk) -> None:
        link = self.link
        health = link.devices.health
        started = self.clock()
        try:
            blocks = await self.module.dec_keys(link.config.peer_module_sae_id, chunk.key_ids)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._retry_later(chunk, e)
            if not (isinstance(e, ETSI014Error) and e.keys_not_found):
                reason = device_reason(e) if isinstance(e, ETSI014Error) else "DeviceUnavailable"
                health.failed("device", reason, f"QKD module end {self.module.base_url}: {e}")
            return
        health.succeeded("device")
        self.sizer.observe((self.clock() - started) / len(blocks))
        link.devices.seconds_per_key = self.sizer.seconds_per_key
        # Meanwhile the peer may have given some keys up, or restarted: keep only what it still wants.
        wanted = set(chunk.key_ids) if chunk in self._chunks else set()
        if chunk in self._chunks:
            self._chunks.remove(chunk)
        self._collecting.difference_update(wanted)
        if link.peer_incarnation == chunk.incarnation:
            try:
                link.incoming.add([(key_id, data) for key_id, data in blocks
                                   if key_id in wanted and not link.incoming.holds(key_id)])
            except SpanError as e:  # cannot happen: held keys were filtered out
                log.error("link %s: %s", link.name, e)
        self._notify()

    def _retry_later(self, chunk: _Chunk, e: Exception) -> None:
        if chunk not in self._chunks:  # given up or abandoned meanwhile
            return
        chunk.attempts += 1
        now = self.clock()
        if isinstance(e, ETSI014Error) and e.keys_not_found:
            self.waiting = ("not_synchronised", f"the QKD module end of node {self.node} does not know the keys yet "
                                                f"({e.message})")
            if now - chunk.announced_at > self.link.config.sync_timeout_s / 2 and len(chunk.key_ids) > 1:
                # Longer than any synchronisation lag: maybe one key is lost. Halving the
                # request finds it and keeps the others.
                half = len(chunk.key_ids) // 2
                later = _Chunk(chunk.key_ids[half:], chunk.incarnation, chunk.announced_at, chunk.attempts)
                chunk.key_ids = chunk.key_ids[:half]
                self._chunks.insert(self._chunks.index(chunk) + 1, later)
                later.next_try_at = now
            backoff = min(NOT_FOUND_BACKOFF_S * 2 ** (chunk.attempts - 1), MAX_NOT_FOUND_BACKOFF_S)
        else:
            self.waiting = ("device_error", f"the QKD module end of node {self.node}: {e}")
            backoff = min(IDLE_S * 2 ** (chunk.attempts - 1), MAX_BACKOFF_S)
        chunk.next_try_at = now + backoff
