"""The control core: the elements of the control plane behind one small API.

Both runtimes drive it the same way. They apply the resources (QKDNode, QKDLink,
UserProfile, KeySession) as they appear, change and go; relay the KMs' calls (open,
key-request signal, close); feed monitoring samples and KM liveness; and call ``tick``
regularly for the timers. The core pushes session configuration to the KMs through the
``KMPusher`` the runtime gives it, and shows its state through views and the event log.

Time comes from the injected ``clock`` (seconds; ``time.time`` by default), read once per
call, so tests drive it step by step. All calls run on one event loop.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vqkd.operator.control.access import AccessControl, Credentials, TokenLookup, no_tokens
from vqkd.operator.control.admission import (
    BOTH_SIDES,
    Admission,
    AdmissionSettings,
    Session,
    SessionState,
    Side,
)
from vqkd.operator.control.errors import ControlError, UnresolvedReference
from vqkd.operator.control.events import EventLog, Subject
from vqkd.operator.control.session_config import KMPusher
from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control.monitoring import Alarm, LinkSample, Monitoring, MonitoringSettings
from vqkd.operator.control.routing import Routing
from vqkd.operator.control.topology import LinkChange, Topology
from vqkd.operator.resources.network import Network
from vqkd.operator.resources.models import (
    KeySession,
    KeySessionSpec,
    LinkState,
    QKDLink,
    QKDNode,
    QoS,
    Resource,
    SessionPhase,
    UserProfile,
)


# ETSI GS QKD 004 OPEN_CONNECT statuses a refusal maps to.
ETSI004_NO_QKD_CONNECTION = 4
ETSI004_KSID_IN_USE = 5
ETSI004_QOS_NOT_MET = 7


@dataclass(frozen=True, slots=True)
class OpenResult:
    """The answer to a KM's open request (``OpenSessionReply``)."""

    accepted: bool
    session_id: str
    reason: str
    message: str
    qos: QoS | None  # what was granted
    peer_registered: bool
    etsi004_status: int = 0  # when refused: what to tell an ETSI 004 application
    unauthorized: bool = False  # refused by access control


