"""When a path breaks: reroute, hold, resume (Active ⇄ Held in the admission cycle).

A link or node of an Active session's path fails ⇒ a new path is installed make-before-
break (Active again, reason Rerouted), or none qualifies ⇒ Held. A Held session keeps
whatever its KMs still hold (they answer "no QKD connection" until it resumes) but no
reservations; it is retried when the topology improves, and on a backoff otherwise.

When capacity is short the important sessions get it: the path searches (and their
reservations) run in priority order before any push is awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from vqkd.operator.control.installation import PathInstaller, describe
from vqkd.operator.control.lifecycle import SessionLifecycle
from vqkd.operator.control.network_session import NetworkSession
from vqkd.operator.control.routing import NoRoute, Routing
from vqkd.operator.control.session_registry import SessionRegistry
from vqkd.operator.control.timers import SessionTimers
from vqkd.operator.resources.admission_cycle import AdmissionState


def _by_priority(session: NetworkSession) -> tuple[int, float, str]:
    return -session.priority, session.created_at, session.id


class Rerouting:
    def __init__(self, routing: Routing, registry: SessionRegistry, paths: PathInstaller, timers: SessionTimers,
                 lifecycle: SessionLifecycle):
        self.routing = routing
        self.registry = registry
        self.paths = paths
        self.timers = timers
        self.lifecycle = lifecycle

    async def reroute_all(self, session_ids: Iterable[str], cause: str, now: float) -> None:
        """Give every listed session whose path broke a new one, highest priority first."""
        sessions = self.registry.sessions
        affected = sorted((sessions[i] for i in session_ids if i in sessions), key=_by_priority)
        await asyncio.gather(*(self._reroute(session, cause, now) for session in affected))

    async def _reroute(self, session: NetworkSession, cause: str, now: float) -> None:
        async with session.lock:
            if session.state is not AdmissionState.ACTIVE or session.route is None:
                return
            if self.routing.usable(session.route):
                return
            old = session.route
            outcome = await self.paths.install(session, now)
            if isinstance(outcome, NoRoute):
                self._hold(session, f"{cause}; no alternative path: {outcome.message}", outcome.reason, now)
                return
            self.lifecycle.transition(session, AdmissionState.ACTIVE, "Rerouted",
                                      f"{cause}: path {describe(outcome)} replaces {describe(old)} "
                                      f"(version {session.version})", now)

    def _hold(self, session: NetworkSession, message: str, reason: str, now: float) -> None:
        self.routing.release(session.id)
        session.route = None
        self.timers.first_retry(session, now)
        self.registry.hold(session)
        self.lifecycle.transition(session, AdmissionState.HELD, reason, message, now)

    async def resume_held(self, now: float, *, due_only: bool) -> None:
        """Try to give Held sessions a path again: all of them after the topology improved,
        or (``due_only``) those whose retry time has come."""
        candidates = [s for s in self.registry.held() if not due_only or self.timers.retry_due(s, now)]
        candidates.sort(key=_by_priority)
        await asyncio.gather(*(self._resume(session, now) for session in candidates))

    async def _resume(self, session: NetworkSession, now: float) -> None:
        async with session.lock:
            if session.state is not AdmissionState.HELD:
                return
            outcome = await self.paths.install(session, now)
            if isinstance(outcome, NoRoute):
                self.timers.next_retry(session, now)
                session.reason, session.message = outcome.reason, f"still no path: {outcome.message}"
                return
            self.registry.release_hold(session)
            session.retry_at = None
            self.lifecycle.transition(session, AdmissionState.ACTIVE, "Resumed",
                                      f"path {describe(outcome)} configured (version {session.version})", now)
