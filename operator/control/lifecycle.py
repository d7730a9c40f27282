"""Admission control's session cycle (paper §3.2, Fig. 2b): admitted, routed, ended.

    configuration request ──SLA exceeded──▶ Terminated (reason; the KM's reply says so)
            │ QoS within the SLA
            ▼
        Accepted ── peer never registers (peer_wait_s) ──▶ Terminated
            │ both SAEs registered: path reserved, configuration pushed to every KM on it,
            │ confirmations collected (no path or a KM not confirming ⇒ Terminated)
            ▼
         Active ⇄ Held          timer restarted by every key-request signal
            │                   (Held: see ``rerouting``)
            ▼
        Terminated ◀── close from an endpoint KM, timer expiry, user disabled, deletion:
                       deletion signal to every KM that may hold the session,
                       confirmations collected, reservations freed

No path is reserved for half a session: routing is asked only once both SAEs registered
(a KeySession resource or an ETSI 014 implicit open registers both at once).

One operation at a time per session (a lock each), so a close arriving while a path is
being pushed waits for the push and then removes everything it installed. Every state
change goes through ``transition`` (or ``_end``) and so through ``NetworkSession.move_to``,
which holds it to ``admission_cycle.ALLOWED``; each is one event in the log.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control.events import EventLog, Subject
from vqkd.operator.control.installation import PathInstaller, describe
from vqkd.operator.control.network_session import NetworkSession, Side
from vqkd.operator.control.routing import NoRoute
from vqkd.operator.control.session_registry import SessionRegistry
from vqkd.operator.control.sla import Refusal, check
from vqkd.operator.control.timers import SessionTimers
from vqkd.operator.resources.admission_cycle import AdmissionState
from vqkd.operator.resources.models import QoS, UserProfile


class SessionLifecycle:
    def __init__(self, registry: SessionRegistry, paths: PathInstaller, timers: SessionTimers, events: EventLog):
        self.registry = registry
        self.paths = paths
        self.timers = timers
        self.events = events

    def transition(self, session: NetworkSession, to: AdmissionState, reason: str, message: str, now: float) -> None:
        """Move a session to ``to`` (as the cycle allows) and record why."""
        before = session.move_to(to)
        session.reason, session.message = reason, message
        self.events.record(now, Subject.SESSION, session.id, before, to, reason, message)

    def admit(
        self, user: UserProfile, source: Endpoint, destination: Endpoint, qos: QoS, registered: Iterable[Side],
        now: float, *, session_id: str | None = None, declared_as: str | None = None, implicit: bool = False,
    ) -> NetworkSession:
        """A configuration request: the QoS checked against the user's SLA ⇒ Accepted or Terminated.

        A refused session is returned Terminated and kept only when declared (its resource
        must show why); the event log records every refusal.
        """
        session_id = session_id or str(uuid4())
        verdict = check(user, qos, self.registry.usage(user.name))
        if isinstance(verdict, Refusal):
            return self.refuse(session_id, user.name, source, destination, verdict.reason, verdict.message, now,
                               declared_as=declared_as)
        session = NetworkSession(
            id=session_id, user=user.name, source=source, destination=destination, grant=verdict,
            created_at=now, declared_as=declared_as, implicit=implicit, registered=set(registered),
        )
        self.registry.add(session)
        waiting = "" if session.both_registered else f"; waiting for {session.missing} to register"
        self.events.record(now, Subject.SESSION, session.id, None, AdmissionState.ACCEPTED, "Admitted",
                           f"{source} -> {destination} for UserProfile {user.name}: QoS within the SLA "
                           f"(priority {verdict.priority}, minBps {verdict.min_rate_bps}){waiting}")
        self.timers.arm_peer_wait(session, now)
        return session

    def refuse(
        self, session_id: str, user: str, source: Endpoint, destination: Endpoint, reason: str, message: str,
        now: float, *, declared_as: str | None = None,
    ) -> NetworkSession:
        """A session refused before it was admitted (by the SLA, or a declared session's checks).

        Kept, for its resource's status, only when declared; the event log records every refusal.
        """
        session = NetworkSession(
            id=session_id, user=user, source=source, destination=destination, grant=None, created_at=now,
            declared_as=declared_as, state=AdmissionState.TERMINATED, reason=reason, message=message,
            rejected=True, ended_at=now,
        )
        self.events.record(now, Subject.SESSION, session_id, None, AdmissionState.TERMINATED, reason, message)
        if declared_as is not None:
            self.registry.add(session)
            self.timers.ended(session, now)
        return session

    def register(self, session: NetworkSession, side: Side, now: float) -> None:
        """The other SAE opened the session too."""
        if side in session.registered:
            return
        session.registered.add(side)
        end = session.source if side is Side.SOURCE else session.destination
        self.events.record(now, Subject.SESSION, session.id, session.state, session.state, "PeerRegistered",
                           f"{end} registered")

    async def activate(self, session: NetworkSession, now: float) -> None:
        """Both SAEs registered: reserve a path, configure every KM on it ⇒ Active, or Terminated."""
        async with session.lock:
            if session.state is not AdmissionState.ACCEPTED or not session.both_registered:
                return
            outcome = await self.paths.install(session, now)
            if isinstance(outcome, NoRoute):
                await self._end(session, outcome.reason, outcome.message, now, rejected=True)
                return
            session.activated_at = now
            self.transition(session, AdmissionState.ACTIVE, "Configured",
                            f"path {describe(outcome)} configured on {len(outcome.nodes)} KMs "
                            f"(version {session.version})", now)
            self.timers.arm_inactivity(session, now)

    def key_requested(self, session: NetworkSession, now: float, requests: int = 1) -> bool:
        """A key-request signal (for ``requests`` requests): the session is in use, its timer
        restarts. False when it cannot serve."""
        if session.state not in (AdmissionState.ACTIVE, AdmissionState.HELD):
            return False
        session.key_requests += requests
        session.last_key_request_at = now
        self.timers.arm_inactivity(session, now)
        return True

    async def terminate(self, session: NetworkSession, reason: str, message: str, now: float) -> bool:
        """End a session; False when it had already ended (nothing is freed twice)."""
        async with session.lock:
            return await self._end(session, reason, message, now)

    async def _end(self, session: NetworkSession, reason: str, message: str, now: float,
                   rejected: bool = False) -> bool:
        if not session.live:
            return False
        # Terminated before the deletions are awaited, so no key request is served meanwhile;
        # the event follows once the KMs' confirmations are known.
        before = session.move_to(AdmissionState.TERMINATED)
        session.rejected, session.ended_at = rejected, now
        self.registry.ended(session)
        outcome = await self.paths.uninstall(session, reason)
        session.reason, session.message = reason, f"{message}; {outcome}" if outcome else message
        self.events.record(now, Subject.SESSION, session.id, before, AdmissionState.TERMINATED, reason,
                           session.message)
        self.timers.ended(session, now)
        return True

    async def expire(self, now: float) -> None:
        """End the sessions whose timer ran out: peers that never registered, sessions unused."""
        timers = self.timers
        for session in timers.due(now, self.registry.sessions):
            if session.state is AdmissionState.ACCEPTED:
                await self.terminate(session, "PeerNotRegistered",
                                     f"{session.missing} did not register within {timers.peer_wait_s:.0f} s", now)
            else:
                await self.terminate(session, "InactivityTimeout",
                                     f"no key request for {timers.inactivity_timeout_s:.0f} s", now)

    def prune(self, now: float) -> None:
        """Forget sessions ended longer ago than the retention; declared ones stay with their resource."""
        for session_id in self.timers.past_retention(now):
            session = self.registry.sessions.get(session_id)
            if session is not None and not session.live and session.declared_as is None:
                self.registry.forget(session)
