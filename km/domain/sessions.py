"""Sessions at a KM and its forwarding table (paper §3.1–3.2, Fig. 2a).

A session is a period in which two SAEs may draw symmetric key. The control plane pushes
each KM on the session's path a configuration: the KM's role, its previous and next hop
(never the whole path), priority, token bucket and timers.

``State`` and ``ALLOWED`` are the one definition of the KM session cycle of Fig. 2a,
``Authenticating → UserAccepted → Operative ⇄ KeyExchanging → Terminated``, with the
paper's names. A session begins Authenticating when an application opens it at this KM,
or UserAccepted when the control plane declares it (a KeySession, or the session at an
intermediate KM). From there only ``SessionTable`` moves it, and every move goes through
``ALLOWED`` and is recorded with a timestamp so the runtimes can show it; everything else
reads a session's state and never sets it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable

from vqkd.km.domain.tokenbucket import TokenBucket
from vqkd.km.domain.vocabulary import Endpoint, Role


class State(StrEnum):
    """Where a session is in the KM session cycle (paper Fig. 2a)."""

    AUTHENTICATING = "Authenticating"
    USER_ACCEPTED = "UserAccepted"
    OPERATIVE = "Operative"
    KEY_EXCHANGING = "KeyExchanging"
    TERMINATED = "Terminated"


# State -> the states it may move to. KeyExchanging -> KeyExchanging is a further key request
# while others are in flight; the session is Operative again when the last one is done.
ALLOWED = {
    State.AUTHENTICATING: {State.USER_ACCEPTED, State.TERMINATED},
    State.USER_ACCEPTED: {State.OPERATIVE, State.TERMINATED},
    State.OPERATIVE: {State.KEY_EXCHANGING, State.TERMINATED},
    State.KEY_EXCHANGING: {State.OPERATIVE, State.TERMINATED, State.KEY_EXCHANGING},
    State.TERMINATED: set(),
}


class InvalidConfiguration(ValueError):
    """A pushed configuration is inconsistent; the message names the field."""


@dataclass(frozen=True, slots=True)
class SessionConfig:
    session_id: str
    version: int
    role: Role
    user: str
    source: Endpoint
    destination: Endpoint
    prev_hop: str
    next_hop: str
    priority: int
    rate_bps: float
    bucket_bits: int
    inactivity_timeout_s: float
    request_timeout_s: float
    key_chunk_size: int
    ttl_s: float
    fallback: str

    def validate(self, node: str, neighbours: set[str]) -> None:
        problems = []
        if not self.session_id:
            problems.append("session_id must not be empty")
        if self.version < 1:
            problems.append(f"version must be >= 1, got {self.version}")
        expected_at = {Role.SOURCE: self.source.node, Role.DESTINATION: self.destination.node}
        if self.role in expected_at and expected_at[self.role] != node:
            problems.append(f"role {self.role.name} belongs at node {expected_at[self.role]}, this is {node}")
        if self.role is Role.INTERMEDIATE and node in (self.source.node, self.destination.node):
            problems.append(f"node {node} is an endpoint of the session, not an intermediate")
        needs_prev = self.role is not Role.SOURCE
        needs_next = self.role is not Role.DESTINATION
        for name, hop, needed in (("prev_hop", self.prev_hop, needs_prev), ("next_hop", self.next_hop, needs_next)):
            if needed and hop not in neighbours:
                problems.append(f"{name} {hop!r} is not a neighbour of {node} (neighbours: {sorted(neighbours)})")
            if not needed and hop:
                problems.append(f"{name} must be empty for role {self.role.name}, got {hop!r}")
        if self.rate_bps <= 0 or self.bucket_bits <= 0:
            problems.append(f"token bucket needs rate_bps > 0 and bucket_bits > 0, got {self.rate_bps}, {self.bucket_bits}")
        if self.inactivity_timeout_s <= 0 or self.request_timeout_s <= 0:
            problems.append("inactivity_timeout_ms and request_timeout_ms must be > 0")
        if self.fallback not in ("", "none", "pqc"):
            problems.append(f"fallback must be '', 'none' or 'pqc', got {self.fallback!r}")
        if problems:
            raise InvalidConfiguration(f"session {self.session_id or '?'}: " + "; ".join(problems))

    def hop_towards(self, node_of_peer_endpoint: str) -> str:
        """The neighbour to send to for key travelling towards an endpoint's node."""
        return self.next_hop if node_of_peer_endpoint == self.destination.node else self.prev_hop

    def peer_sae(self, sae_id: str) -> Endpoint:
        return self.destination if sae_id == self.source.sae_id else self.source


