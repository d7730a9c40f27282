"""KeySession: the control core's access, admission and routing for one session, and its status.

A KeySession is applied once the network can take it: both endpoint nodes registered and
joined by registered links, every KM polled once (so routing avoids those that do not
answer) and both endpoint KMs answering. Resources arrive in no particular order, and
applied earlier a session would be refused for good (no path, or no KM to configure).

Sessions applications open at their KM (ETSI 004, or an implicit ETSI 014 session) start in
the control core; once admitted, each is recorded as a KeySession labelled
``vqkd.io/origin=application``, annotated with its session ID and with the ends whose
applications have opened it (``vqkd.io/registered``, kept up to date). That resource is the
durable record: a restarted operator applies it under the same session ID. An Active session
gets its configuration pushed again, so the applications' key stream continues; a session
still waiting for its peer waits again, and the peer's OPEN_CONNECT with the Key_stream_ID
the first application got joins it.

Deleting a KeySession sends the deletion to every KM that may hold the session and keeps
the finalizer until each confirmed (a KM that is away gets it when it is back).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import kopf

from vqkd.operator.control.network_session import BOTH_SIDES, NetworkSession, Side
from vqkd.operator.control.errors import ControlError, UnresolvedReference
from vqkd.operator.kopf.handlers.common import INVALID, dump, plain, refuse, validated, wait
from vqkd.operator.kopf.kube import VQKD, KubeError
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.kopf.manifests import (
    ANNOTATION_REGISTERED, ANNOTATION_SESSION_ID, LABEL_ORIGIN, ORIGIN_APPLICATION, build_application_session,
)
from vqkd.operator.resources.admission_cycle import AdmissionState
from vqkd.operator.resources.models import ConditionType, KeySession, KeySessionStatus, SessionPhase

KIND = "KeySession"
RECORD_ATTEMPTS = 5
log = logging.getLogger(__name__)


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


async def reconcile(runtime: Runtime, body: Mapping[str, Any]) -> None:
    with runtime.metrics.reconcile(KIND):
        resource = validated(runtime, KIND, body, _document(body))
        name = resource.name
        annotations = body["metadata"].get("annotations") or {}
        session_id = annotations.get(ANNOTATION_SESSION_ID)
        registered = registered_sides(annotations)
        if registered is None:
            refuse(runtime, KIND, name, INVALID, f"annotation {ANNOTATION_REGISTERED}="
                   f"{annotations[ANNOTATION_REGISTERED]!r}: expected source, destination or source,destination")
        if session_id:
            runtime.app_sessions[session_id] = name
            runtime.app_recorded.setdefault(session_id, annotations.get(ANNOTATION_REGISTERED, ""))
            live = runtime.core.session(session_id)
            if live is not None and live.declared_as is None:
                # Opened by an application in this operator's lifetime: the core holds it already.
                runtime.resources.sessions[name] = resource
                runtime.solved(KIND, name)
                return
        if runtime.core.declared_session(name) is None and not _ended(resource):
            waiting = _not_ready(runtime, resource)
            if waiting is not None:
                wait(runtime, KIND, name, *waiting, delay=runtime.options.poll_interval_s)
        try:
            await runtime.core.apply(resource, registered=registered)
        except UnresolvedReference as e:
            wait(runtime, KIND, name, "UnresolvedReference", str(e))
        except ControlError as e:
            refuse(runtime, KIND, name, "Refused", str(e))
        runtime.resources.sessions[name] = resource
        runtime.solved(KIND, name)


def _ended(resource: KeySession) -> bool:
    """Its status says it ended for the spec it still has: the core keeps it ended."""
    status = resource.status
    return status.phase in (SessionPhase.TERMINATED, SessionPhase.REJECTED) \
        and status.observed_generation == resource.metadata.generation


def _not_ready(runtime: Runtime, resource: KeySession) -> tuple[str, str] | None:
    """Why the network cannot take this session yet (reason, message), or None."""
    core = runtime.core
    for side, endpoint in (("source", resource.spec.source), ("destination", resource.spec.destination)):
        if endpoint.node not in core.topology.nodes:
            return "UnresolvedReference", (f"KeySession {resource.name}: spec.{side}.node names QKDNode "
                                           f"{endpoint.node!r}, which is not registered (yet)")
    source, destination = resource.spec.source.node, resource.spec.destination.node
    if not _connected(runtime, source, destination):
        return "NoLinks", (f"no chain of registered QKDLinks joins {source} and {destination} yet; the session "
                           "is admitted once one does")
    unpolled = sorted(node for node in core.topology.nodes
                      if runtime.health.get(node) is None or runtime.health[node].ok is None)
    if unpolled:
        return "WaitingForKMs", f"waiting for the first poll of the KMs of {', '.join(unpolled)}"
    down = [f"{node} ({runtime.health[node].error})" for node in (source, destination) if not runtime.health[node].ok]
    if down:
        return "WaitingForKMs", f"waiting for the KMs of the endpoint nodes to answer: {', '.join(down)}"
    return None


def _connected(runtime: Runtime, source: str, destination: str) -> bool:
    """Whether registered links join the two nodes, whatever their state: a session waits for
    the links it needs to be registered, but is not held back by a link that is down."""
    topology = runtime.core.topology
    reached, frontier = {source}, [source]
    while frontier:
        node = frontier.pop()
        for link in topology.links_at(node):
            other = link.far_end(node)
            if other not in reached:
                reached.add(other)
                frontier.append(other)
    return destination in reached


async def delete(runtime: Runtime, body: Mapping[str, Any]) -> None:
    name = body["metadata"]["name"]
    with runtime.metrics.reconcile(KIND):
        core = runtime.core
        session = runtime.session_of(name)
        session_id = session.id if session is not None else _session_id(body)
        if core.declared_session(name) is not None:
            await core.delete(KIND, name)
        elif session is not None:
            await core.admission.terminate(session, "Deleted", f"KeySession {name} was deleted", core.clock())
            core.admission.forget(session)
        if session_id:
            unconfirmed = sorted(node for node in core.topology.nodes
                                 if session_id in core.admission.pending_deletes(node))
            if unconfirmed:
                raise kopf.TemporaryError(
                    f"KeySession {name}: the KMs of {', '.join(unconfirmed)} have not confirmed the deletion of "
                    f"session {session_id}; it is sent again when they answer", delay=runtime.options.retry_delay_s)
            runtime.app_sessions.pop(session_id, None)
            runtime.app_recorded.pop(session_id, None)
        runtime.forget(KIND, name)


# --- sessions opened by applications -------------------------------------------------


def registered_value(sides: Iterable[Side]) -> str:
    """The ``vqkd.io/registered`` annotation for these ends: "source", "destination" or both."""
    return ",".join(str(side) for side in Side if side in set(sides))


def registered_sides(annotations: Mapping[str, str]) -> frozenset[Side] | None:
    """The ends a KeySession's applications had opened: both for a declared session, and
    for the record of one applications opened, what its ``vqkd.io/registered`` says (None
    when that is not a list of ends)."""
    value = annotations.get(ANNOTATION_REGISTERED)
    if value is None:
        return BOTH_SIDES
    try:
        sides = frozenset(Side(part.strip()) for part in value.split(","))
    except ValueError:
        return None
    return sides


def record_application_session(runtime: Runtime, session: NetworkSession) -> None:
    """Called by the core's event listener on each transition of a live session applications
    opened: its KeySession is created, and its ``vqkd.io/registered`` kept up to date.

    One recorder runs per session; events arriving meanwhile make it look once more, so the
    writes follow the session's state in order."""
    runtime.app_sessions.setdefault(session.id, f"app-{session.id}")
    if session.id in runtime.app_recording:
        runtime.app_recording[session.id] = True
        return
    runtime.app_recording[session.id] = True
    runtime.spawn(_record(runtime, session.id), name=f"record-session-{session.id}")


