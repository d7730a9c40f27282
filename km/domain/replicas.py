"""One KME, several KM instances: how a node's KM replicas hold keys for its slave SAEs.

A node may run several KM replicas (``KMTopology.replicas``); its applications see one KME.
A master's keys are committed at whichever replica the relay reached, and the slave's
dec_keys may reach any replica. So:

- The replica that commits keys for its slave SAEs (their *primary*) has one sibling hold a
  copy before the commit is acknowledged: the master gets its keys only once two replicas
  hold them. When no sibling answers, the keys are held once (``on_held_once``).
- dec_keys at any replica takes the keys it holds as primary, dropping their copies at the
  copy holder before it answers, and asks every sibling at once for the others.
- A copy is handed out only when its primary is gone: the copy holder asks the primary for
  its incarnation. A primary answering in the incarnation the copy records is authoritative
  and the copy is refused; one that cannot be reached (its connection refused), or answers
  in another incarnation, lost its keys, and the copy is promoted (``on_promoted``). One that
  is reached but does not answer in time may be alive: the copy waits, and the dec_keys is
  answered "retry".

Each key is therefore delivered once, also when dec_keys for it race at two replicas: a
store hands out a key without an await in between, a copy leaves only once its primary is
gone, and a primary hands a key out only once its copy is dropped — or its holder cannot be
reached, having lost it with its process (a holder reached but slow makes the dec_keys
answer "retry"). The hole: a replica alive that refuses a sibling's connections while others
reach it — a primary its copy holder cannot connect to, or a copy holder the primary cannot
connect to for the drop — lets a copy out of a key handed out by its primary too.

All or none per request: keys collected from siblings for a request that fails in another
part are held again at the replica that collected them (with a copy of their own), not lost.

ETSI 004: a session's key stream lives at one owner replica per endpoint node
(``stream_owner``, a pure function of the session ID and the node's replica ordinals, so
every replica names the same owner without asking); calls and chunks that reach another
replica are passed to the owner. A lost owner loses its streams' state.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Callable, Protocol

from vqkd.km.domain import errors
from vqkd.km.domain.keymanager import KeyManager
from vqkd.km.domain.keystore import KeyStore, NotASlave, StoredKey, StoreFull
from vqkd.km.domain.sessions import Session

log = logging.getLogger(__name__)

# How long a sibling that did not answer is passed over when choosing a copy holder: a dead
# replica must not cost every commit a failed call until the topology drops it.
PASS_OVER_S = 2.0
# How often a replica asks its siblings who they are, and how long one stays out of reach
# before the copies it held are made again elsewhere: until then a key whose copy holder
# restarted or went is held once.
CHECK_SIBLINGS_S = 1.0
LOST_AFTER_S = 3.0
# How long a replica the topology no longer names (its node was scaled down) is still asked
# for keys: while it stops it hands its keys over (``hand_over``), and a key missing
# meanwhile is "retry", not "not found". Longer than a pod's termination grace period.
DEPARTING_S = 30.0


def stream_owner(session_id: str, ordinals: Iterable[int]) -> int:
    """The replica owning a session's ETSI 004 stream among a node's replica ``ordinals``.

    Rendezvous hashing: a replica added or removed moves only the streams it gains or had.
    """
    return max(ordinals, key=lambda ordinal: hashlib.sha256(f"{session_id}/{ordinal}".encode()).digest())


class SiblingUnavailable(Exception):
    """A sibling replica did not answer, or refused; the message says which and why."""


class SiblingTimedOut(SiblingUnavailable):
    """A sibling replica was reached but did not answer in time: it may well be alive."""


@dataclass(frozen=True, slots=True)
class HeldKeys:
    """Keys held for slave SAEs that share a master, slaves, a key extension and a time left."""

    master: str
    slaves: frozenset[str]
    keys: list[tuple[str, bytes]]
    extension: dict | None
    ttl_s: float


class Sibling(Protocol):
    """Another KM replica of this node, as this replica calls it; every call raises
    ``SiblingUnavailable`` when the sibling does not answer."""

    async def incarnation(self) -> str: ...

    async def hold_copies(self, incarnation: str, held: list[HeldKeys]) -> None:
        """Have the sibling keep copies of keys this replica (in ``incarnation``) holds."""

    async def drop_copies(self, key_ids: list[str]) -> None: ...

    async def take_keys(self, incarnation: str, caller: str, master: str,
                        key_ids: list[str]) -> tuple[list[HeldKeys], bool]:
        """The named keys the sibling held for ``master`` (it holds them no more), and whether
        it holds copies of others it could not hand out yet (their primary did not answer in
        time). Raises ``NotASlave`` (nothing taken) if ``caller`` is not a slave of one of them."""

    async def hand_chunks(self, session_id: str, index: int, chunks: list[tuple[str, bytes]]) -> None: ...


def _held(taken: list[tuple[str, StoredKey]], now: float) -> list[HeldKeys]:
    """Taken keys as HeldKeys, one per run of keys from one delivery."""
    runs: list[HeldKeys] = []
    for key_id, entry in taken:
        last = runs[-1] if runs else None
        if last is None or (last.master, last.slaves, last.extension) != (entry.master, entry.slaves, entry.extension) \
                or last.ttl_s != entry.expires - now:
            last = HeldKeys(entry.master, entry.slaves, [], entry.extension, entry.expires - now)
            runs.append(last)
        last.keys.append((key_id, entry.key))
    return runs


class NodeReplicas:
    """This replica's part in holding its node's keys: the primary store is the key
    manager's; ``copies`` holds copies of keys siblings are primary of. ``siblings`` is set
    by whoever connects the replicas (from the topology), keyed by replica ordinal."""

    def __init__(self, km: KeyManager, clock: Callable[[], float] = time.monotonic,
                 on_held_once: Callable[[int], None] = lambda keys: None,
                 on_promoted: Callable[[int], None] = lambda keys: None):
        self.km = km
        self.store = km.store
        self.copies = KeyStore(km.config.delivered_key_ttl_s, km.config.delivered_store_max_bits, clock)
        self.siblings: Mapping[int, Sibling] = {}
        # Replicas the topology no longer names, since when: asked for keys, never given copies.
        self.departing: dict[int, tuple[Sibling, float]] = {}
        self.clock = clock
        self.on_held_once = on_held_once
        self.on_promoted = on_promoted
        self._passed_over: dict[int, float] = {}  # sibling -> until when it is not asked to hold copies
        self._incarnations: dict[int, str] = {}  # sibling -> the incarnation it last answered with
        self._unreachable_since: dict[int, float] = {}
        self._given_up: set[int] = set()  # siblings out of reach so long their copies were made again

    @property
    def replica(self) -> int:
        return self.km.replica

    # -- holding -----------------------------------------------------------------------

    async def hold(self, master: str, slaves: frozenset[str], keys: list[tuple[str, bytes]],
                   extension: dict | None, ttl_s: float | None = None) -> None:
        """Hold keys for slave SAEs here as their primary, with a copy at one sibling when
        one answers; returns once both hold them. ``DeliveryRefused`` if they cannot be held."""
        ttl = self.store.ttl_s if ttl_s is None else ttl_s
        holder = await self._copy_somewhere(HeldKeys(master, slaves, keys, extension, ttl)) if self.siblings else None
        try:
            self.store.put(master, slaves, keys, extension, ttl_s=ttl, holder=holder)
        except (StoreFull, errors.KeysNotFound) as e:
            if holder is not None:
                await self._drop_left(holder, [key_id for key_id, _ in keys])
            raise errors.DeliveryRefused(str(e)) from None

    async def _copy_somewhere(self, held: HeldKeys) -> int | None:
        """The sibling now holding a copy, tried from the next ordinal up; None if none did."""
        now = self.clock()
        ordinals = sorted(self.siblings, key=lambda o: (self._passed_over.get(o, 0.0) > now, o < self.replica, o))
        for ordinal in ordinals:
            if self._passed_over.get(ordinal, 0.0) > now:
                break
            try:
                await self.siblings[ordinal].hold_copies(self.km.incarnation, [held])
            except SiblingUnavailable as e:
                log.warning("replica %d of node %s holds no copy of %d keys: %s", ordinal, self.km.node,
                            len(held.keys), e)
                self._passed_over[ordinal] = self.clock() + PASS_OVER_S
                continue
            self._passed_over.pop(ordinal, None)
            return ordinal
        self.on_held_once(len(held.keys))
        return None

    async def copy_again(self, lost: int) -> int:
        """Sibling ``lost`` no longer holds the copies it held of keys this replica is primary of
        (it restarted, or stays out of reach): copy them to a sibling that answers, ``lost``
        itself if it is back. Returns how many keys got a new copy."""
        now, copied = self.clock(), 0
        for number, entries in self.store.copied_at(lost):
            if not entries:
                continue
            first = entries[0][1]
            held = HeldKeys(first.master, first.slaves, [(key_id, entry.key) for key_id, entry in entries],
                            first.extension, first.expires - now)
            holder = await self._copy_somewhere(held)
            self.store.move_copy(number, holder)
            # A key taken while its copy was being made dropped the old copy only: drop the new one.
            ids = [key_id for key_id, _ in held.keys]
            taken = [key_id for key_id in ids if key_id not in self.store.held(ids)]
            if holder is not None:
                if taken:
                    await self._drop_left(holder, taken)
                copied += len(ids) - len(taken)
        if copied:
            log.info("node %s replica %d: %d keys whose copy replica %d lost are copied again", self.km.node,
                     self.replica, copied, lost)
        return copied

    def _departing(self) -> dict[int, tuple[Sibling, float]]:
        """The departing replicas still asked: those the topology dropped under ``DEPARTING_S`` ago."""
        now = self.clock()
        return {o: entry for o, entry in self.departing.items() if now - entry[1] < DEPARTING_S and o not in self.siblings}

    async def hand_over(self) -> int:
        """This replica stops for good (its node is scaled down; the highest ordinals go): the
        keys it is primary of become copies at the lowest sibling, which hands them out once
        this replica is gone. They leave this store first, so none is handed out here meanwhile;
        the copies other siblings held of them are dropped. Replica 0 always stays, and hands
        nothing over. Returns how many keys were handed over."""
        lower = [ordinal for ordinal in self.siblings if ordinal < self.replica]
        if not lower:
            return 0
        target, now, moved = min(lower), self.clock(), 0
        for holder in {None, *self.siblings} - {target}:
            for _, entries in self.store.copied_at(holder):
                if not entries:
                    continue
                ids = [key_id for key_id, _ in entries]
                self.store.drop(ids)
                first = entries[0][1]
                held = HeldKeys(first.master, first.slaves, [(key_id, entry.key) for key_id, entry in entries],
                                first.extension, first.expires - now)
                try:
                    await self.siblings[target].hold_copies(self.km.incarnation, [held])
                except SiblingUnavailable as e:
                    log.warning("node %s replica %d could not hand %d keys over to replica %d: %s", self.km.node,
                                self.replica, len(ids), target, e)
                    self._put_back(self.store, entries)
                    continue
                moved += len(ids)
                if holder is not None:
                    await self._drop_left(holder, ids)
        if moved:
            log.info("node %s replica %d handed %d keys over to replica %d before stopping", self.km.node,
                     self.replica, moved, target)
        return moved

    async def check_siblings(self) -> None:
        """Ask every sibling who it is: one that answers as a new process, or has been out of
        reach for ``LOST_AFTER_S``, lost the copies it held, and they are made again."""
        now = self.clock()
        answers = await asyncio.gather(*(self.siblings[o].incarnation() for o in self.siblings),
                                       return_exceptions=True)
        for ordinal, answer in zip(list(self.siblings), answers):
            if isinstance(answer, SiblingUnavailable):
                since = self._unreachable_since.setdefault(ordinal, now)
                if now - since >= LOST_AFTER_S and ordinal not in self._given_up:
                    self._given_up.add(ordinal)
                    await self.copy_again(ordinal)
                continue
            if isinstance(answer, BaseException):
                raise answer
            self._unreachable_since.pop(ordinal, None)
            known = self._incarnations.get(ordinal)
            self._incarnations[ordinal] = answer
            if (known is not None and known != answer) or ordinal in self._given_up:
                self._given_up.discard(ordinal)
                await self.copy_again(ordinal)

    async def _drop_at(self, holder: int, key_ids: list[str]) -> None:
        """Have ``holder`` drop its copies of ``key_ids``. ``SiblingTimedOut`` when it was
        reached but did not answer: it may still hold them. One that cannot be reached lost
        them with its process (or is cut off: the hole the module docstring names)."""
        sibling = self.siblings.get(holder)
        if sibling is None:  # no longer a replica of this node: its copies went with it
            return
        try:
            await sibling.drop_copies(key_ids)
        except SiblingTimedOut:
            raise
        except SiblingUnavailable as e:
            log.warning("replica %d of node %s did not drop %d copies: %s", holder, self.km.node, len(key_ids), e)

    async def _drop_copies_of(self, taken: list[tuple[str, StoredKey]]) -> None:
        """Drop the copies of keys being handed out; ``SiblingTimedOut`` if a holder may still
        hold some, and then the keys must not be handed out (its copies could be let out later)."""
        by_holder: dict[int, list[str]] = {}
        for key_id, entry in taken:
            if entry.holder is not None:
                by_holder.setdefault(entry.holder, []).append(key_id)
        outcomes = await asyncio.gather(*(self._drop_at(holder, ids) for holder, ids in by_holder.items()),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _drop_left(self, holder: int, key_ids: list[str]) -> None:
        """Drop copies made for keys that did not stay here, logging a holder that did not
        answer in time: nothing else can be done about them then."""
        try:
            await self._drop_at(holder, key_ids)
        except SiblingTimedOut as e:
            log.warning("replica %d of node %s did not drop %d copies in time: %s", holder, self.km.node,
                        len(key_ids), e)

    def _put_back(self, store: KeyStore, taken: list[tuple[str, StoredKey]]) -> None:
        """Keys taken for a request that failed, held again as they were."""
        now = self.clock()
        for key_id, entry in taken:
            if entry.expires > now:
                try:
                    store.put(entry.master, entry.slaves, [(key_id, entry.key)], entry.extension,
                              ttl_s=entry.expires - now, holder=entry.holder)
                except (StoreFull, errors.KeysNotFound) as e:
                    log.error("node %s lost key %s a failed dec_keys had taken: %s", self.km.node, key_id, e)

    async def _hold_again(self, collected: list[HeldKeys]) -> None:
        for held in collected:
            try:
                await self.hold(held.master, held.slaves, held.keys, held.extension, held.ttl_s)
            except errors.DeliveryRefused as e:
                log.error("node %s lost %d keys collected for a failed dec_keys: %s", self.km.node,
                          len(held.keys), e)

    # -- taking ------------------------------------------------------------------------

    async def take(self, caller: str, master: str, key_ids: list[str]) -> list[tuple[str, StoredKey]]:
        """dec_keys: the keys, from wherever this node holds them, all or none (as
        ``KeyStore.take``; ``errors.Unavailable`` when keys are missing and a sibling that may
        hold them did not answer)."""
        departing = self._departing()
        if not self.siblings and not departing and not len(self.copies):
            return self.store.take(caller, master, key_ids)
        if len(set(key_ids)) != len(key_ids):
            raise errors.KeysNotFound("the same key ID is named more than once")
        local = self.store.take_held(caller, master, key_ids)
        found = dict(local)
        missing = [key_id for key_id in key_ids if key_id not in found]
        collected: list[HeldKeys] = []
        if missing:
            collected, unanswered, refused = await self._collect(caller, master, missing)
            now = self.clock()
            for held in collected:
                for key_id, key in held.keys:
                    found.setdefault(key_id, StoredKey(key, held.master, held.slaves, now + held.ttl_s, held.extension))
            if refused or len(found) < len(key_ids):
                self._put_back(self.store, local)
                await self._hold_again(collected)
                if refused:
                    raise NotASlave(caller)
                absent = next(key_id for key_id in key_ids if key_id not in found)
                if departing:
                    raise errors.Unavailable(
                        f"key {absent} is not held by the KM replicas of node {self.km.node}, and replicas "
                        f"{sorted(departing)}, scaled away, may be handing theirs over: retry shortly")
                if unanswered:
                    raise errors.Unavailable(
                        f"key {absent} is not held by the KM replicas of node {self.km.node} that answered; replicas "
                        f"{unanswered} did not: retry shortly")
                raise errors.KeysNotFound(absent)
        try:
            await self._drop_copies_of(local)
        except SiblingTimedOut as e:
            self._put_back(self.store, local)
            await self._hold_again(collected)
            raise errors.Unavailable(f"a KM replica of node {self.km.node} holding copies of these keys did not "
                                     f"answer in time ({e}); retry shortly") from None
        return [(key_id, found[key_id]) for key_id in key_ids]

    async def _collect(self, caller: str, master: str, key_ids: list[str]) -> tuple[list[HeldKeys], list[int], bool]:
        """Ask every sibling at once, and this replica's copies: what they handed over, who
        did not answer, and whether one refused because ``caller`` is not a slave of its keys."""
        asked = {**{o: sibling for o, (sibling, _) in self._departing().items()}, **self.siblings}
        ordinals = list(asked)
        answers = await asyncio.gather(
            self.give(self.replica, self.km.incarnation, caller, master, key_ids),
            *(asked[o].take_keys(self.km.incarnation, caller, master, key_ids) for o in ordinals),
            return_exceptions=True)
        ordinals.insert(0, self.replica)
        collected, unanswered, refused = [], [], False
        for ordinal, answer in zip(ordinals, answers):
            if isinstance(answer, NotASlave):
                refused = True
            elif isinstance(answer, SiblingUnavailable):
                log.warning("replica %d of node %s did not answer a dec_keys: %s", ordinal, self.km.node, answer)
                unanswered.append(ordinal)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                held, undecided = answer
                collected.extend(held)
                if undecided:
                    unanswered.append(ordinal)
        return collected, unanswered, refused

    # -- served to siblings ------------------------------------------------------------

    def keep_copies(self, primary: int, incarnation: str, held: list[HeldKeys]) -> None:
        """HoldCopies from replica ``primary``: all or none (``StoreFull``, ``KeysNotFound``)."""
        kept: list[str] = []
        try:
            for h in held:
                self.copies.put(h.master, h.slaves, h.keys, h.extension, ttl_s=h.ttl_s, holder=(primary, incarnation))
                kept += [key_id for key_id, _ in h.keys]
        except (StoreFull, errors.KeysNotFound):
            self.copies.drop(kept)
            raise

    def drop_copies(self, primary: int, key_ids: list[str]) -> int:
        """DropCopies from replica ``primary``: forget its copies among ``key_ids``."""
        return self.copies.drop([key_id for key_id, (ordinal, _) in self.copies.held(key_ids).items()
                                 if ordinal == primary])

    async def give(self, requester: int, requester_incarnation: str, caller: str, master: str,
                   key_ids: list[str]) -> tuple[list[HeldKeys], bool]:
        """TakeKeys from replica ``requester``: the named keys held here as primary (their
        copies dropped first) and the copies whose primary is gone, and whether copies are
        held whose primary did not answer in time; ``NotASlave`` and nothing taken if
        ``caller`` is not a slave of one of them."""
        by_primary: dict[tuple[int, str], list[str]] = {}
        for key_id, primary in self.copies.held(key_ids).items():
            by_primary.setdefault(primary, []).append(key_id)
        gone = await asyncio.gather(*(self._gone(ordinal, incarnation, requester, requester_incarnation)
                                      for ordinal, incarnation in by_primary))
        promotable = [key_id for ids, is_gone in zip(by_primary.values(), gone) if is_gone for key_id in ids]
        undecided = None in gone
        # From here to the takes, no await: what is taken is taken once.
        promoted = self.copies.take_held(caller, master, promotable) if promotable else []
        try:
            primary = self.store.take_held(caller, master, key_ids)
        except NotASlave:
            self._put_back(self.copies, promoted)
            raise
        if promoted:
            self.on_promoted(len(promoted))
            log.info("node %s: replica %d hands out %d copies of keys whose primary is gone", self.km.node,
                     self.replica, len(promoted))
        try:
            await self._drop_copies_of(primary)
        except SiblingTimedOut:
            self._put_back(self.store, primary)  # still held twice, maybe: handed out once the copies go
            primary, undecided = [], True
        now = self.clock()
        return _held(primary, now) + _held(promoted, now), undecided

    async def _gone(self, ordinal: int, incarnation: str, requester: int, requester_incarnation: str) -> bool | None:
        """Whether replica ``ordinal`` no longer runs in ``incarnation`` (then it lost its
        keys); None when it did not answer in time, so nobody knows."""
        if ordinal == requester:  # it asks for keys it does not hold: authoritative, unless restarted
            return requester_incarnation != incarnation
        sibling = self.siblings.get(ordinal) or self._departing().get(ordinal, (None, 0.0))[0]
        if sibling is None:  # no longer a replica of this node
            return True
        try:
            return await sibling.incarnation() != incarnation
        except SiblingTimedOut:
            return None
        except SiblingUnavailable:
            return True

    # -- ETSI 004 streams --------------------------------------------------------------

    def stream_owner(self, session_id: str) -> int | None:
        """The replica owning the session's stream at this node; None when it is this one."""
        if not self.siblings:
            return None
        owner = stream_owner(session_id, [self.replica, *self.siblings])
        return None if owner == self.replica else owner

    async def hand_chunks(self, session: Session, index: int, chunks: list[tuple[str, bytes]]) -> None:
        """Chunks committed here, to the stream's owner; returns once it holds them."""
        owner = self.stream_owner(session.session_id)
        if owner is None:
            session.add_chunks(index, chunks)
            return
        try:
            await self.siblings[owner].hand_chunks(session.session_id, index, chunks)
        except SiblingUnavailable as e:
            raise errors.DeliveryRefused(f"the stream of session {session.session_id} lives at KM replica {owner} "
                                         f"of node {self.km.node}, which did not take its chunks: {e}") from None
