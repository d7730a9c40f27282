"""Recording the sessions applications open as KeySessions.

Sessions applications open at their KM (ETSI 004, or an implicit ETSI 014 session) start in
the control core, with no resource. Once admitted, each is recorded as a KeySession
``app-<session ID>`` labelled ``vqkd.io/origin=application``, annotated with its session ID
and with the ends whose applications have opened it (``vqkd.io/registered``, kept up to
date as the session changes). That resource is the durable record: a restarted operator
applies it under the same session ID (see ``sessions``), so the operator holds no state of
its own.

This controller follows the control core's session events, knows which KeySession records
which session (from the records it wrote and from those it is shown), and removes the
records of sessions the applications no longer use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import kopf

from vqkd.operator.control.network_session import BOTH_SIDES, NetworkSession, Side
from vqkd.operator.control.events import Event, Subject
from vqkd.operator.kopf.handlers.common import plain
from vqkd.operator.kopf.kube import VQKD, KubeError
from vqkd.operator.kopf.manifests import (
    ANNOTATION_REGISTERED, LABEL_ORIGIN, ORIGIN_APPLICATION, build_application_session,
)
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.resources.models import ConditionType, KeySessionStatus, SessionPhase

KIND = "KeySession"
RECORD_ATTEMPTS = 5
log = logging.getLogger(__name__)


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


class ApplicationSessions:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._records: dict[str, str] = {}  # session ID -> the KeySession recording it
        self._written: dict[str, str] = {}  # session ID -> its record's vqkd.io/registered, as written
        self._looking: dict[str, bool] = {}  # session ID -> whether its recorder must look again
        runtime.core.events.subscribe(self._on_core_event)

    # --- which KeySession shows which session ------------------------------------------

    def resource_of(self, session_id: str) -> str | None:
        """The KeySession showing a session: the one that declared it, or its record."""
        session = self.runtime.core.session(session_id)
        if session is not None and session.declared_as is not None:
            return session.declared_as
        return self._records.get(session_id)

    def session_of(self, name: str) -> NetworkSession | None:
        """The session a KeySession shows."""
        core = self.runtime.core
        session = core.declared_session(name)
        if session is not None:
            return session
        for session_id, record in self._records.items():
            if record == name:
                return core.session(session_id)
        return None

    def seen(self, session_id: str, name: str, registered: str) -> None:
        """A record read from the API server: ``name`` records ``session_id``, annotated
        ``registered`` (unless this operator wrote it since)."""
        self._records[session_id] = name
        self._written.setdefault(session_id, registered)

    def forget(self, session_id: str) -> None:
        """The record is deleted."""
        self._records.pop(session_id, None)
        self._written.pop(session_id, None)

    # --- recording ------------------------------------------------------------------

    async def collect(self, body: Mapping[str, Any]) -> None:
        """End and remove the records of application sessions the applications no longer use.

        A session an application opened ends when unused for the inactivity timeout; its record
        goes after the retention of ended sessions. Rebuilt by a restarted operator, the session
        is declared by its record and would live as long as it: here it ends when unused too.
        """
        if (body["metadata"].get("labels") or {}).get(LABEL_ORIGIN) != ORIGIN_APPLICATION:
            return
        runtime = self.runtime
        name = body["metadata"]["name"]
        settings = runtime.options.admission
        session = self.session_of(name)
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

    def _on_core_event(self, event: Event) -> None:
        if event.subject is not Subject.SESSION:
            return
        session = self.runtime.core.session(event.name)
        if session is not None and session.live and session.grant is not None \
                and (session.declared_as is None or session.id in self._records):
            self.record(session)

    def record(self, session: NetworkSession) -> None:
        """Create the record of a live session applications opened, or bring its
        ``vqkd.io/registered`` up to date.

        One recorder runs per session; events arriving meanwhile make it look once more, so the
        writes follow the session's state in order."""
        self._records.setdefault(session.id, f"app-{session.id}")
        if session.id in self._looking:
            self._looking[session.id] = True
            return
        self._looking[session.id] = True
        self.runtime.background.spawn(self._record(session.id), name=f"record-session-{session.id}")

    async def _record(self, session_id: str) -> None:
        try:
            while self._looking.get(session_id):
                self._looking[session_id] = False
                await self._write(session_id)
        finally:
            self._looking.pop(session_id, None)

    async def _write(self, session_id: str) -> None:
        runtime = self.runtime
        session = runtime.core.session(session_id)
        if session is None or not session.live or session.grant is None:
            return
        registered = registered_value(session.registered)
        if self._written.get(session_id) == registered:
            return
        name = self._records.get(session_id, f"app-{session_id}")
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                if session_id in self._written:
                    await asyncio.to_thread(runtime.kube.patch, VQKD[KIND], name,
                                            {"metadata": {"annotations": {ANNOTATION_REGISTERED: registered}}})
                else:
                    await asyncio.to_thread(runtime.kube.create, VQKD[KIND], self._body(session))
                self._written[session_id] = registered
                return
            except KubeError as e:
                if e.conflict:  # created already (by an earlier attempt whose answer was lost): patch it
                    self._written[session_id] = ""
                    continue
                if e.not_found and session_id in self._written:  # the record was deleted: the session ends with it
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

    def _body(self, session: NetworkSession) -> dict[str, Any]:
        qos = session.grant.qos.model_dump(mode="json", by_alias=True, exclude_none=True)
        body = build_application_session(session.id, session.user, (session.source.node, session.source.sae_id),
                                         (session.destination.node, session.destination.sae_id), qos,
                                         registered_value(session.registered))
        ref = self.runtime.status.ref("UserProfile", session.user)
        if ref is not None and ref.uid:
            # Deleting the user deletes the records of its sessions along with it.
            kopf.append_owner_reference(body, owner={"apiVersion": "vqkd.io/v1alpha1", "kind": "UserProfile",
                                                     "metadata": {"name": session.user, "uid": ref.uid}})
        return body
