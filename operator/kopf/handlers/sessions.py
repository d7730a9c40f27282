"""KeySession: the control core's access, admission and routing for one session, and its status.

A KeySession is applied once the network can take it: both endpoint nodes registered and
joined by registered links, every KM polled once (so routing avoids those that do not
answer) and both endpoint KMs answering. Resources arrive in no particular order, and
applied earlier a session would be refused for good (no path, or no KM to configure).

The record of a session an application opened (see ``application_sessions``) is applied
like any KeySession when the operator restarts, under the session ID of its annotation: an
Active session gets its configuration pushed again, so the applications' key stream
continues; a session still waiting for its peer waits again, and the peer's OPEN_CONNECT
with the Key_stream_ID the first application got joins it.

Deleting a KeySession sends the deletion to every KM that may hold the session and keeps
the finalizer until each confirmed (a KM that is away gets it when it is back).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import kopf

from vqkd.operator.control.network_session import NetworkSession, Side
from vqkd.operator.resources.admission_cycle import AdmissionState
from vqkd.operator.control.errors import ControlError, UnresolvedReference
from vqkd.operator.kopf.handlers.application_sessions import ApplicationSessions, registered_sides
from vqkd.operator.kopf.handlers.common import INVALID, Problems, plain, validated
from vqkd.operator.kopf.manifests import ANNOTATION_REGISTERED, ANNOTATION_SESSION_ID
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.kopf.status import dump
from vqkd.operator.resources.models import ConditionType, KeySession, KeySessionStatus, SessionPhase

KIND = "KeySession"


def _session_id(body: Mapping[str, Any]) -> str | None:
    """The session ID a KeySession is bound to: its annotation (application sessions) or status."""
    annotated = (body["metadata"].get("annotations") or {}).get(ANNOTATION_SESSION_ID)
    return annotated or (body.get("status") or {}).get("sessionId")


def _document(body: Mapping[str, Any]) -> dict[str, Any]:
    """The object to validate; an application session keeps the ID its applications know,
    even if its status was never written."""
    document = plain(body)
    annotated = (document["metadata"].get("annotations") or {}).get(ANNOTATION_SESSION_ID)
    if annotated:
        document.setdefault("status", {})["sessionId"] = annotated
    return document


class SessionHandler:
    """KeySession into the control core; owns the session's status."""

    def __init__(self, runtime: Runtime, applications: ApplicationSessions):
        self.runtime = runtime
        self.applications = applications
        self.problems = Problems(KIND, runtime.status, runtime.options.retry_delay_s)

    async def reconcile(self, body: Mapping[str, Any]) -> None:
        runtime = self.runtime
        resource = validated(runtime.status, self.problems, body, _document(body))
        name = resource.name
        annotations = body["metadata"].get("annotations") or {}
        session_id = annotations.get(ANNOTATION_SESSION_ID)
        registered = registered_sides(annotations)
        if registered is None:
            self.problems.refuse(name, INVALID, f"annotation {ANNOTATION_REGISTERED}="
                                 f"{annotations[ANNOTATION_REGISTERED]!r}: expected source, destination or "
                                 "source,destination")
        if session_id:
            self.applications.seen(session_id, name, annotations.get(ANNOTATION_REGISTERED, ""))
            live = runtime.core.session(session_id)
            if live is not None and live.declared_as is None:
                # Opened by an application in this operator's lifetime: the core holds it already.
                runtime.resources.sessions[name] = resource
                self.problems.solved(name)
                return
        if runtime.core.declared_session(name) is None and not _ended(resource):
            waiting = self._not_ready(resource)
            if waiting is not None:
                self.problems.wait(name, *waiting, delay=runtime.options.poll_interval_s)
        try:
            await runtime.core.apply(resource, registered=registered)
        except UnresolvedReference as e:
            self.problems.wait(name, "UnresolvedReference", str(e))
        except ControlError as e:
            self.problems.refuse(name, "Refused", str(e))
        runtime.resources.sessions[name] = resource
        self.problems.solved(name)

    def _not_ready(self, resource: KeySession) -> tuple[str, str] | None:
        """Why the network cannot take this session yet (reason, message), or None."""
        core, host = self.runtime.core, self.runtime.host
        nodes = [row["name"] for row in core.nodes()]
        for side, endpoint in (("source", resource.spec.source), ("destination", resource.spec.destination)):
            if endpoint.node not in nodes:
                return "UnresolvedReference", (f"KeySession {resource.name}: spec.{side}.node names QKDNode "
                                               f"{endpoint.node!r}, which is not registered (yet)")
        source, destination = resource.spec.source.node, resource.spec.destination.node
        # Registered links, whatever their state: a session waits for the links it needs to be
        # registered, but is not held back by a link that is down.
        if not core.routing.connected(source, destination):
            return "NoLinks", (f"no chain of registered QKDLinks joins {source} and {destination} yet; the session "
                               "is admitted once one does")
        unpolled = sorted(node for node in nodes if host.liveness(node).ok is None)
        if unpolled:
            return "WaitingForKMs", f"waiting for the first poll of the KMs of {', '.join(unpolled)}"
        down = [f"{node} ({host.liveness(node).error})" for node in (source, destination) if not host.liveness(node).ok]
        if down:
            return "WaitingForKMs", f"waiting for the KMs of the endpoint nodes to answer: {', '.join(down)}"
        return None

    async def delete(self, body: Mapping[str, Any]) -> None:
        runtime = self.runtime
        name = body["metadata"]["name"]
        core = runtime.core
        session = self.applications.session_of(name)
        session_id = session.id if session is not None else _session_id(body)
        if core.declared_session(name) is not None:
            await core.delete(KIND, name)
        elif session is not None:
            await core.admission.terminate(session, "Deleted", f"KeySession {name} was deleted", core.clock())
            core.admission.forget(session)
        if session_id:
            unconfirmed = sorted(row["name"] for row in core.nodes()
                                 if session_id in core.admission.pending_deletes(row["name"]))
            if unconfirmed:
                raise kopf.TemporaryError(
                    f"KeySession {name}: the KMs of {', '.join(unconfirmed)} have not confirmed the deletion of "
                    f"session {session_id}; it is sent again when they answer", delay=runtime.options.retry_delay_s)
            self.applications.forget(session_id)
        runtime.status.forget(KIND, name)
        self.problems.forget(name)
        runtime.resources.sessions.pop(name, None)

    def render(self, name: str, previous: dict[str, Any], generation: int | None) -> dict[str, Any] | None:
        """The KeySession's status; None while it shows no session yet (the status stays as it is)."""
        status = KeySessionStatus.model_validate(previous)
        problem = self.problems.get(name)
        session = self.applications.session_of(name)

        def condition(type: str, ok: bool, reason: str, message: str) -> None:
            status.set_condition(type, "True" if ok else "False", reason, message, observed_generation=generation)

        if problem is not None:
            status.phase = SessionPhase.REJECTED if problem.permanent else SessionPhase.PENDING
            status.reason = problem.message
            status.path, status.reserved_bps = [], 0
            for type in (ConditionType.ADMITTED, ConditionType.ROUTED, ConditionType.CONFIGURED, ConditionType.READY):
                condition(type, False, problem.reason, problem.message)
        elif session is not None:
            _show(status, session, condition)
        else:
            return None
        status.observed_generation = generation
        return dump(status)