@dataclass(slots=True)
class SessionEvent:
    """A transition of the cycle, or a step of a key exchange that changes no state."""

    at: float  # wall clock, seconds since the epoch
    session_id: str
    event: str
    state: State
    detail: str = ""


@dataclass
class Session:
    session_id: str
    source: Endpoint
    destination: Endpoint
    config: SessionConfig | None = None  # None until the control plane configured the route
    bucket: TokenBucket | None = None
    state: State = State.AUTHENTICATING
    last_activity: float = 0.0
    keys_delivered: int = 0  # issued here: to a master SAE, or as chunks of the stream this KM sources
    bits_delivered: int = 0
    refused_by_bucket: int = 0
    busy: int = 0  # key exchanges in flight
    implicit: bool = False  # opened by the KM on behalf of ETSI 014 callers
    configured: asyncio.Event = field(default_factory=asyncio.Event)
    # ETSI 004 key stream at this KM: chunks by index until this KM's application takes them.
    stream: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    stream_changed: asyncio.Event = field(default_factory=asyncio.Event)
    next_index: int = 0  # at the source: the next stream index to produce

    def peer_of(self, sae_id: str) -> str:
        return self.destination.sae_id if sae_id == self.source.sae_id else self.source.sae_id

    @property
    def is_endpoint(self) -> bool:
        return self.config is None or self.config.role is not Role.INTERMEDIATE

    def add_chunks(self, index: int, chunks: list[tuple[str, bytes]]) -> None:
        for offset, chunk in enumerate(chunks):
            self.stream[index + offset] = chunk
        self.stream_changed.set()
        self.stream_changed = asyncio.Event()


