"""What the control plane does when the network changes under its sessions.

Nodes, links and users come, change and go (their resources); links' health changes
(monitoring samples, silence) and KMs are lost or back (liveness). Each change is recorded
in the topology, routing and access control, and then ends, reroutes or resumes the
sessions it concerns: a link Down reroutes the sessions over it, a link back from Down, a
new link or a KM back resumes Held sessions, a user disabled or deleted ends its sessions.

Deletion is safe for the sessions and leaves nothing behind on the KMs:

- a QKDLink deleted: the sessions over it get a new path make-before-break, or are Held
  with a message naming the link;
- a QKDNode deleted (only once no link joins it): the sessions ending there end, and its
  KM drops every entry it may still hold (a Held session that used to cross it) before the
  node is forgotten; an SAE taken off a node ends the sessions it is an end of there;
- a UserProfile deleted: its sessions end, every KM on their paths confirming.
"""

from __future__ import annotations

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.control.access import AccessControl
from vqkd.operator.control.admission import Admission
from vqkd.operator.control.errors import ControlError
from vqkd.operator.control.events import EventLog, Subject
from vqkd.operator.control.monitoring import LinkSample, Monitoring
from vqkd.operator.control.network_session import NetworkSession
from vqkd.operator.control.routing import Routing
from vqkd.operator.control.topology import LinkChange, Topology
from vqkd.operator.resources.models import QKDLink, QKDNode, UserProfile


class NetworkChanges:
    def __init__(self, topology: Topology, routing: Routing, monitoring: Monitoring, access: AccessControl,
                 admission: Admission, events: EventLog):
        self.topology = topology
        self.routing = routing
        self.monitoring = monitoring
        self.access = access
        self.lifecycle = admission.lifecycle
        self.registry = admission.registry
        self.paths = admission.paths
        self.rerouting = admission.rerouting
        self.events = events

    # --- resources -----------------------------------------------------------------------

    async def apply_node(self, node: QKDNode, now: float) -> None:
        record = self.topology.nodes.get(node.name)
        if record is None:
            self.routing.add_node(self.topology.apply_node(node, now))
            return
        detached = record.sae_ids - set(node.spec.sae_ids)
        self.topology.apply_node(node, now)
        for session in self._live_sessions_at(node.name):
            ends = [end for end in (session.source, session.destination) if end.node == node.name]
            if gone := sorted(end.sae_id for end in ends if end.sae_id in detached):
                await self.lifecycle.terminate(
                    session, "SAEDetached", f"SAE {', '.join(gone)} is no longer attached to QKDNode {node.name}", now,
                )

    async def delete_node(self, name: str, now: float) -> None:
        if name not in self.topology.nodes:
            return
        attached = self.topology.links_at(name)
        if attached:
            raise ControlError(f"QKDNode {name} is still joined by QKDLinks "
                               f"{', '.join(link.name for link in attached)}; delete those links first")
        for session in self._live_sessions_at(name):
            await self.lifecycle.terminate(session, "NodeDeleted", f"endpoint node {name} was deleted", now)
        await self.paths.withdraw(name, "node deleted")
        self.topology.remove_node(name)
        self.routing.remove_node(name)

    def _live_sessions_at(self, node: str) -> list[NetworkSession]:
        """The live sessions one of whose ends is at ``node``."""
        return [session for session in self.registry.sessions.values()
                if session.live and node in (session.source.node, session.destination.node)]

    async def apply_link(self, link: QKDLink, now: float) -> None:
        record, created = self.topology.apply_link(link, now)
        if created:
            self.routing.add_link(record)
            change = self.monitoring.watch(record, now)
        else:
            change = self.monitoring.reassess(record, self.routing.loads[record.name].reserved_bps, now)
            self.routing.refresh(record.name)
        await self.after_link_change(change, now)
        if created:  # a new way through the network: Held sessions need not wait for their retry
            await self.rerouting.resume_held(now, due_only=False)

    async def delete_link(self, name: str, now: float) -> None:
        record = self.topology.links.get(name)
        if record is None:
            return
        affected = self.routing.remove_link(record)
        self.monitoring.forget(name, now)
        self.topology.remove_link(name)
        await self.rerouting.reroute_all(affected, f"link {name} deleted", now)

    async def apply_user(self, user: UserProfile, now: float) -> None:
        self.access.put_user(user)
        if not user.spec.enabled:
            for session in self.registry.live_sessions_of(user.name):
                await self.lifecycle.terminate(
                    session, "UserDisabled", f"UserProfile {user.name} was disabled (spec.enabled: false)", now,
                )

    async def delete_user(self, name: str, now: float) -> None:
        for session in self.registry.live_sessions_of(name):
            await self.lifecycle.terminate(session, "UserDeleted", f"UserProfile {name} was deleted", now)
        self.access.remove_user(name)

    # --- link health and KM liveness -----------------------------------------------------

    async def link_sample(self, sample: LinkSample, now: float) -> None:
        load = self.routing.loads.get(sample.link)
        change = self.monitoring.ingest(sample, load.reserved_bps if load is not None else 0)
        self.routing.refresh(sample.link)
        await self.after_link_change(change, now)

    async def silent_links(self, now: float) -> None:
        """Links whose monitoring went quiet for too long are judged Down."""
        for change in self.monitoring.silent(now):
            await self.after_link_change(change, now)

    async def after_link_change(self, change: LinkChange | None, now: float) -> None:
        if change is None:
            return
        link = change.link
        if change.after is LinkState.DOWN:
            await self.rerouting.reroute_all(
                self.routing.sessions_on_link(link.name), f"link {link.name} Down ({link.reason})", now,
            )
        elif change.before is LinkState.DOWN:
            await self.rerouting.resume_held(now, due_only=False)

    async def node_down(self, node: str, reason: str, message: str, now: float) -> None:
        if self.topology.set_node_state(node, False, reason, message or f"the KM of node {node} is unreachable", now):
            await self.rerouting.reroute_all(self.routing.sessions_at_node(node), f"node {node} down ({reason})", now)

    async def node_up(self, node: str, reason: str, message: str, now: float) -> None:
        self.topology.set_node_state(node, True, reason, message or f"the KM of node {node} is serving", now)
        unconfirmed = await self.paths.resync(node, now)
        pending = await self.paths.flush_deletes(node)
        if unconfirmed or pending:
            record = self.topology.node(node)
            self.events.record(now, Subject.NODE, node, record.status, record.status, "ResyncIncomplete",
                               f"{unconfirmed} session configurations and {pending} deletions not confirmed by "
                               f"the KM of node {node}; they are sent again when it is reported up next")
        await self.rerouting.resume_held(now, due_only=False)