class ControlCore:
    def __init__(
        self,
        pusher: KMPusher,
        *,
        clock: Callable[[], float] = time.time,
        token_lookup: TokenLookup = no_tokens,
        namespace: str = "default",
        admission: AdmissionSettings = AdmissionSettings(),
        monitoring: MonitoringSettings = MonitoringSettings(),
        event_capacity: int = 10_000,
    ):
        self.clock = clock
        self.events = EventLog(event_capacity)
        self.topology = Topology(self.events)
        self.routing = Routing(self.topology)
        self.monitoring = Monitoring(self.topology, monitoring)
        self.access = AccessControl(self.topology, token_lookup, namespace)
        self.admission = Admission(self.routing, pusher, self.events, admission)
        self._declared: dict[str, tuple[str, KeySessionSpec]] = {}  # KeySession name -> (session ID, spec)

    # --- resources ---------------------------------------------------------------------

    async def load(self, network: Network) -> None:
        """Apply every resource of a loaded network, those referred to first."""
        for resource in network.resources():
            await self.apply(resource)

    async def apply(self, resource: Resource, *, registered: frozenset[Side] = BOTH_SIDES) -> None:
        """Create or update one resource. Raises ControlError (UnresolvedReference: retry later).

        ``registered`` is for a KeySession recording a session applications opened: the SAEs
        that had opened it. A session still waiting for its peer is restored waiting (no
        path), and the peer's open joins it under the same session ID.
        """
        now = self.clock()
        if isinstance(resource, QKDNode):
            if resource.name not in self.topology.nodes:
                self.routing.add_node(self.topology.apply_node(resource, now))
            else:
                self.topology.apply_node(resource, now)
        elif isinstance(resource, QKDLink):
            await self._apply_link(resource, now)
        elif isinstance(resource, UserProfile):
            await self._apply_user(resource, now)
        elif isinstance(resource, KeySession):
            await self._apply_key_session(resource, now, registered)
        else:
            raise ControlError(f"cannot apply {type(resource).__name__}: expected QKDNode, QKDLink, UserProfile "
                               "or KeySession")

    async def delete(self, kind: str, name: str) -> None:
        """Remove one resource and end or reroute what depended on it."""
        now = self.clock()
        if kind == "QKDNode":
            await self._delete_node(name, now)
        elif kind == "QKDLink":
            await self._delete_link(name, now)
        elif kind == "UserProfile":
            for session in self.admission.live_sessions_of(name):
                await self.admission.terminate(session, "UserDeleted", f"UserProfile {name} was deleted", now)
            self.access.remove_user(name)
        elif kind == "KeySession":
            declared = self._declared.pop(name, None)
            session = self.admission.sessions.get(declared[0]) if declared else None
            if session is not None:
                await self.admission.terminate(session, "Deleted", f"KeySession {name} was deleted", now)
                self.admission.forget(session)
        else:
            raise ControlError(f"cannot delete kind {kind!r}: expected QKDNode, QKDLink, UserProfile or KeySession")

    async def _apply_link(self, link: QKDLink, now: float) -> None:
        record, created = self.topology.apply_link(link, now)
        if created:
            self.routing.add_link(record)
            change = self.monitoring.watch(record, now)
        else:
            change = self.monitoring.reassess(record, self.routing.loads[record.name].reserved_bps, now)
            self.routing.refresh(record.name)
        await self._after_link_change(change, now)

    async def _delete_link(self, name: str, now: float) -> None:
        record = self.topology.links.get(name)
        if record is None:
            return
        affected = self.routing.remove_link(record)
        self.monitoring.forget(name, now)
        self.topology.remove_link(name)
        await self.admission.reroute_all(affected, f"link {name} deleted", now)

    async def _delete_node(self, name: str, now: float) -> None:
        if name not in self.topology.nodes:
            return
        attached = self.topology.links_at(name)
        if attached:
            raise ControlError(f"QKDNode {name} is still joined by QKDLinks "
                               f"{', '.join(link.name for link in attached)}; delete those links first")
        for session in list(self.admission.sessions.values()):
            if session.live and name in (session.source.node, session.destination.node):
                await self.admission.terminate(session, "NodeDeleted", f"endpoint node {name} was deleted", now)
        self.topology.remove_node(name)
        self.routing.remove_node(name)

    async def _apply_user(self, user: UserProfile, now: float) -> None:
        self.access.put_user(user)
        if not user.spec.enabled:
            for session in self.admission.live_sessions_of(user.name):
                await self.admission.terminate(
                    session, "UserDisabled", f"UserProfile {user.name} was disabled (spec.enabled: false)", now,
                )

    async def _apply_key_session(self, resource: KeySession, now: float, registered: frozenset[Side]) -> None:
        """A declared session: both SAEs count as registered (unless told otherwise), so it is
        routed at once.

        Applying the same spec again changes nothing; a changed spec ends the session and
        admits it again under the same session ID. A session whose status says it ended,
        for the spec it still has, stays ended (a restarted control plane does not revive it).
        """
        name, spec = resource.name, resource.spec
        declared = self._declared.get(name)
        if declared is not None:
            session_id, declared_spec = declared
            if declared_spec == spec:
                return
            previous = self.admission.sessions.get(session_id)
            if previous is not None:
                await self.admission.terminate(previous, "SpecChanged",
                                               f"KeySession {name} changed; admitting it again", now)
                self.admission.forget(previous)
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
            self.admission.refuse(
                session_id, user.name, source, destination, "SAENotOwned",
                f"spec.source.saeId {source.sae_id} is not owned by UserProfile {user.name}", now, declared_as=name,
            )
            return
        decision = self.access.permit(user, source, destination)
        if not decision.ok:
            self.admission.refuse(session_id, user.name, source, destination, decision.reason, decision.message, now,
                                  declared_as=name)
            return
        session = self.admission.admit(user, source, destination, spec.qos, registered, now,
                                       session_id=session_id, declared_as=name)
        await self.admission.activate(session, now)  # nothing yet while a peer is missing

    # --- the KMs' calls (ControlPlane service) -----------------------------------------

    async def open_session(
        self,
        node: str,
        caller: Credentials,
        source: Endpoint,
        destination: Endpoint,
        qos: QoS | None = None,
        session_id: str | None = None,
        implicit: bool = False,
    ) -> OpenResult:
        """A KM's configuration request on behalf of an SAE that opened a session (paper Fig. 2a/3a).

        Without a session ID the open joins a session waiting for this SAE (or a declared
        one), else starts a new one; with an ID it joins that session, or starts one under
        that ID (both applications agreed on it beforehand). ``implicit`` (ETSI 014) counts
        both SAEs as registered. The reply comes once the path is configured, or refused.
        The QoS that counts is the one of the open that created the session.
        """
        now = self.clock()
        decision = self.access.authorize(caller, node, source, destination)
        if not decision.ok:
            return self._refused(session_id or str(uuid.uuid4()), decision.reason, decision.message, now,
                                 unauthorized=True)
        side = Side.SOURCE if caller.sae_id == source.sae_id else Side.DESTINATION
        if session_id:
            session = self.admission.sessions.get(session_id)
            refusal = self._check_named_session(session, session_id, source, destination)
            if refusal is not None:
                reason, message, status = refusal
                return self._refused(session_id, reason, message, now, etsi004_status=status)
        else:
            session = self.admission.find_joinable(source, destination, side, implicit)
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
            session = self.admission.admit(user, source, destination, qos or QoS(), registered, now,
                                           session_id=session_id, implicit=implicit)
        else:
            for registering in sorted(registered):
                self.admission.register(session, registering, now)
        if session.state is SessionState.ACCEPTED and session.both_registered:
            await self.admission.activate(session, now)
        if not session.live:
            # Refused by the SLA check (no grant), or admitted but no path could be configured.
            status = ETSI004_QOS_NOT_MET if session.grant is None else ETSI004_NO_QKD_CONNECTION
            return OpenResult(False, session.id, session.reason, session.message, None, False, status)
        return OpenResult(True, session.id, session.reason, session.message, session.grant.qos,
                          session.both_registered)

    def _check_named_session(
        self, session: Session | None, session_id: str, source: Endpoint, destination: Endpoint,
    ) -> tuple[str, str, int] | None:
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

    def _refused(self, session_id: str, reason: str, message: str, now: float, *,
                 etsi004_status: int = ETSI004_NO_QKD_CONNECTION, unauthorized: bool = False) -> OpenResult:
        self.events.record(now, Subject.SESSION, session_id, None, SessionState.TERMINATED, reason, message)
        return OpenResult(False, session_id, reason, message, None, False, etsi004_status, unauthorized)

    async def key_requested(self, session_id: str, node: str | None = None, requests: int = 1) -> bool:
        """A key-request signal from an endpoint KM, for ``requests`` key requests since its
        previous one; False when the session cannot serve keys.

        A KM signals only for a session it holds the configuration of, which is pushed once
        both ends have opened. So a signal for a session waiting for its peer means the peer
        had opened before the control plane restarted and its record said so: both ends
        count as registered and the session is configured again.
        """
        now = self.clock()
        session = self.admission.sessions.get(session_id)
        if session is None or (node is not None and session.side_of(node) is None):
            return False
        if node is not None and session.state is SessionState.ACCEPTED and not session.both_registered:
            for side in BOTH_SIDES - session.registered:
                self.admission.register(session, side, now)
            await self.admission.activate(session, now)
        return self.admission.key_requested(session, now, requests)

    async def session_closed(self, session_id: str, node: str, reason: str = "") -> bool:
        """A close request from an endpoint KM; False when unknown, already ended or not from an endpoint."""
        session = self.admission.sessions.get(session_id)
        if session is None or session.side_of(node) is None:
            return False
        detail = f": {reason}" if reason else ""
        return await self.admission.terminate(session, "Closed", f"close request from the KM of {node}{detail}",
                                              self.clock())

    def keys_issued(self, node: str, incarnation: str, counts: Iterable[tuple[str, int, int]]) -> None:
        """What the KM instance ``incarnation`` of ``node`` reports having issued per session
        since it started, as (session ID, keys, bits); sessions it is no endpoint of are skipped."""
        sessions = self.admission.sessions
        for session_id, keys, bits in counts:
            session = sessions.get(session_id)
            if session is not None and session.side_of(node) is not None:
                session.issued[(node, incarnation)] = (keys, bits)

    # --- monitoring and liveness -------------------------------------------------------

    async def link_sample(self, sample: LinkSample) -> None:
        load = self.routing.loads.get(sample.link)
        change = self.monitoring.ingest(sample, load.reserved_bps if load is not None else 0)
        self.routing.refresh(sample.link)
        await self._after_link_change(change, self.clock())

    async def _after_link_change(self, change: LinkChange | None, now: float) -> None:
        if change is None:
            return
        link = change.link
        if change.after is LinkState.DOWN:
            await self.admission.reroute_all(
                self.routing.sessions_on_link(link.name), f"link {link.name} Down ({link.reason})", now,
            )
        elif change.before is LinkState.DOWN:
            await self.admission.resume_held(now, due_only=False)

    async def node_down(self, node: str, reason: str = "KMUnreachable", message: str = "") -> None:
        """The KM of ``node`` is gone: sessions through it are rerouted, those ending there held."""
        now = self.clock()
        if self.topology.set_node_state(node, False, reason, message or f"the KM of node {node} is unreachable", now):
            await self.admission.reroute_all(self.routing.sessions_at_node(node), f"node {node} down ({reason})", now)

    async def node_up(self, node: str, reason: str = "KMReady", message: str = "") -> None:
        """The KM of ``node`` serves (again), possibly as a new instance that lost its state:
        it gets every session it takes part in pushed again and the deletions it missed,
        and Held sessions try to resume."""
        now = self.clock()
        self.topology.set_node_state(node, True, reason, message or f"the KM of node {node} is serving", now)
        unconfirmed = await self.admission.resync(node, now)
        pending = await self.admission.flush_deletes(node)
        if unconfirmed or pending:
            record = self.topology.node(node)
            self.events.record(now, Subject.NODE, node, record.status, record.status, "ResyncIncomplete",
                               f"{unconfirmed} session configurations and {pending} deletions not confirmed by "
                               f"the KM of node {node}; they are sent again when it is reported up next")
        await self.admission.resume_held(now, due_only=False)

    async def tick(self, now: float | None = None) -> None:
        """Run the timers: silent links, expired sessions, Held sessions due for a retry."""
        now = self.clock() if now is None else now
        for change in self.monitoring.silent(now):
            await self._after_link_change(change, now)
        await self.admission.expire(now)
        await self.admission.resume_held(now, due_only=True)
        self.admission.prune(now)

    # --- views -------------------------------------------------------------------------

    def session(self, session_id: str) -> Session | None:
        return self.admission.sessions.get(session_id)

    def declared_session(self, name: str) -> Session | None:
        """The session of a KeySession resource."""
        declared = self._declared.get(name)
        return self.admission.sessions.get(declared[0]) if declared else None

    def sessions(self) -> list[dict[str, Any]]:
        return [session.view() for session in self.admission.sessions.values()]

    def links(self) -> list[dict[str, Any]]:
        rows = []
        for name, link in sorted(self.topology.links.items()):
            load = self.routing.loads[name]
            rows.append({
                "name": name,
                "nodes": list(link.ends),
                "type": str(link.type),
                "state": str(link.state),
                "reason": link.reason,
                "message": link.message,
                "keyRateBps": link.available_bps,
                "measured": link.measured_at is not None,
                "qber": link.current_qber,
                "qberThreshold": link.qber_threshold,
                "storedKeyBits": link.stored_key_bits,
                "loadBps": link.load_bps,
                "reservedBps": load.reserved_bps,
                "sessions": len(load.sessions),
                "weight": round(load.weight, 4),
            })
        return rows

    def nodes(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "status": node.status,
                "reason": node.reason,
                "message": node.message,
                "saeIds": sorted(node.sae_ids),
                "links": [link.name for link in self.topology.links_at(name)],
                "sessions": len(self.routing.sessions_at_node(name)),
            }
            for name, node in sorted(self.topology.nodes.items())
        ]

    def users(self) -> list[dict[str, Any]]:
        """Each UserProfile with its SLA and what its active sessions use of it."""
        rows = []
        for name, user in sorted(self.access.users.items()):
            sla = user.spec.sla
            rows.append({
                "name": name,
                "enabled": user.spec.enabled,
                "saeIds": list(user.spec.sae_ids),
                "priority": user.spec.priority,
                "maxSessions": sla.max_sessions,
                "maxKeyRateBps": sla.max_key_rate_bps,
                **self.user_usage(name),
            })
        return rows

    def user_usage(self, name: str) -> dict[str, int]:
        """What the active sessions of UserProfile ``name`` hold and have delivered."""
        live = self.admission.live_sessions_of(name)
        return {
            "sessions": len(live),
            "reservedBps": round(self.admission.usage(name).reserved_bps),
            "keysDelivered": sum(session.keys_delivered for session in live),
            "bitsDelivered": sum(session.bits_delivered for session in live),
        }

    def alarms(self) -> list[Alarm]:
        return list(self.monitoring.alarms)

    def etsi015(self) -> dict[str, dict]:
        """Every node's ETSI GS QKD 015 ``qkd_node`` document, keyed by node name."""
        live = (session.application() for session in self.admission.sessions.values() if session.live)
        return self.topology.etsi015(self.routing.loads, live)
