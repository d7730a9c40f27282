"""The key manager of one QKD node: its identity, its topology, the keys waiting for its SAEs.

The identity (node, KME ID, incarnation) lasts as long as the process. The topology — the
SAE directory, the links, the key limits — is what the control plane pushes, and
``apply_topology`` changes it live: a link the new topology leaves as it was keeps its
pools, its peer's incarnation and its feed; only the links that changed are touched. The
change is made in one synchronous step, so a request sees the topology before or after it,
never half of it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Callable

from vqkd.km.config import KeyLimits, KMConfig, KMTopology, LinkEndConfig
from vqkd.km.domain import errors
from vqkd.km.domain.keystore import KeyStore
from vqkd.km.domain.links import Link

# Link settings a running link end takes in place: the feed reads the first two at every
# draw, and the peer's KME ID is only announced in ETSI 014 status. A change of any other
# setting (peer, module, credentials) makes it another link end: removed and added again.
RETUNABLE = frozenset({"block_bits", "pool_target_bits", "peer_kme_id"})

# Why link key material was dropped (vqkd_km_flushed_bits_total{reason}).
FLUSH_REASONS = ("peer_restarted", "link_removed", "link_reconfigured")


@dataclass(frozen=True, slots=True)
class LinkDiff:
    """How the links of one topology become those of the next, by link name."""

    added: tuple[LinkEndConfig, ...] = ()
    removed: tuple[str, ...] = ()
    retuned: tuple[LinkEndConfig, ...] = ()  # changed only in RETUNABLE settings
    replaced: tuple[LinkEndConfig, ...] = ()  # changed otherwise: removed, then added
    unchanged: tuple[str, ...] = ()


def diff_links(held: Mapping[str, LinkEndConfig], wanted: Iterable[LinkEndConfig]) -> LinkDiff:
    wanted = {link.name: link for link in wanted}
    added, retuned, replaced, unchanged = [], [], [], []
    for name, new in wanted.items():
        old = held.get(name)
        if old is None:
            added.append(new)
        elif old == new:
            unchanged.append(name)
        elif {f for f in LinkEndConfig.model_fields if getattr(old, f) != getattr(new, f)} <= RETUNABLE:
            retuned.append(new)
        else:
            replaced.append(new)
    removed = tuple(name for name in held if name not in wanted)
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
        self.node = config.node
        self.kme_id = config.kme_id
        # Drawn anew by every process: peers use it to notice that this KM lost its pools.
        self.incarnation = uuid.uuid4().hex
        self.topology: KMTopology | None = None
        self.saes: Mapping[str, str] = {}
        self.limits = KeyLimits()
        self.links: dict[str, Link] = {}
        self.link_to: dict[str, Link] = {}
        self.store = KeyStore(config.delivered_key_ttl_s, config.delivered_store_max_bits, clock)
        self._link_ends_made: Counter[str] = Counter()  # link name -> ends made by this process
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
        diff = diff_links({name: link.config for name, link in self.links.items()}, topology.links)
        removed = [self._drop(name, "link_removed") for name in diff.removed]
        removed += [self._drop(config.name, "link_reconfigured") for config in diff.replaced]
        retuned = []
        for config in diff.retuned:
            link = self.links[config.name]
            link.config = config
            retuned.append(link)
        added = [self._make_link(config) for config in (*diff.replaced, *diff.added)]
        held = {**self.links, **{link.name: link for link in added}}
        self.links = {config.name: held[config.name] for config in topology.links}
        self.link_to = {link.peer_node: link for link in self.links.values()}
        self.saes = dict(topology.saes)
        self.limits = topology.limits
        self.topology = topology
        return TopologyChange(topology.version, True, tuple(added), tuple(removed), tuple(retuned))

    def _make_link(self, config: LinkEndConfig) -> Link:
        # The first end of a link this process makes presents the KM's incarnation; one made
        # again (the link was removed or reconfigured) presents a new one, so the peer drops
        # what it shared with the earlier end even though this process did not restart.
        self._link_ends_made[config.name] += 1
        made = self._link_ends_made[config.name]
        return Link(config, self.incarnation if made == 1 else f"{self.incarnation}-{made}")

    def _drop(self, name: str, reason: str) -> Link:
        link = self.links.pop(name)
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
        link = self.link_to.get(node)
        return link.config.peer_kme_id if link else node