async def _record(runtime: Runtime, session_id: str) -> None:
    try:
        while runtime.app_recording.get(session_id):
            runtime.app_recording[session_id] = False
            await _write_record(runtime, session_id)
    finally:
        runtime.app_recording.pop(session_id, None)


async def _write_record(runtime: Runtime, session_id: str) -> None:
    session = runtime.core.session(session_id)
    if session is None or not session.live or session.grant is None:
        return
    registered = registered_value(session.registered)
    if runtime.app_recorded.get(session_id) == registered:
        return
    name = runtime.app_sessions.get(session_id, f"app-{session_id}")
    for attempt in range(1, RECORD_ATTEMPTS + 1):
        try:
            if session_id in runtime.app_recorded:
                await asyncio.to_thread(runtime.kube.patch, VQKD[KIND], name,
                                        {"metadata": {"annotations": {ANNOTATION_REGISTERED: registered}}})
            else:
                await asyncio.to_thread(runtime.kube.create, VQKD[KIND], _application_record(runtime, session))
            runtime.app_recorded[session_id] = registered
            return
        except KubeError as e:
            if e.conflict:  # created already (by an earlier attempt whose answer was lost): patch it
                runtime.app_recorded[session_id] = ""
                continue
            if e.not_found and session_id in runtime.app_recorded:  # the record was deleted: the session ends with it
                return
            error: Exception = e
        except OSError as e:
            error = e
        runtime.metrics.errors(KIND).inc()
        log.warning("recording session %s in KeySession %s failed (attempt %d of %d): %s", session_id, name,
                    attempt, RECORD_ATTEMPTS, error)
        await asyncio.sleep(runtime.options.retry_delay_s)
    log.error("session %s has no up-to-date KeySession: an operator restart would not restore it as it is",
              session_id)


