"""The KMs' calls to the control plane (paper Fig. 2a/3a): open, key-request signal, close.

An open request is a KM's configuration request on behalf of an SAE: access control checks
the caller, then the open joins a session or starts one, and the reply comes once the path
is configured or the session refused. Key-request signals keep a session's timer alive;
a close from an endpoint KM ends it. The KMs also report what they issued per session.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control.access import AccessControl, Credentials
from vqkd.operator.control.admission import Admission
from vqkd.operator.control.events import EventLog, Subject
from vqkd.operator.control.network_session import BOTH_SIDES, NetworkSession, Side
from vqkd.operator.resources.admission_cycle import AdmissionState
from vqkd.operator.resources.models import QoS

# ETSI GS QKD 004 OPEN_CONNECT statuses a refusal maps to.
ETSI004_NO_QKD_CONNECTION = 4
ETSI004_KSID_IN_USE = 5
ETSI004_QOS_NOT_MET = 7


@dataclass(frozen=True, slots=True)
class OpenReply:
    """Admission control's answer to a KM's open request, as ``OpenSessionReply`` carries it."""

    accepted: bool
    session_id: str
    reason: str
    message: str
    qos: QoS | None  # what was granted
    peer_registered: bool
    etsi004_status: int = 0  # when refused: what to tell an ETSI 004 application
    unauthorized: bool = False  # refused by access control


class KMCalls:
    def __init__(self, access: AccessControl, admission: Admission, events: EventLog):
        self.access = access
        self.lifecycle = admission.lifecycle
        self.registry = admission.registry
        self.events = events

    async def open_session(self, node: str, caller: Credentials, source: Endpoint, destination: Endpoint,
                           qos: QoS | None, session_id: str | None, implicit: bool, now: float) -> OpenReply:
        decision = self.access.authorize(caller, node, source, destination)
        if not decision.ok:
            return self._refused(session_id or str(uuid.uuid4()), decision.reason, decision.message, now,
                                 unauthorized=True)
        side = Side.SOURCE if caller.sae_id == source.sae_id else Side.DESTINATION
        if session_id:
            session = self.registry.sessions.get(session_id)
            refusal = _check_named_session(session, session_id, source, destination)
            if refusal is not None:
                reason, message, status = refusal
                return self._refused(session_id, reason, message, now, etsi004_status=status)
        else:
            session = self.registry.find_joinable(source, destination, side, implicit)
        registered = BOTH_SIDES if implicit else frozenset({side})
        if session is None:
            # The session belongs to the source SAE's user, whichever SAE opens first.
            user = decision.user if side is Side.SOURCE else self.access.owner_of(source.sae_id)
            if user is None:
                return self._refused(session_id or str(uuid.uuid4()), "UnknownSAE",
                                     f"source SAE {source.sae_id} is not owned by any UserProfile; a session "
                                     "belongs to its source SAE's user", now, unauthorized=True)
            if user is not decision.user:
                permitted = self.access.permit(user, source, destination)
                if not permitted.ok:
                    return self._refused(session_id or str(uuid.uuid4()), permitted.reason, permitted.message, now,
                                         unauthorized=True)
            session = self.lifecycle.admit(user, source, destination, qos or QoS(), registered, now,
                                           session_id=session_id, implicit=implicit)
        else:
            for registering in sorted(registered):
                self.lifecycle.register(session, registering, now)
        if session.state is AdmissionState.ACCEPTED and session.both_registered:
            await self.lifecycle.activate(session, now)
        if not session.live:
            # Refused by the SLA check (no grant), or admitted but no path could be configured.
            status = ETSI004_QOS_NOT_MET if session.grant is None else ETSI004_NO_QKD_CONNECTION
            return OpenReply(False, session.id, session.reason, session.message, None, False, status)
        return OpenReply(True, session.id, session.reason, session.message, session.grant.qos,
                         session.both_registered)

    def _refused(self, session_id: str, reason: str, message: str, now: float, *,
                 etsi004_status: int = ETSI004_NO_QKD_CONNECTION, unauthorized: bool = False) -> OpenReply:
        self.events.record(now, Subject.SESSION, session_id, None, AdmissionState.TERMINATED, reason, message)
        return OpenReply(False, session_id, reason, message, None, False, etsi004_status, unauthorized)

    async def key_requested(self, session_id: str, node: str | None, requests: int, now: float) -> bool:
        session = self.registry.sessions.get(session_id)
        if session is None or (node is not None and session.side_of(node) is None):
            return False
        if node is not None and session.state is AdmissionState.ACCEPTED and not session.both_registered:
            for side in BOTH_SIDES - session.registered:
                self.lifecycle.register(session, side, now)
            await self.lifecycle.activate(session, now)
        return self.lifecycle.key_requested(session, now, requests)

    async def session_closed(self, session_id: str, node: str, reason: str, now: float) -> bool:
        session = self.registry.sessions.get(session_id)
        if session is None or session.side_of(node) is None:
            return False
        detail = f": {reason}" if reason else ""
        return await self.lifecycle.terminate(session, "Closed", f"close request from the KM of {node}{detail}", now)

    def keys_issued(self, node: str, incarnation: str, counts: Iterable[tuple[str, int, int]]) -> None:
        sessions = self.registry.sessions
        for session_id, keys, bits in counts:
            session = sessions.get(session_id)
            if session is not None and session.side_of(node) is not None:
                session.issued[(node, incarnation)] = (keys, bits)


def _check_named_session(session: NetworkSession | None, session_id: str, source: Endpoint,
                         destination: Endpoint) -> tuple[str, str, int] | None:
    """Why an open naming ``session_id`` cannot join it: (reason, message, ETSI 004 status), or None."""
    if session is None:
        try:
            uuid.UUID(session_id)
        except ValueError:
            return ("InvalidSessionID", f"session ID {session_id!r} is not a UUID (ETSI 004 Key_stream_ID)",
                    ETSI004_NO_QKD_CONNECTION)
        return None
    if not session.live:
        return ("SessionEnded", f"session {session_id} has ended ({session.reason}); "
                                "open a new one without a session ID", ETSI004_KSID_IN_USE)
    if (session.source, session.destination) != (source, destination):
        return ("SessionMismatch", f"session {session_id} joins {session.source} to {session.destination}, "
                                   f"not {source} to {destination}", ETSI004_KSID_IN_USE)
    return None
