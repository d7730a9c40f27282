"""The clocks of admission control: peer wait, inactivity, Held retries and retention.

Each live session has one deadline: while Accepted, the time its peer must register by;
once Active or Held, the time it ends unless a key request comes first. A KeySession
outlives any deadline: it lasts as long as its resource. Deadlines sit in a heap; a key
request only pushes one out, so it costs O(1) and the stale heap entry is skipped when it
surfaces. Held sessions retry to find a path with exponential backoff. Ended sessions stay
visible for the retention, then are forgotten.

The timers only tell what is due; the lifecycle and rerouting act on it. Their durations
are the ``AdmissionSettings``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterator, Mapping

from vqkd.operator.control.network_session import NetworkSession


class SessionTimers:
    def __init__(self, *, peer_wait_s: float, inactivity_timeout_s: float, held_retry_s: float,
                 held_retry_max_s: float, retention_s: float):
        self.peer_wait_s = peer_wait_s
        self.inactivity_timeout_s = inactivity_timeout_s
        self.held_retry_s = held_retry_s
        self.held_retry_max_s = held_retry_max_s
        self.retention_s = retention_s
        self._deadlines: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._ended: deque[tuple[float, str]] = deque()

    # --- deadlines -----------------------------------------------------------------------

    def arm_peer_wait(self, session: NetworkSession, now: float) -> None:
        self._arm(session, now + self.peer_wait_s)

    def arm_inactivity(self, session: NetworkSession, now: float) -> None:
        # A KeySession lives as long as its resource: only sessions the applications opened
        # end when unused.
        if session.declared_as is None:
            self._arm(session, now + self.inactivity_timeout_s)
        else:
            session.deadline = math.inf  # outlives the peer-wait deadline armed when it was declared

    def _arm(self, session: NetworkSession, deadline: float) -> None:
        """Set the session's deadline; a heap entry is queued only when it must fire sooner
        than the one queued."""
        session.deadline = deadline
        if session.timer_at is None or deadline < session.timer_at:
            session.timer_at = deadline
            heapq.heappush(self._deadlines, (deadline, next(self._order), session.id))

    def due(self, now: float, sessions: Mapping[str, NetworkSession]) -> list[NetworkSession]:
        """The live sessions whose deadline has passed."""
        due = []
        while self._deadlines and self._deadlines[0][0] <= now:
            at, _, session_id = heapq.heappop(self._deadlines)
            session = sessions.get(session_id)
            if session is None or not session.live or session.timer_at != at:
                continue  # ended, or superseded by an entry that fires sooner
            session.timer_at = None
            if session.deadline <= now:
                due.append(session)
            else:
                self._arm(session, session.deadline)
        return due

    # --- Held retries --------------------------------------------------------------------

    def first_retry(self, session: NetworkSession, now: float) -> None:
        session.retries = 0
        session.retry_at = now + self.held_retry_s

    def next_retry(self, session: NetworkSession, now: float) -> None:
        """Another attempt failed: wait twice as long, up to ``held_retry_max_s``."""
        session.retries += 1
        backoff = self.held_retry_s * 2 ** session.retries
        session.retry_at = now + min(backoff, self.held_retry_max_s)

    @staticmethod
    def retry_due(session: NetworkSession, now: float) -> bool:
        return session.retry_at is not None and session.retry_at <= now

    # --- retention -----------------------------------------------------------------------

    def ended(self, session: NetworkSession, now: float) -> None:
        self._ended.append((now, session.id))

    def past_retention(self, now: float) -> Iterator[str]:
        """The IDs of sessions that ended longer ago than the retention, each once."""
        horizon = now - self.retention_s
        while self._ended and self._ended[0][0] <= horizon:
            yield self._ended.popleft()[1]
