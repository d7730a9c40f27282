"""The admission control element (paper §3.1–3.2): its parts, and what the runtimes ask of it.

- ``session_registry``: every session and the indexes decisions read (per user, per ends, Held);
- ``lifecycle``: the cycle of Fig. 2b, admission to termination (states in ``admission_cycle``);
- ``installation``: configuration pushed to the KMs of a path, make-before-break, and deleted;
- ``rerouting``: a broken path replaced, or the session Held and resumed later;
- ``timers``: peer wait, inactivity, Held retries, retention.

The control core drives the parts; the runtimes read sessions and end one through here.
"""

from __future__ import annotations

from dataclasses import dataclass

from vqkd.operator.control.events import EventLog
from vqkd.operator.control.installation import PathInstaller
from vqkd.operator.control.lifecycle import SessionLifecycle
from vqkd.operator.control.network_session import NetworkSession
from vqkd.operator.control.rerouting import Rerouting
from vqkd.operator.control.routing import Routing
from vqkd.operator.control.session_config import KMPusher
from vqkd.operator.control.session_registry import SessionRegistry
from vqkd.operator.control.sla import Usage
from vqkd.operator.control.timers import SessionTimers


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


class Admission:
    def __init__(self, routing: Routing, pusher: KMPusher, events: EventLog,
                 settings: AdmissionSettings = AdmissionSettings()):
        self.registry = SessionRegistry()
        self.timers = SessionTimers(
            peer_wait_s=settings.peer_wait_s, inactivity_timeout_s=settings.inactivity_timeout_s,
            held_retry_s=settings.held_retry_s, held_retry_max_s=settings.held_retry_max_s,
            retention_s=settings.terminated_retention_s,
        )
        self.paths = PathInstaller(routing, pusher, self.registry, settings.inactivity_timeout_s)
        self.lifecycle = SessionLifecycle(self.registry, self.paths, self.timers, events)
        self.rerouting = Rerouting(routing, self.registry, self.paths, self.timers, self.lifecycle)

    @property
    def sessions(self) -> dict[str, NetworkSession]:
        """Every session known, live or ended, by session ID."""
        return self.registry.sessions

    def usage(self, user: str) -> Usage:
        return self.registry.usage(user)

    def pending_deletes(self, node: str) -> dict[str, str]:
        return self.paths.pending_deletes(node)

    async def terminate(self, session: NetworkSession, reason: str, message: str, now: float) -> bool:
        return await self.lifecycle.terminate(session, reason, message, now)

    def forget(self, session: NetworkSession) -> None:
        self.registry.forget(session)