@dataclass
class SessionTable:
    """All sessions this KM takes part in, keyed by session ID (the forwarding table)."""

    node: str
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    sessions: dict[str, Session] = field(default_factory=dict)
    events: deque[SessionEvent] = field(default_factory=lambda: deque(maxlen=10_000))
    on_terminated: Callable[[Session, str], None] = lambda session, reason: None
    _awaited: dict[str, tuple[asyncio.Event, int]] = field(default_factory=dict)  # session -> (event, waiters)
    # The SAE pair of each session (either direction) -> its session IDs, oldest first: every
    # ETSI 014 request looks its session up this way.
    _by_pair: dict[frozenset[str], list[str]] = field(default_factory=dict)

    def _record(self, session: Session, event: str, to: State, detail: str = "") -> None:
        if to not in ALLOWED[session.state]:
            raise RuntimeError(f"session {session.session_id}: no transition {session.state} -> {to}")
        session.state = to
        self.events.append(SessionEvent(self.wall(), session.session_id, event, to, detail))

    def _bucket(self, config: SessionConfig) -> TokenBucket:
        return TokenBucket(config.rate_bps, config.bucket_bits, clock=self.clock, subject=f"session {config.session_id}")

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    async def configured(self, session_id: str, grace_s: float) -> Session | None:
        """The session once it has a route here, waiting up to ``grace_s`` for its configuration.

        The control plane pushes a path's KMs at once, so a relay can reach a KM a moment
        before that KM's own configuration does; waiting briefly beats failing the request.
        """
        session = self.sessions.get(session_id)
        if session is not None and session.config is not None:
            return session
        event, waiters = self._awaited.get(session_id, (asyncio.Event(), 0))
        self._awaited[session_id] = (event, waiters + 1)
        try:
            await asyncio.wait_for(event.wait(), grace_s)
        except asyncio.TimeoutError:
            return None
        finally:
            if session_id in self._awaited and self._awaited[session_id][0] is event:
                remaining = self._awaited[session_id][1] - 1
                if remaining:
                    self._awaited[session_id] = (event, remaining)
                else:
                    del self._awaited[session_id]
        session = self.sessions.get(session_id)
        return session if session is not None and session.config is not None else None

    def between(self, sae_a: str, sae_b: str) -> Session | None:
        """The oldest live session of an SAE pair, in either direction."""
        ids = self._by_pair.get(frozenset((sae_a, sae_b)))
        return self.sessions[ids[0]] if ids else None

    def _add(self, session: Session) -> None:
        self.sessions[session.session_id] = session
        self._by_pair.setdefault(frozenset((session.source.sae_id, session.destination.sae_id)), []).append(
            session.session_id)

    def _remove(self, session_id: str) -> Session | None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            pair = frozenset((session.source.sae_id, session.destination.sae_id))
            ids = self._by_pair[pair]
            ids.remove(session_id)
            if not ids:
                del self._by_pair[pair]
        return session

    def open(self, session_id: str, source: Endpoint, destination: Endpoint, detail: str = "",
             implicit: bool = False) -> Session:
        """An application's open request was let in by access control; the route follows."""
        session = self.sessions.get(session_id)
        if session is None:
            session = Session(session_id, source, destination, implicit=implicit, last_activity=self.clock())
            self._add(session)
            self.events.append(SessionEvent(self.wall(), session_id, "open request", State.AUTHENTICATING, detail))
        if session.state is State.AUTHENTICATING:
            self._record(session, "user authenticated", State.USER_ACCEPTED, detail)
        return session

    def configure(self, config: SessionConfig) -> Session:
        """Apply a pushed configuration; an older or equal version changes nothing."""
        session = self.sessions.get(config.session_id)
        if session is not None and session.config is not None and session.config.version >= config.version:
            return session
        if session is None:
            # Declared by the control plane (a KeySession, or an intermediate KM): no open to wait for.
            session = Session(config.session_id, config.source, config.destination, state=State.USER_ACCEPTED)
            self._add(session)
        if session.bucket is None:
            session.bucket = self._bucket(config)
        else:
            session.bucket.reconfigure(config.rate_bps, config.bucket_bits)
        session.config = config
        session.last_activity = self.clock()
        detail = f"version {config.version}, prev {config.prev_hop or '-'}, next {config.next_hop or '-'}"
        if session.state in (State.AUTHENTICATING, State.USER_ACCEPTED):
            if session.state is State.AUTHENTICATING:
                self._record(session, "user authenticated", State.USER_ACCEPTED)
            self._record(session, "route configured", State.OPERATIVE, detail)
        else:
            self.events.append(SessionEvent(self.wall(), config.session_id, "route configured", session.state, detail))
        session.configured.set()
        awaited = self._awaited.pop(config.session_id, None)
        if awaited is not None:
            awaited[0].set()
        return session

    def key_exchange_started(self, session: Session) -> None:
        session.busy += 1
        session.last_activity = self.clock()
        self._record(session, "key request", State.KEY_EXCHANGING)

    def key_exchange_done(self, session: Session, keys: int, bits: int, detail: str = "") -> None:
        session.busy -= 1
        session.keys_delivered += keys
        session.bits_delivered += bits
        session.last_activity = self.clock()
        if session.state is State.TERMINATED:
            return
        if session.busy == 0:
            self._record(session, "key delivered" if keys else "key exchange failed", State.OPERATIVE, detail)

    def note(self, session: Session, event: str, detail: str = "") -> None:
        """Record a step of a key exchange that changes no state (key available, relayed, ...)."""
        self.events.append(SessionEvent(self.wall(), session.session_id, event, session.state, detail))

    def touch(self, session: Session) -> None:
        session.last_activity = self.clock()

    def terminate(self, session_id: str, reason: str) -> Session | None:
        """Close request, deletion signal or expiry: forget the session and free what it held."""
        session = self._remove(session_id)
        if session is None:
            return None
        if session.state is not State.TERMINATED:
            self._record(session, reason, State.TERMINATED)
            self.on_terminated(session, reason)
        session.configured.set()  # wake anyone waiting for a route that will not come
        session.stream_changed.set()
        return session

    def expired(self) -> list[Session]:
        """Configured sessions whose inactivity timer ran out (openers time out on their own)."""
        now = self.clock()
        return [
            s for s in self.sessions.values()
            if s.config is not None and s.busy == 0 and now - s.last_activity > s.config.inactivity_timeout_s
        ]
