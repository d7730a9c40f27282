"""Path installation: a session's configuration pushed to the KMs of its path, and taken back.

Paths change make-before-break: the new path's KMs get the configuration with a higher
version first (a KM on both paths simply replaces its forwarding entry), and only once all
of them confirmed are the KMs no longer on the path told to delete theirs. A deletion a
KM did not confirm is kept and sent again when that node's KM is back; a replaced KM,
which lost its state, gets every session it is on pushed again. A node deleted from the
network has every entry its KM may still hold taken back, and is owed nothing afterwards.

The callers hold the session's lock around ``install`` and ``uninstall``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from vqkd.operator.control.network_session import NetworkSession, Side
from vqkd.operator.control.routing import NoRoute, Route, Routing
from vqkd.operator.control.session_config import (
    KMPusher,
    SessionTerms,
    configure_all,
    delete_all,
    next_version,
)
from vqkd.operator.control.session_registry import SessionRegistry
from vqkd.operator.resources.admission_cycle import AdmissionState

# The largest inactivity timeout a KM accepts (uint32 ms, ~49 days): a declared session's
# KMs keep it until the KeySession is deleted.
UNTIL_DELETED_MS = 2**32 - 1


def describe(route: Route) -> str:
    return " -> ".join(route.nodes)


class PathInstaller:
    def __init__(self, routing: Routing, pusher: KMPusher, registry: SessionRegistry, inactivity_timeout_s: float):
        self.routing = routing
        self.pusher = pusher
        self.registry = registry
        self.inactivity_timeout_s = inactivity_timeout_s  # what the KMs are told for sessions applications opened
        self._pending_deletes: dict[str, dict[str, str]] = {}  # node -> session ID -> reason

    async def install(self, session: NetworkSession, now: float) -> Route | NoRoute:
        """Reserve a path and make every KM on it confirm its configuration, make-before-break."""
        grant = session.grant
        route = self.routing.route(session.id, session.source.node, session.destination.node, grant.min_rate_bps)
        if isinstance(route, NoRoute):
            return route
        terms = self._terms(session, route)
        session.version = next_version(session.version, now)
        configs = terms.for_path(route.nodes, session.version)
        # A KM that did not confirm may still have applied it: it counts as holding an entry.
        session.configured_nodes |= set(configs)
        confirmations = await configure_all(self.pusher, configs)
        if not confirmations.complete:
            self.routing.release(session.id)
            return NoRoute("KMNotConfigured", f"path {describe(route)}: configuration not confirmed by "
                                              f"{confirmations.describe_failures()}")
        leaving = session.configured_nodes - set(route.nodes)
        self.routing.settle(session.id, route)
        session.route, session.terms = route, terms
        session.configured_nodes = set(route.nodes)
        if leaving:
            deleted = await delete_all(self.pusher, leaving, session.id, "rerouted")
            self._remember_failed_deletes(deleted.failed, session.id, "rerouted")
        return route

    def _terms(self, session: NetworkSession, route: Route) -> SessionTerms:
        grant = session.grant
        rate, bucket = grant.token_bucket(route.spare_bps)
        qos = grant.qos
        return SessionTerms(
            session_id=session.id, user=session.user, source=session.source, destination=session.destination,
            priority=grant.priority, rate_bps=rate, bucket_bits=bucket,
            inactivity_timeout_ms=(UNTIL_DELETED_MS if session.declared_as is not None
                                   else round(self.inactivity_timeout_s * 1000)),
            request_timeout_ms=qos.timeout, key_chunk_size=qos.key_chunk_size, ttl_s=qos.ttl,
            fallback=str(qos.fallback),
        )

    async def uninstall(self, session: NetworkSession, reason: str) -> str | None:
        """Send the deletion signal to every KM that may hold the session and free its
        reservations; says how the KMs confirmed, None when no KM was concerned."""
        # The registered endpoint KMs hold the session since their open requests, even
        # before any configuration reached them: they get the deletion signal too.
        ends = {Side.SOURCE: session.source.node, Side.DESTINATION: session.destination.node}
        targets = session.configured_nodes | {ends[side] for side in session.registered}
        confirmations = await delete_all(self.pusher, targets, session.id, reason)
        self._remember_failed_deletes(confirmations.failed, session.id, reason)
        self.routing.release(session.id)
        session.configured_nodes = set()
        if not targets:
            return None
        outcome = f"deletion confirmed by {len(confirmations.confirmed)} of {len(targets)} KMs"
        if confirmations.failed:
            outcome += f", resent when back: {confirmations.describe_failures()}"
        return outcome

    def _remember_failed_deletes(self, failed: Iterable[str], session_id: str, reason: str) -> None:
        for node in failed:
            self._pending_deletes.setdefault(node, {})[session_id] = reason

    def pending_deletes(self, node: str) -> dict[str, str]:
        """The deletions the KM of ``node`` has not confirmed yet: session ID -> reason."""
        return dict(self._pending_deletes.get(node, {}))

    async def resync(self, node: str, now: float) -> int:
        """The KM of ``node`` was replaced and lost its state: push it every session it takes part in.

        Returns how many sessions its KM did not confirm.
        """
        sessions = self.registry.sessions
        session_ids = self.routing.sessions_at_node(node)
        pushes = [self._resync_one(sessions[i], node, now) for i in sorted(session_ids) if i in sessions]
        return sum(not confirmed for confirmed in await asyncio.gather(*pushes))

    async def _resync_one(self, session: NetworkSession, node: str, now: float) -> bool:
        async with session.lock:
            if session.state is not AdmissionState.ACTIVE or session.route is None \
                    or node not in session.route.nodes:
                return True
            session.version = next_version(session.version, now)
            config = session.terms.for_path(session.route.nodes, session.version)[node]
            return (await configure_all(self.pusher, {node: config})).complete

    async def withdraw(self, node: str, reason: str) -> int:
        """The node is being deleted: its KM drops every session entry it may hold (a Held
        session that used to cross it keeps one), the deletions it still owes included.

        Nothing is kept for the node afterwards, whatever its KM answered: it is going away.
        Takes each session's lock. Returns how many deletions its KM did not confirm.
        """
        sessions = [s for s in self.registry.sessions.values() if node in s.configured_nodes]
        owed = self._pending_deletes.pop(node, {})
        unconfirmed = await asyncio.gather(
            *(self._withdraw_one(session, node, reason) for session in sessions),
            *(self._delete_owed(node, session_id, owed_reason) for session_id, owed_reason in sorted(owed.items())
              if session_id not in {session.id for session in sessions}),
        )
        self._pending_deletes.pop(node, None)
        return sum(unconfirmed)

    async def _withdraw_one(self, session: NetworkSession, node: str, reason: str) -> bool:
        async with session.lock:
            if node not in session.configured_nodes:
                return False
            session.configured_nodes.discard(node)
            return await self._delete_owed(node, session.id, reason)

    async def _delete_owed(self, node: str, session_id: str, reason: str) -> bool:
        """True when the KM did not confirm."""
        return not (await delete_all(self.pusher, [node], session_id, reason)).complete

    async def flush_deletes(self, node: str) -> int:
        """Send again the deletions the KM of ``node`` did not confirm; returns how many still fail."""
        pending = self._pending_deletes.pop(node, {})
        for session_id, reason in sorted(pending.items()):
            session = self.registry.sessions.get(session_id)
            if session is not None and node in session.configured_nodes:
                continue  # the session came back to this node meanwhile: its entry is wanted
            confirmations = await delete_all(self.pusher, [node], session_id, reason)
            self._remember_failed_deletes(confirmations.failed, session_id, reason)
        return len(self._pending_deletes.get(node, {}))