def _ended(resource: KeySession) -> bool:
    """Its status says it ended for the spec it still has: the core keeps it ended."""
    status = resource.status
    return status.phase in (SessionPhase.TERMINATED, SessionPhase.REJECTED) \
        and status.observed_generation == resource.metadata.generation


def _show(status: KeySessionStatus, session: NetworkSession, condition) -> None:
    view = session.view()
    active = session.state is AdmissionState.ACTIVE
    why = f"{session.reason}: {session.message}" if session.message else session.reason
    status.phase = session.phase
    status.session_id = uuid.UUID(session.id)
    status.path = view["path"]  # for an ended session: the last path it had
    status.reserved_bps = view["reservedBps"]
    status.keys_delivered = session.keys_delivered
    ends = {Side.SOURCE: session.source.sae_id, Side.DESTINATION: session.destination.sae_id}
    status.peers_registered = sorted(ends[side] for side in session.registered)
    status.reason = None if active else why
    reason = session.reason or str(session.state)
    if session.grant is not None:
        condition(ConditionType.ADMITTED, True, "WithinSLA",
                  f"priority {session.grant.priority}, {session.grant.min_rate_bps} bit/s reserved per link")
    else:
        condition(ConditionType.ADMITTED, False, reason, why)
    path = " -> ".join(view["path"])
    if active:
        condition(ConditionType.ROUTED, True, "PathReserved", f"path {path}")
        condition(ConditionType.CONFIGURED, True, "KMsConfigured",
                  f"{len(view['path'])} KMs hold configuration version {session.version}")
        condition(ConditionType.READY, True, "Active", f"keys flow on path {path}")
    else:
        waiting = session.state is AdmissionState.ACCEPTED and not session.both_registered
        condition(ConditionType.ROUTED, False, "WaitingForPeer" if waiting else reason, why)
        condition(ConditionType.CONFIGURED, False, "WaitingForPeer" if waiting else reason, why)
        condition(ConditionType.READY, False, reason, why)
