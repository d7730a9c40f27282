"""Every session admission control knows, and the indexes its decisions read.

The registry holds live sessions and the ended ones still shown (for the retention, or as
long as the KeySession declaring them exists). Live sessions are indexed by user (what the
SLA check counts), by their pair of ends (which session an open request joins) and, when
Held, in the set the retries walk. It decides nothing: the lifecycle and rerouting do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control.network_session import NetworkSession, Side
from vqkd.operator.control.sla import Usage


@dataclass(slots=True)
class _UserTally:
    sessions: set[str] = field(default_factory=set)
    reserved_bps: int = 0


class SessionRegistry:
    def __init__(self) -> None:
        self.sessions: dict[str, NetworkSession] = {}
        self._users: dict[str, _UserTally] = {}
        self._live_by_ends: dict[tuple[Endpoint, Endpoint], list[str]] = {}
        self._held: set[str] = set()

    def add(self, session: NetworkSession) -> None:
        """Keep a session; a live one counts for its user and can be joined from now on."""
        self.sessions[session.id] = session
        if session.live:
            tally = self._users.setdefault(session.user, _UserTally())
            tally.sessions.add(session.id)
            tally.reserved_bps += session.grant.min_rate_bps
            self._live_by_ends.setdefault((session.source, session.destination), []).append(session.id)

    def ended(self, session: NetworkSession) -> None:
        """A session ended: it counts for nothing any more, but stays visible."""
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

    def forget(self, session: NetworkSession) -> None:
        """Drop an ended session at once (its KeySession resource was deleted or re-declared)."""
        if session.live:
            raise ValueError(f"session {session.id} is {session.state}; terminate it before forgetting it")
        self.sessions.pop(session.id, None)

    def held(self) -> list[NetworkSession]:
        return [self.sessions[session_id] for session_id in self._held]

    def hold(self, session: NetworkSession) -> None:
        self._held.add(session.id)

    def release_hold(self, session: NetworkSession) -> None:
        self._held.discard(session.id)

    def usage(self, user: str) -> Usage:
        tally = self._users.get(user)
        return Usage(len(tally.sessions), tally.reserved_bps) if tally else Usage()

    def live_sessions_of(self, user: str) -> list[NetworkSession]:
        tally = self._users.get(user)
        return [self.sessions[session_id] for session_id in sorted(tally.sessions)] if tally else []

    def find_joinable(self, source: Endpoint, destination: Endpoint, side: Side,
                      implicit: bool) -> NetworkSession | None:
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
