"""One session as the control plane sees it: across the network, from admission to its end.

A ``NetworkSession`` is one instance of admission control's cycle (paper Fig. 2b): its two
ends and which of them registered, the grant the SLA check gave, the path it holds and what
the KMs on it were told, its timers and what the endpoint KMs report having delivered. The
KM's own record of the same session (``km.domain.sessions.Session``) is what one KM knows
of it: its hops, its token bucket, its cycle of Fig. 2a.

Its state changes in one place, ``move_to``, which refuses what ``ALLOWED`` does not list.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control.routing import Route
from vqkd.operator.control.session_config import SessionTerms
from vqkd.operator.control.sla import Grant
from vqkd.operator.resources.admission_cycle import ALLOWED, ENTRY, AdmissionState
from vqkd.operator.resources.models import SessionPhase


class Side(StrEnum):
    """An end of a session, as the SAE registering there."""

    SOURCE = "source"
    DESTINATION = "destination"


BOTH_SIDES = frozenset(Side)


class InvalidTransition(RuntimeError):
    """A state change the admission cycle does not have: a bug, never a user error."""


@dataclass(eq=False, slots=True)
class NetworkSession:
    id: str
    user: str
    source: Endpoint
    destination: Endpoint
    grant: Grant | None  # None for a session refused by the SLA check
    created_at: float
    declared_as: str | None = None  # the KeySession resource that declared it
    implicit: bool = False  # opened by a KM for ETSI 014 callers
    state: AdmissionState = AdmissionState.ACCEPTED
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

    def __post_init__(self) -> None:
        if self.state not in ENTRY:
            raise InvalidTransition(f"session {self.id}: a session begins {' or '.join(sorted(ENTRY))}, "
                                    f"not {self.state}")

    def move_to(self, to: AdmissionState) -> AdmissionState:
        """Enter ``to``; returns the state left. Raises InvalidTransition for a move ``ALLOWED`` lacks."""
        before = self.state
        if to not in ALLOWED[before]:
            raise InvalidTransition(f"session {self.id}: no transition {before} -> {to}")
        self.state = to
        return before

    @property
    def live(self) -> bool:
        return self.state is not AdmissionState.TERMINATED

    @property
    def phase(self) -> SessionPhase:
        """What its KeySession's ``status.phase`` shows."""
        return SessionPhase.of(self.state, rejected=self.rejected)

    @property
    def both_registered(self) -> bool:
        return self.registered >= BOTH_SIDES

    @property
    def missing(self) -> str:
        """The ends that have not registered yet, for messages."""
        ends = {Side.SOURCE: self.source, Side.DESTINATION: self.destination}
        return " and ".join(str(ends[side]) for side in Side if side not in self.registered)

    @property
    def keys_delivered(self) -> int:
        return sum(keys for keys, _ in self.issued.values())

    @property
    def bits_delivered(self) -> int:
        return sum(bits for _, bits in self.issued.values())

    @property
    def priority(self) -> int:
        return self.grant.priority if self.grant is not None else 0

    def side_of(self, node: str) -> Side | None:
        if node == self.source.node:
            return Side.SOURCE
        if node == self.destination.node:
            return Side.DESTINATION
        return None

    def view(self) -> dict[str, Any]:
        """Its row of the sessions view, JSON-ready."""
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
