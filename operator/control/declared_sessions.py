"""Sessions declared by KeySession resources, and the resources they belong to.

A declared session has both SAEs registered (unless the resource records one an
application opened, told by ``registered``), so it is routed at once. Applying the same
spec again changes nothing; a changed spec ends the session and admits it again under the
same session ID. A session whose status says it ended, for the spec it still has, stays
ended: a restarted control plane does not revive it.
"""

from __future__ import annotations

import uuid

from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control.access import AccessControl
from vqkd.operator.control.admission import Admission
from vqkd.operator.control.errors import UnresolvedReference
from vqkd.operator.control.network_session import NetworkSession, Side
from vqkd.operator.resources.models import KeySession, KeySessionSpec, SessionPhase


class DeclaredSessions:
    def __init__(self, access: AccessControl, admission: Admission):
        self.access = access
        self.lifecycle = admission.lifecycle
        self.registry = admission.registry
        self._declared: dict[str, tuple[str, KeySessionSpec]] = {}  # KeySession name -> (session ID, spec)

    def session(self, name: str) -> NetworkSession | None:
        """The session of a KeySession resource."""
        declared = self._declared.get(name)
        return self.registry.sessions.get(declared[0]) if declared else None

    async def apply(self, resource: KeySession, now: float, registered: frozenset[Side]) -> None:
        name, spec = resource.name, resource.spec
        declared = self._declared.get(name)
        if declared is not None:
            session_id, declared_spec = declared
            if declared_spec == spec:
                return
            previous = self.registry.sessions.get(session_id)
            if previous is not None:
                await self.lifecycle.terminate(previous, "SpecChanged",
                                               f"KeySession {name} changed; admitting it again", now)
                self.registry.forget(previous)
        else:
            status = resource.status
            ended = status.phase in (SessionPhase.TERMINATED, SessionPhase.REJECTED)
            if ended and status.observed_generation == resource.metadata.generation:
                return
            session_id = str(status.session_id) if status.session_id else str(uuid.uuid4())
        user = self.access.users.get(spec.user)
        if user is None:
            raise UnresolvedReference(
                f"KeySession {name}: spec.user names UserProfile {spec.user!r}, which is not registered"
            )
        self._declared[name] = (session_id, spec)
        source = Endpoint(spec.source.node, spec.source.sae_id)
        destination = Endpoint(spec.destination.node, spec.destination.sae_id)
        owner = self.access.owner_of(source.sae_id)
        if owner is None or owner.name != user.name:
            self.lifecycle.refuse(
                session_id, user.name, source, destination, "SAENotOwned",
                f"spec.source.saeId {source.sae_id} is not owned by UserProfile {user.name}", now, declared_as=name,
            )
            return
        decision = self.access.permit(user, source, destination)
        if not decision.ok:
            self.lifecycle.refuse(session_id, user.name, source, destination, decision.reason, decision.message,
                                  now, declared_as=name)
            return
        session = self.lifecycle.admit(user, source, destination, spec.qos, registered, now,
                                       session_id=session_id, declared_as=name)
        await self.lifecycle.activate(session, now)  # nothing yet while a peer is missing

    async def delete(self, name: str, now: float) -> None:
        declared = self._declared.pop(name, None)
        session = self.registry.sessions.get(declared[0]) if declared else None
        if session is not None:
            await self.lifecycle.terminate(session, "Deleted", f"KeySession {name} was deleted", now)
            self.registry.forget(session)
