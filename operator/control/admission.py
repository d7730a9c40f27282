"""Admission control (paper §3.2, Fig. 2b): the cycle of every session, as a state machine.

    configuration request ──SLA exceeded──▶ Terminated (reason; the KM's reply says so)
            │ QoS within the SLA
            ▼
        Accepted ── peer never registers (peer_wait_s) ──▶ Terminated
            │ both SAEs registered: path reserved, configuration pushed to every KM on it,
            │ confirmations collected (no path or a KM not confirming ⇒ Terminated)
            ▼
         Active ⇄ Held          timer restarted by every key-request signal
            │                   a link or node of the path fails ⇒ new path pushed (Active),
            │                   or none exists ⇒ Held, resumed when the topology allows
            ▼
        Terminated ◀── close from an endpoint KM, timer expiry, user disabled, deletion:
                       deletion signal to every KM that may hold the session,
                       confirmations collected, reservations freed

No path is reserved for half a session: routing is asked only once both SAEs registered
(a KeySession resource or an ETSI 014 implicit open registers both at once).

Paths change make-before-break: the new path's KMs get the configuration with a higher
version first (a KM on both paths simply replaces its forwarding entry), and only then
are KMs no longer on the path told to delete theirs. A Held session keeps whatever its KMs
still hold (they answer "no QKD connection" until it resumes) but no reservations.

One operation at a time per session (a lock each), so a close arriving while a path is
being pushed waits for the push and then removes everything it installed. A deletion a
KM did not confirm is kept and sent again when that node's KM is back.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from uuid import uuid4

from vqkd.operator.control.events import EventLog, Subject
from vqkd.operator.control.session_config import (
    Endpoint,
    KMPusher,
    SessionTerms,
    configure_all,
    delete_all,
    next_version,
)
from vqkd.operator.control.routing import NoRoute, Route, Routing
from vqkd.operator.control.sla import Grant, Refusal, Usage, check
from vqkd.operator.control.topology import Application
from vqkd.operator.resources.models import QoS, SessionPhase, UserProfile


class SessionState(StrEnum):
    ACCEPTED = "Accepted"
    ACTIVE = "Active"
    HELD = "Held"
    TERMINATED = "Terminated"


class Side(StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"


BOTH_SIDES = frozenset(Side)

# The largest inactivity timeout a KM accepts (uint32 ms, ~49 days): a declared session's
# KMs keep it until the KeySession is deleted.
UNTIL_DELETED_MS = 2**32 - 1


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    inactivity_timeout_s: float = 60.0  # an Active or Held session without key requests ends
    peer_wait_s: float = 60.0  # an Accepted session whose peer has not registered ends
    held_retry_s: float = 5.0  # first retry of a Held session; doubles up to held_retry_max_s
    held_retry_max_s: float = 60.0
    terminated_retention_s: float = 300.0  # how long ended sessions stay visible

    def __post_init__(self) -> None:
        for name in ("inactivity_timeout_s", "peer_wait_s", "held_retry_s", "held_retry_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"admission setting {name} must be > 0, got {getattr(self, name)}")


@dataclass(eq=False, slots=True)
class Session:
    id: str
    user: str
    source: Endpoint
    destination: Endpoint
    grant: Grant | None  # None for a session refused by the SLA check
    created_at: float
    declared_as: str | None = None  # the KeySession resource that declared it
    implicit: bool = False  # opened by a KM for ETSI 014 callers
    state: SessionState = SessionState.ACCEPTED
    reason: str = ""
    message: str = ""
    rejected: bool = False  # refused before ever carrying key
    registered: set[Side] = field(default_factory=set)
    route: Route | None = None  # the path in use; for an ended session, the last one
    terms: SessionTerms | None = None  # what the KMs of the path were told
    version: int = 0
    configured_nodes: set[str] = field(default_factory=set)  # KMs that may hold an entry
    deadline: float = 0.0
    timer_at: float | None = None  # when its timer entry fires; None: no entry queued
    activated_at: float | None = None
    last_key_request_at: float | None = None
    key_requests: int = 0
    retry_at: float | None = None  # Held: next attempt to find a path
    retries: int = 0
    ended_at: float | None = None
    # What each endpoint KM instance reported issuing: (node, incarnation) -> (keys, bits). A
    # replaced KM starts counting from zero; what its predecessor counted stays here.
    issued: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def live(self) -> bool:
        return self.state is not SessionState.TERMINATED

    @property
    def both_registered(self) -> bool:
        return self.registered >= BOTH_SIDES

    @property
    def keys_delivered(self) -> int:
        return sum(keys for keys, _ in self.issued.values())

    @property
    def bits_delivered(self) -> int:
        return sum(bits for _, bits in self.issued.values())

    @property
    def priority(self) -> int:
        return self.grant.priority if self.grant is not None else 0

    @property
    def phase(self) -> SessionPhase:
        """The KeySession phase: Held shows as Accepted (admitted, no path) with its reason."""
        if self.state is SessionState.TERMINATED:
            return SessionPhase.REJECTED if self.rejected else SessionPhase.TERMINATED
        return SessionPhase.ACTIVE if self.state is SessionState.ACTIVE else SessionPhase.ACCEPTED

    def side_of(self, node: str) -> Side | None:
        if node == self.source.node:
            return Side.SOURCE
        if node == self.destination.node:
            return Side.DESTINATION
        return None

    def view(self) -> dict[str, Any]:
        route = self.route
        return {
            "sessionId": self.id,
            "keySession": self.declared_as,
            "implicit": self.implicit,
            "user": self.user,
            "source": str(self.source),
            "destination": str(self.destination),
            "state": str(self.state),
            "phase": str(self.phase),
            "reason": self.reason,
            "message": self.message,
            "registered": sorted(self.registered),
            "path": list(route.nodes) if route else [],
            "links": list(route.links) if route else [],
            "reservedBps": self.grant.min_rate_bps if self.grant and route and self.live else 0,
            "rateBps": self.terms.rate_bps if self.terms else None,
            "bucketBits": self.terms.bucket_bits if self.terms else None,
            "priority": self.priority,
            "version": self.version,
            "keyRequests": self.key_requests,
            "keysDelivered": self.keys_delivered,
            "bitsDelivered": self.bits_delivered,
            "createdAt": self.created_at,
            "activatedAt": self.activated_at,
            "lastKeyRequestAt": self.last_key_request_at,
            "endedAt": self.ended_at,
        }

    def application(self) -> Application:
        """This session as an ETSI 015 ``qkd_app``."""
        qos = self.grant.qos if self.grant else QoS()
        route = self.route if self.state is SessionState.ACTIVE else None
        return Application(
            app_id=self.id,
            status="ON" if self.state is SessionState.ACTIVE else "DISCONNECTED",
            priority=self.priority,
            qos={
                "max_bandwidth": self.terms.rate_bps if self.terms else qos.max_bps,
                "min_bandwidth": qos.min_bps,
                "jitter": qos.jitter,
                "ttl": qos.ttl,
            },
            server_app_id=self.source.sae_id,
            client_app_ids=(self.destination.sae_id,),
            local_node=self.source.node,
            remote_node=self.destination.node,
            path=route.nodes if route else (),
            links=route.links if route else (),
        )


@dataclass(slots=True)
class _UserTally:
    sessions: set[str] = field(default_factory=set)
    reserved_bps: int = 0


def _path(route: Route) -> str:
    return " -> ".join(route.nodes)


class Admission:
    def __init__(self, routing: Routing, pusher: KMPusher, events: EventLog,
                 settings: AdmissionSettings = AdmissionSettings()):
        self.routing = routing
        self.pusher = pusher
        self.events = events
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        self._users: dict[str, _UserTally] = {}
        self._live_by_ends: dict[tuple[Endpoint, Endpoint], list[str]] = {}
        self._held: set[str] = set()
        self._timers: list[tuple[float, int, str]] = []
        self._timer_order = itertools.count()
        self._ended: deque[tuple[float, str]] = deque()
        self._pending_deletes: dict[str, dict[str, str]] = {}  # node -> session ID -> reason

    # --- bookkeeping -------------------------------------------------------------------

    def usage(self, user: str) -> Usage:
        tally = self._users.get(user)
        return Usage(len(tally.sessions), tally.reserved_bps) if tally else Usage()

    def live_sessions_of(self, user: str) -> list[Session]:
        tally = self._users.get(user)
        return [self.sessions[session_id] for session_id in sorted(tally.sessions)] if tally else []

    def held(self) -> list[Session]:
        return [self.sessions[session_id] for session_id in self._held]

    def pending_deletes(self, node: str) -> dict[str, str]:
        return dict(self._pending_deletes.get(node, {}))

    def _index(self, session: Session) -> None:
        tally = self._users.setdefault(session.user, _UserTally())
        tally.sessions.add(session.id)
        tally.reserved_bps += session.grant.min_rate_bps
        self._live_by_ends.setdefault((session.source, session.destination), []).append(session.id)

    def _unindex(self, session: Session) -> None:
        tally = self._users[session.user]
        tally.sessions.discard(session.id)
        tally.reserved_bps -= session.grant.min_rate_bps
        if not tally.sessions:
            del self._users[session.user]
        ends = (session.source, session.destination)
        same_ends = self._live_by_ends[ends]
        same_ends.remove(session.id)
        if not same_ends:
            del self._live_by_ends[ends]
        self._held.discard(session.id)

    def _transition(self, session: Session, to: SessionState, reason: str, message: str, now: float) -> None:
        before = session.state
        session.state, session.reason, session.message = to, reason, message
        self.events.record(now, Subject.SESSION, session.id, before, to, reason, message)

    def _arm(self, session: Session, deadline: float) -> None:
        """Set the session's deadline; a timer entry is queued only when it must fire sooner
        than the one queued, so a key request (which only pushes the deadline out) costs O(1)."""
        session.deadline = deadline
        if session.timer_at is None or deadline < session.timer_at:
            session.timer_at = deadline
            heapq.heappush(self._timers, (deadline, next(self._timer_order), session.id))

    # --- the cycle ---------------------------------------------------------------------

    def find_joinable(self, source: Endpoint, destination: Endpoint, side: Side, implicit: bool) -> Session | None:
        """The live session an open request without a session ID belongs to, if any.

        An ETSI 014 implicit open reuses a session that already has both ends registered.
        Otherwise an open joins the oldest session still waiting for its side, or a session
        declared by a KeySession resource (the application learns the session ID that way).
        """
        for session_id in self._live_by_ends.get((source, destination), ()):
            session = self.sessions[session_id]
            if implicit:
                if session.both_registered:
                    return session
            elif side not in session.registered or session.declared_as is not None:
                return session
        return None

    def admit(
        self, user: UserProfile, source: Endpoint, destination: Endpoint, qos: QoS, registered: Iterable[Side],
        now: float, *, session_id: str | None = None, declared_as: str | None = None, implicit: bool = False,
    ) -> Session:
        """A configuration request: the QoS checked against the user's SLA ⇒ Accepted or Terminated.

        A refused session is returned Terminated and kept only when declared (its resource
        must show why); the event log records every refusal.
        """
        session_id = session_id or str(uuid4())
        verdict = check(user, qos, self.usage(user.name))
        if isinstance(verdict, Refusal):
            return self.refuse(session_id, user.name, source, destination, verdict.reason, verdict.message, now,
                               declared_as=declared_as)
        session = Session(
            id=session_id, user=user.name, source=source, destination=destination, grant=verdict,
            created_at=now, declared_as=declared_as, implicit=implicit, registered=set(registered),
        )
        self.sessions[session.id] = session
        self._index(session)
        waiting = "" if session.both_registered else f"; waiting for {self._missing(session)} to register"
        self.events.record(now, Subject.SESSION, session.id, None, SessionState.ACCEPTED, "Admitted",
                           f"{source} -> {destination} for UserProfile {user.name}: QoS within the SLA "
                           f"(priority {verdict.priority}, minBps {verdict.min_rate_bps}){waiting}")
        self._arm(session, now + self.settings.peer_wait_s)
        return session

    def refuse(
        self, session_id: str, user: str, source: Endpoint, destination: Endpoint, reason: str, message: str,
        now: float, *, declared_as: str | None = None,
    ) -> Session:
        """A session refused before it was admitted (by the SLA, or a declared session's checks).

        Kept, for its resource's status, only when declared; the event log records every refusal.
        """
        session = Session(
            id=session_id, user=user, source=source, destination=destination, grant=None, created_at=now,
            declared_as=declared_as, state=SessionState.TERMINATED, reason=reason, message=message, rejected=True,
            ended_at=now,
        )
        self.events.record(now, Subject.SESSION, session_id, None, SessionState.TERMINATED, reason, message)
        if declared_as is not None:
            self.sessions[session_id] = session
            self._ended.append((now, session_id))
        return session

    def _missing(self, session: Session) -> str:
        ends = {Side.SOURCE: session.source, Side.DESTINATION: session.destination}
        return " and ".join(str(ends[side]) for side in Side if side not in session.registered)

    def register(self, session: Session, side: Side, now: float) -> None:
        """The other SAE opened the session too."""
        if side in session.registered:
            return
        session.registered.add(side)
        end = session.source if side is Side.SOURCE else session.destination
        self.events.record(now, Subject.SESSION, session.id, session.state, session.state, "PeerRegistered",
                           f"{end} registered")

    async def activate(self, session: Session, now: float) -> None:
        """Both SAEs registered: reserve a path, configure every KM on it ⇒ Active, or Terminated."""
        async with session.lock:
            if session.state is not SessionState.ACCEPTED or not session.both_registered:
                return
            outcome = await self._install(session, now)
            if isinstance(outcome, NoRoute):
                await self._end(session, outcome.reason, outcome.message, now, rejected=True)
                return
            session.activated_at = now
            self._transition(session, SessionState.ACTIVE, "Configured",
                             f"path {_path(outcome)} configured on {len(outcome.nodes)} KMs (version {session.version})",
                             now)
            self._arm_inactivity(session, now)

    def _arm_inactivity(self, session: Session, now: float) -> None:
        # A KeySession lives as long as its resource: only sessions the applications opened
        # end when unused.
        if session.declared_as is None:
            self._arm(session, now + self.settings.inactivity_timeout_s)
        else:
            session.deadline = math.inf  # outlives the peer-wait deadline armed when it was declared

    def key_requested(self, session: Session, now: float, requests: int = 1) -> bool:
        """A key-request signal (for ``requests`` requests): the session is in use, its timer
        restarts. False when it cannot serve."""
        if session.state not in (SessionState.ACTIVE, SessionState.HELD):
            return False
        session.key_requests += requests
        session.last_key_request_at = now
        self._arm_inactivity(session, now)
        return True

    async def terminate(self, session: Session, reason: str, message: str, now: float) -> bool:
        """End a session; False when it had already ended (nothing is freed twice)."""
        async with session.lock:
            return await self._end(session, reason, message, now)

    async def _end(self, session: Session, reason: str, message: str, now: float, rejected: bool = False) -> bool:
        if not session.live:
            return False
        before = session.state
        session.state, session.rejected, session.ended_at = SessionState.TERMINATED, rejected, now
        self._unindex(session)
        # The registered endpoint KMs hold the session since their open requests, even
        # before any configuration reached them: they get the deletion signal too.
        ends = {Side.SOURCE: session.source.node, Side.DESTINATION: session.destination.node}
        targets = session.configured_nodes | {ends[side] for side in session.registered}
        confirmations = await delete_all(self.pusher, targets, session.id, reason)
        self._remember_failed_deletes(confirmations.failed, session.id, reason)
        self.routing.release(session.id)
        session.configured_nodes = set()
        outcome = f"deletion confirmed by {len(confirmations.confirmed)} of {len(targets)} KMs"
        if confirmations.failed:
            outcome += f", resent when back: {confirmations.describe_failures()}"
        session.reason, session.message = reason, f"{message}; {outcome}" if targets else message
        self.events.record(now, Subject.SESSION, session.id, before, SessionState.TERMINATED, reason, session.message)
        self._ended.append((now, session.id))
        return True

    def _remember_failed_deletes(self, failed: Iterable[str], session_id: str, reason: str) -> None:
        for node in failed:
            self._pending_deletes.setdefault(node, {})[session_id] = reason

    async def _install(self, session: Session, now: float) -> Route | NoRoute:
        """Reserve a path and make every KM on it confirm its configuration, make-before-break."""
        grant = session.grant
        route = self.routing.route(session.id, session.source.node, session.destination.node, grant.min_rate_bps)
        if isinstance(route, NoRoute):
            return route
        rate, bucket = grant.token_bucket(route.spare_bps)
        qos = grant.qos
        terms = SessionTerms(
            session_id=session.id, user=session.user, source=session.source, destination=session.destination,
            priority=grant.priority, rate_bps=rate, bucket_bits=bucket,
            inactivity_timeout_ms=(UNTIL_DELETED_MS if session.declared_as is not None
                                   else round(self.settings.inactivity_timeout_s * 1000)),
            request_timeout_ms=qos.timeout, key_chunk_size=qos.key_chunk_size, ttl_s=qos.ttl,
            fallback=str(qos.fallback),
        )
        session.version = next_version(session.version, now)
        configs = terms.for_path(route.nodes, session.version)
        # A KM that did not confirm may still have applied it: it counts as holding an entry.
        session.configured_nodes |= set(configs)
        confirmations = await configure_all(self.pusher, configs)
        if not confirmations.complete:
            self.routing.release(session.id)
            return NoRoute("KMNotConfigured", f"path {_path(route)}: configuration not confirmed by "
                                              f"{confirmations.describe_failures()}")
        leaving = session.configured_nodes - set(route.nodes)
        self.routing.settle(session.id, route)
        session.route, session.terms = route, terms
        session.configured_nodes = set(route.nodes)
        if leaving:
            deleted = await delete_all(self.pusher, leaving, session.id, "rerouted")
            self._remember_failed_deletes(deleted.failed, session.id, "rerouted")
        return route

    # --- failures: reroute, hold, resume ----------------------------------------------

    async def reroute_all(self, session_ids: Iterable[str], cause: str, now: float) -> None:
        """Give every listed session whose path broke a new one, highest priority first.

        The path searches (and reservations) run in priority order before any push is
        awaited, so when capacity is short the important sessions get it.
        """
        sessions = [self.sessions[i] for i in session_ids if i in self.sessions]
        sessions.sort(key=lambda s: (-s.priority, s.created_at, s.id))
        await asyncio.gather(*(self._reroute(session, cause, now) for session in sessions))

    async def _reroute(self, session: Session, cause: str, now: float) -> None:
        async with session.lock:
            if session.state is not SessionState.ACTIVE or session.route is None:
                return
            if self.routing.usable(session.route):
                return
            old = session.route
            outcome = await self._install(session, now)
            if isinstance(outcome, NoRoute):
                self._hold(session, f"{cause}; no alternative path: {outcome.message}", outcome.reason, now)
                return
            self._transition(session, SessionState.ACTIVE, "Rerouted",
                             f"{cause}: path {_path(outcome)} replaces {_path(old)} (version {session.version})", now)

    def _hold(self, session: Session, message: str, reason: str, now: float) -> None:
        self.routing.release(session.id)
        session.route = None
        session.retries = 0
        session.retry_at = now + self.settings.held_retry_s
        self._held.add(session.id)
        self._transition(session, SessionState.HELD, reason, message, now)

    async def resume_held(self, now: float, *, due_only: bool) -> None:
        """Try to give Held sessions a path again: all of them after the topology improved,
        or (``due_only``) those whose retry time has come."""
        candidates = [s for s in self.held() if not due_only or (s.retry_at is not None and s.retry_at <= now)]
        candidates.sort(key=lambda s: (-s.priority, s.created_at, s.id))
        await asyncio.gather(*(self._resume(session, now) for session in candidates))

    async def _resume(self, session: Session, now: float) -> None:
        async with session.lock:
            if session.state is not SessionState.HELD:
                return
            outcome = await self._install(session, now)
            if isinstance(outcome, NoRoute):
                session.retries += 1
                backoff = self.settings.held_retry_s * 2 ** session.retries
                session.retry_at = now + min(backoff, self.settings.held_retry_max_s)
                session.reason, session.message = outcome.reason, f"still no path: {outcome.message}"
                return
            self._held.discard(session.id)
            session.retry_at = None
            self._transition(session, SessionState.ACTIVE, "Resumed",
                             f"path {_path(outcome)} configured (version {session.version})", now)

    async def resync(self, node: str, now: float) -> int:
        """The KM of ``node`` was replaced and lost its state: push it every session it takes part in.

        Returns how many sessions its KM did not confirm.
        """
        session_ids = self.routing.sessions_at_node(node)
        pushes = [self._resync_one(self.sessions[i], node, now) for i in sorted(session_ids) if i in self.sessions]
        return sum(not confirmed for confirmed in await asyncio.gather(*pushes))

    async def _resync_one(self, session: Session, node: str, now: float) -> bool:
        async with session.lock:
            if session.state is not SessionState.ACTIVE or session.route is None or node not in session.route.nodes:
                return True
            session.version = next_version(session.version, now)
            config = session.terms.for_path(session.route.nodes, session.version)[node]
            return (await configure_all(self.pusher, {node: config})).complete

    async def flush_deletes(self, node: str) -> int:
        """Send again the deletions the KM of ``node`` did not confirm; returns how many still fail."""
        pending = self._pending_deletes.pop(node, {})
        for session_id, reason in sorted(pending.items()):
            session = self.sessions.get(session_id)
            if session is not None and node in session.configured_nodes:
                continue  # the session came back to this node meanwhile: its entry is wanted
            confirmations = await delete_all(self.pusher, [node], session_id, reason)
            self._remember_failed_deletes(confirmations.failed, session_id, reason)
        return len(self._pending_deletes.get(node, {}))

    # --- time --------------------------------------------------------------------------

    async def expire(self, now: float) -> None:
        """End the sessions whose timer ran out: peers that never registered, sessions unused."""
        due = []
        while self._timers and self._timers[0][0] <= now:
            at, _, session_id = heapq.heappop(self._timers)
            session = self.sessions.get(session_id)
            if session is None or not session.live or session.timer_at != at:
                continue  # ended, or superseded by an entry that fires sooner
            session.timer_at = None
            if session.deadline <= now:
                due.append(session)
            else:
                self._arm(session, session.deadline)
        for session in due:
            if session.state is SessionState.ACCEPTED:
                await self.terminate(session, "PeerNotRegistered",
                                     f"{self._missing(session)} did not register within "
                                     f"{self.settings.peer_wait_s:.0f} s", now)
            else:
                await self.terminate(session, "InactivityTimeout",
                                     f"no key request for {self.settings.inactivity_timeout_s:.0f} s", now)

    def prune(self, now: float) -> None:
        """Forget sessions ended longer ago than the retention; declared ones stay with their resource."""
        horizon = now - self.settings.terminated_retention_s
        while self._ended and self._ended[0][0] <= horizon:
            _, session_id = self._ended.popleft()
            session = self.sessions.get(session_id)
            if session is not None and not session.live and session.declared_as is None:
                del self.sessions[session_id]

    def forget(self, session: Session) -> None:
        """Drop an ended session at once (its KeySession resource was deleted or re-declared)."""
        if session.live:
            raise ValueError(f"session {session.id} is {session.state}; terminate it before forgetting it")
        self.sessions.pop(session.id, None)
