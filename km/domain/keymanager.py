"""The key manager of one QKD node: its identity, its topology, the keys waiting for its SAEs.

The identity (node, KME ID, replica ordinal, incarnation) lasts as long as the process. The
topology — the SAE directory, the links, the key limits, the node's other KM replicas — is
what the control plane pushes, and ``apply_topology`` changes it live: a link end the new
topology leaves as it was keeps its pools, its peer's incarnation and its feed; only the ends
that changed are touched. The change is made in one synchronous step, so a request sees the
topology before or after it, never half of it.

A KM holds one end of a link per KM replica of the peer node (``LinkEndConfig.end``: the
link's name and the peer replica); all of them draw from the same module end. Key for a hop
goes over the ends towards it in turn, or the one holding the most when key is short
(``end_towards``), so the traffic of a node spreads over the replicas of the next one.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import count
from typing import Callable

from vqkd.km.config import KeyLimits, KMConfig, KMTopology, LinkEndConfig
from vqkd.km.domain import errors
from vqkd.km.domain.keystore import KeyStore
from vqkd.km.domain.links import Link

# Link settings a running link end takes in place: the feed reads the first two at every
# draw, and the peer's KME ID is only announced in ETSI 014 status. A change of any other
# setting (peer, module, credentials) makes it another link end: removed and added again.
RETUNABLE = frozenset({"block_bits", "pool_target_bits", "peer_kme_id"})

# How long an end whose peer KM did not answer is passed over when choosing one towards its
# node: long enough for requests to avoid a replica that went away, short enough that one
# back with a full pool (which its feed does not call) is used again soon.
UNREACHABLE_PASS_OVER_S = 1.0

# Why link key material was dropped (vqkd_km_flushed_bits_total{reason}).
FLUSH_REASONS = ("peer_restarted", "link_removed", "link_reconfigured")


# A link end: the link's name and the replica of the peer node's KM it pairs with.
End = tuple[str, int]


@dataclass(frozen=True, slots=True)
class LinkDiff:
    """How the link ends of one topology become those of the next, by ``End``."""

    added: tuple[LinkEndConfig, ...] = ()
    removed: tuple[End, ...] = ()
    retuned: tuple[LinkEndConfig, ...] = ()  # changed only in RETUNABLE settings
    replaced: tuple[LinkEndConfig, ...] = ()  # changed otherwise: removed, then added
    unchanged: tuple[End, ...] = ()


def diff_links(held: Mapping[End, LinkEndConfig], wanted: Iterable[LinkEndConfig]) -> LinkDiff:
    wanted = {link.end: link for link in wanted}
    added, retuned, replaced, unchanged = [], [], [], []
    for end, new in wanted.items():
        old = held.get(end)
        if old is None:
            added.append(new)
        elif old == new:
            unchanged.append(end)
        elif {f for f in LinkEndConfig.model_fields if getattr(old, f) != getattr(new, f)} <= RETUNABLE:
            retuned.append(new)
        else:
            replaced.append(new)
    removed = tuple(end for end in held if end not in wanted)
    return LinkDiff(tuple(added), removed, tuple(retuned), tuple(replaced), tuple(unchanged))


@dataclass(frozen=True, slots=True)
class TopologyChange:
    """What applying a topology did: the process plugs a transport into every added link
    end and unplugs every removed one (a replaced link is in both, as two ``Link``s)."""

    version: int  # held afterwards
    applied: bool  # False: the version was not newer than the one held, nothing changed
    added: tuple[Link, ...] = ()
    removed: tuple[Link, ...] = ()
    retuned: tuple[Link, ...] = ()


class KeyManager:
    def __init__(self, config: KMConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.node = config.node
        self.kme_id = config.kme_id
        self.replica = config.replica
        # Drawn anew by every process: peers use it to notice that this KM lost its pools.
        self.incarnation = uuid.uuid4().hex
        self.topology: KMTopology | None = None
        self.saes: Mapping[str, str] = {}
        self.limits = KeyLimits()
        self.links: dict[End, Link] = {}
        self.link_to: dict[str, list[Link]] = {}  # peer node -> its ends, by peer replica
        self.siblings: dict[int, str] = {}  # ordinal -> gRPC address of the node's other KM replicas
        self.store = KeyStore(config.delivered_key_ttl_s, config.delivered_store_max_bits, clock)
        self._link_ends_made: Counter[End] = Counter()  # ends made by this process
        self._turns: dict[str, Iterator[int]] = {}  # peer node -> whose turn it is among its ends
        self._flushed_by_gone_links = dict.fromkeys(FLUSH_REASONS, 0)
        if config.topology is not None:
            self.apply_topology(config.topology)

    @property
    def topology_version(self) -> int | None:
        return self.topology.version if self.topology is not None else None

    def check_configured(self) -> None:
        """Raise ``errors.Unavailable`` while this KM holds no topology (it knows no SAE yet)."""
        if self.topology is None:
            raise errors.Unavailable(
                f"KM {self.node} awaits its configuration (SAEs, links, key limits) from the control plane; "
                "retry shortly")

    def apply_topology(self, topology: KMTopology) -> TopologyChange:
        """Make ``topology`` the one held, touching only the links it changes.

        A version not above the one held changes nothing. A link removed (or replaced) has
        its pools wiped; the bits are counted by reason in ``flushed_bits``.
        """
        if self.topology is not None and topology.version <= self.topology.version:
            return TopologyChange(self.topology.version, applied=False)
        diff = diff_links({end: link.config for end, link in self.links.items()}, topology.links)
        removed = [self._drop(end, "link_removed") for end in diff.removed]
        removed += [self._drop(config.end, "link_reconfigured") for config in diff.replaced]
        retuned = []
        for config in diff.retuned:
            link = self.links[config.end]
            link.config = config
            retuned.append(link)
        added = [self._make_link(config) for config in (*diff.replaced, *diff.added)]
        held = {**self.links, **{link.end: link for link in added}}
        self.links = {config.end: held[config.end] for config in topology.links}
        link_to: dict[str, list[Link]] = {}
        for link in self.links.values():
            link_to.setdefault(link.peer_node, []).append(link)
        for ends in link_to.values():
            ends.sort(key=lambda link: link.peer_replica)
        self.link_to = link_to
        self.siblings = {r: grpc for r, grpc in sorted(topology.replicas.items()) if r != self.replica}
        self.saes = dict(topology.saes)
        self.limits = topology.limits
        self.topology = topology
        return TopologyChange(topology.version, True, tuple(added), tuple(removed), tuple(retuned))

    def _make_link(self, config: LinkEndConfig) -> Link:
        # The first instance of a link end this process makes presents the KM's incarnation;
        # one made again (the end was removed or reconfigured) presents a new one, so the peer
        # drops what it shared with the earlier instance even though this process did not
        # restart. Ends towards different peer replicas meet different peers: they may share
        # an incarnation.
        self._link_ends_made[config.end] += 1
        made = self._link_ends_made[config.end]
        return Link(config, self.incarnation if made == 1 else f"{self.incarnation}-{made}")

    def _drop(self, end: End, reason: str) -> Link:
        link = self.links.pop(end)
        self._flushed_by_gone_links[reason] += link.wipe()
        self._flushed_by_gone_links["peer_restarted"] += link.flushed_bits
        return link

    def flushed_bits(self) -> dict[str, int]:
        """Link key material dropped since start, by reason (``FLUSH_REASONS``)."""
        flushed = dict(self._flushed_by_gone_links)
        flushed["peer_restarted"] += sum(link.flushed_bits for link in self.links.values())
        return flushed

    def node_of(self, sae_id: str) -> str | None:
        return self.saes.get(sae_id)

    def is_local(self, sae_id: str) -> bool:
        return self.saes.get(sae_id) == self.node

    def kme_id_of(self, node: str) -> str:
        if node == self.node:
            return self.kme_id
        ends = self.link_to.get(node)
        return ends[0].config.peer_kme_id if ends else node

    def end_towards(self, node: str, need_bits: int = 0) -> Link | None:
        """The end of the link to ``node`` that ``need_bits`` of key for it go over, among the
        ends whose peer is plugged in: those holding enough take turns, so requests spread over
        the node's KM replicas (pools refilled to their targets would otherwise keep electing
        the same end); if none holds enough, the one holding the most (ties in turn), where the
        wait for key is shortest. None if no end to ``node`` has a peer."""
        ends = [link for link in self.link_to.get(node, ()) if link.peer is not None]
        if len(ends) <= 1:
            return ends[0] if ends else None
        # An end whose peer did not answer lately is tried again only when no other end can be:
        # while a replica is away, requests go to the others instead of failing in turn.
        now = self.clock()
        reachable = [link for link in ends if link.peer_unreachable_at is None
                     or now - link.peer_unreachable_at > UNREACHABLE_PASS_OVER_S]
        ends = reachable or ends
        candidates = [link for link in ends if link.outgoing.available_bits >= need_bits]
        if not candidates:
            most = max(link.outgoing.available_bits for link in ends)
            candidates = [link for link in ends if link.outgoing.available_bits == most]
        turn = self._turns.setdefault(node, count())
        return candidates[next(turn) % len(candidates)]