def _application_record(runtime: Runtime, session: NetworkSession) -> dict[str, Any]:
    qos = session.grant.qos.model_dump(mode="json", by_alias=True, exclude_none=True)
    body = build_application_session(session.id, session.user, (session.source.node, session.source.sae_id),
                                     (session.destination.node, session.destination.sae_id), qos,
                                     registered_value(session.registered))
    ref = runtime.refs.get(("UserProfile", session.user))
    if ref is not None and ref.uid:
        # Deleting the user deletes the records of its sessions along with it.
        kopf.append_owner_reference(body, owner={"apiVersion": "vqkd.io/v1alpha1", "kind": "UserProfile",
                                                 "metadata": {"name": session.user, "uid": ref.uid}})
    return body


async def collect(runtime: Runtime, body: Mapping[str, Any]) -> None:
    """End and remove the records of application sessions the applications no longer use.

    A session an application opened ends when unused for the inactivity timeout; its record
    goes after the retention of ended sessions. Rebuilt by a restarted operator, the session
    is declared by its record and would live as long as it: here it ends when unused too.
    """
    if (body["metadata"].get("labels") or {}).get(LABEL_ORIGIN) != ORIGIN_APPLICATION:
        return
    name = body["metadata"]["name"]
    settings = runtime.options.admission
    session = runtime.session_of(name)
    if session is not None and session.live and session.declared_as is not None:
        if not session.both_registered:
            return  # still waiting for its peer: admission's peer wait ends it (PeerNotRegistered)
        last_used = session.last_key_request_at or session.activated_at or session.created_at
        idle = runtime.core.clock() - last_used
        if idle >= settings.inactivity_timeout_s:
            runtime.status.event(KIND, name, "Normal", "InactivityTimeout",
                                 f"no key request for {idle:.0f} s; deleting this record ends the session")
            await asyncio.to_thread(runtime.kube.delete, VQKD[KIND], name)
        return
    status = KeySessionStatus.model_validate(plain(body.get("status") or {}))
    ready = status.condition(ConditionType.READY)
    if status.phase not in (SessionPhase.TERMINATED, SessionPhase.REJECTED) or ready is None:
        return
    if (datetime.now(timezone.utc) - ready.last_transition_time).total_seconds() >= settings.terminated_retention_s:
        await asyncio.to_thread(runtime.kube.delete, VQKD[KIND], name)


# --- status ---------------------------------------------------------------------------


def status_of(runtime: Runtime, name: str, previous: dict[str, Any]) -> dict[str, Any] | None:
    status = KeySessionStatus.model_validate(previous)
    generation = runtime.generation(KIND, name)
    problem = runtime.problems.get((KIND, name))
    session = runtime.session_of(name)

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
