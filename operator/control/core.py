"""The control core: the elements of the control plane behind one small API.

Both runtimes drive it the same way. They apply the resources (QKDNode, QKDLink,
UserProfile, KeySession) as they appear, change and go; relay the KMs' calls (open,
key-request signal, close); feed monitoring samples and KM liveness; and call ``tick``
regularly for the timers. The core pushes session configuration to the KMs through the
``KMPusher`` the runtime gives it, and shows its state through views and the event log.

``ControlCore`` is the front door only: resources go to ``network_changes`` (nodes, links,
users) or ``declared_sessions`` (KeySessions), the KMs' calls to ``km_calls``, the views
to ``views`` and ``etsi015``; admission control's parts are in ``admission``.

Time comes from the injected ``clock`` (seconds; ``time.time`` by default), read once per
call, so tests drive it step by step. All calls run on one event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control import views
from vqkd.operator.control.access import AccessControl, Credentials, TokenLookup, no_tokens
from vqkd.operator.control.admission import Admission, AdmissionSettings
from vqkd.operator.control.declared_sessions import DeclaredSessions
from vqkd.operator.control.errors import ControlError
from vqkd.operator.control.etsi015 import application_of, qkd_nodes
from vqkd.operator.control.events import EventLog
from vqkd.operator.control.km_calls import KMCalls, OpenReply
from vqkd.operator.control.monitoring import Alarm, LinkSample, Monitoring, MonitoringSettings
from vqkd.operator.control.network_changes import NetworkChanges
from vqkd.operator.control.network_session import BOTH_SIDES, NetworkSession, Side
from vqkd.operator.control.routing import Routing
from vqkd.operator.control.session_config import KMPusher
from vqkd.operator.control.topology import Topology
from vqkd.operator.resources.models import KeySession, QKDLink, QKDNode, QoS, Resource, UserProfile
from vqkd.operator.resources.network import Network


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
        self._changes = NetworkChanges(self.topology, self.routing, self.monitoring, self.access, self.admission,
                                       self.events)
        self._declared = DeclaredSessions(self.access, self.admission)
        self._kms = KMCalls(self.access, self.admission, self.events)

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
            await self._changes.apply_node(resource, now)
        elif isinstance(resource, QKDLink):
            await self._changes.apply_link(resource, now)
        elif isinstance(resource, UserProfile):
            await self._changes.apply_user(resource, now)
        elif isinstance(resource, KeySession):
            await self._declared.apply(resource, now, registered)
        else:
            raise ControlError(f"cannot apply {type(resource).__name__}: expected QKDNode, QKDLink, UserProfile "
                               "or KeySession")

    async def delete(self, kind: str, name: str) -> None:
        """Remove one resource and end or reroute what depended on it."""
        now = self.clock()
        if kind == "QKDNode":
            await self._changes.delete_node(name, now)
        elif kind == "QKDLink":
            await self._changes.delete_link(name, now)
        elif kind == "UserProfile":
            await self._changes.delete_user(name, now)
        elif kind == "KeySession":
            await self._declared.delete(name, now)
        else:
            raise ControlError(f"cannot delete kind {kind!r}: expected QKDNode, QKDLink, UserProfile or KeySession")

    # --- the KMs' calls (ControlPlane service) -----------------------------------------

    async def open_session(self, node: str, caller: Credentials, source: Endpoint, destination: Endpoint,
                           qos: QoS | None = None, session_id: str | None = None,
                           implicit: bool = False) -> OpenReply:
        """A KM's configuration request on behalf of an SAE that opened a session (paper Fig. 2a/3a).

        Without a session ID the open joins a session waiting for this SAE (or a declared
        one), else starts a new one; with an ID it joins that session, or starts one under
        that ID (both applications agreed on it beforehand). ``implicit`` (ETSI 014) counts
        both SAEs as registered. The reply comes once the path is configured, or refused.
        The QoS that counts is the one of the open that created the session.
        """
        return await self._kms.open_session(node, caller, source, destination, qos, session_id, implicit,
                                            self.clock())

    async def key_requested(self, session_id: str, node: str | None = None, requests: int = 1) -> bool:
        """A key-request signal from an endpoint KM, for ``requests`` key requests since its
        previous one; False when the session cannot serve keys.

        A KM signals only for a session it holds the configuration of, which is pushed once
        both ends have opened. So a signal for a session waiting for its peer means the peer
        had opened before the control plane restarted and its record said so: both ends
        count as registered and the session is configured again.
        """
        return await self._kms.key_requested(session_id, node, requests, self.clock())

    async def session_closed(self, session_id: str, node: str, reason: str = "") -> bool:
        """A close request from an endpoint KM; False when unknown, already ended or not from an endpoint."""
        return await self._kms.session_closed(session_id, node, reason, self.clock())

    def keys_issued(self, node: str, incarnation: str, counts: Iterable[tuple[str, int, int]]) -> None:
        """What the KM instance ``incarnation`` of ``node`` reports having issued per session
        since it started, as (session ID, keys, bits); sessions it is no endpoint of are skipped."""
        self._kms.keys_issued(node, incarnation, counts)

    # --- monitoring, liveness and time -------------------------------------------------

    async def link_sample(self, sample: LinkSample) -> None:
        await self._changes.link_sample(sample, self.clock())

    async def node_down(self, node: str, reason: str = "KMUnreachable", message: str = "") -> None:
        """The KM of ``node`` is gone: sessions through it are rerouted, those ending there held."""
        await self._changes.node_down(node, reason, message, self.clock())

    async def node_up(self, node: str, reason: str = "KMReady", message: str = "") -> None:
        """The KM of ``node`` serves (again), possibly as a new instance that lost its state:
        it gets every session it takes part in pushed again and the deletions it missed,
        and Held sessions try to resume."""
        await self._changes.node_up(node, reason, message, self.clock())

    async def reconfigure_node(self, node: str) -> int:
        """Push every active session at ``node`` to its KMs again, under a new version: what they
        are given changed though the sessions did not (its KMs were scaled, and each replica at a
        source holds a share of the rate). Returns how many its KMs did not confirm."""
        return await self.admission.paths.resync(node, self.clock())

    async def tick(self, now: float | None = None) -> None:
        """Run the timers: silent links, expired sessions, Held sessions due for a retry."""
        now = self.clock() if now is None else now
        await self._changes.silent_links(now)
        await self.admission.lifecycle.expire(now)
        await self.admission.rerouting.resume_held(now, due_only=True)
        self.admission.lifecycle.prune(now)

    # --- views -------------------------------------------------------------------------

    def session(self, session_id: str) -> NetworkSession | None:
        return self.admission.sessions.get(session_id)

    def declared_session(self, name: str) -> NetworkSession | None:
        """The session of a KeySession resource."""
        return self._declared.session(name)

    def sessions(self) -> list[dict[str, Any]]:
        return [session.view() for session in self.admission.sessions.values()]

    def links(self) -> list[dict[str, Any]]:
        return views.link_rows(self.topology, self.routing)

    def nodes(self) -> list[dict[str, Any]]:
        return views.node_rows(self.topology, self.routing)

    def users(self) -> list[dict[str, Any]]:
        """Each UserProfile with its SLA and what its active sessions use of it."""
        return views.user_rows(self.access, self.admission.registry)

    def user_usage(self, name: str) -> dict[str, int]:
        """What the active sessions of UserProfile ``name`` hold and have delivered."""
        return views.user_usage(self.admission.registry, name)

    def alarms(self) -> list[Alarm]:
        return list(self.monitoring.alarms)

    def etsi015(self) -> dict[str, dict]:
        """Every node's ETSI GS QKD 015 ``qkd_node`` document, keyed by node name."""
        live = (application_of(s) for s in self.admission.sessions.values() if s.live)
        return qkd_nodes(self.topology, self.routing.loads, live)
