"""The SDN controller's role (paper §3.1): the topology database.

Nodes and links are registered from the QKDNode and QKDLink resources. Their state changes
here only: a node is lost or back (its KM), a link goes Up, Degraded or Down (decided by
the monitoring element, or reported by a runtime), and a link's measured metrics are kept
current. Routing reads these records directly, so there is one copy of every fact; the
views (``views``, ``etsi015``) render them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.control.errors import ControlError, UnresolvedReference
from vqkd.operator.control.events import EventLog, Subject
from vqkd.operator.resources.models import LinkType, QKDLink, QKDNode

NODE_UP = "OPERATING"  # ETSI 015 qkdn_status values vqkd uses
NODE_DOWN = "DOWN"


@dataclass(eq=False, slots=True)
class NodeRecord:
    name: str
    kme_id: str
    sae_ids: frozenset[str]
    up: bool = True
    reason: str = ""  # why it is down
    message: str = ""

    @property
    def status(self) -> str:
        return NODE_UP if self.up else NODE_DOWN


@dataclass(eq=False, slots=True)
class LinkRecord:
    name: str
    ends: tuple[str, str]
    type: LinkType
    qber_threshold: float
    # What the spec promises: an emulated module's key rate and QBER. Real modules
    # (ETSI 014) promise nothing; only measurements tell.
    nominal_rate_bps: float | None
    nominal_qber: float | None
    state: LinkState = LinkState.UP
    reason: str = ""
    message: str = ""
    # The latest measurement (monitoring element); None until the first sample.
    key_rate_bps: float | None = None
    qber: float | None = None
    stored_key_bits: int | None = None
    load_bps: float | None = None
    burned_bits: int | None = None  # drawn by the KMs and given up (never shared), as they count
    measured_at: float | None = None

    @property
    def usable(self) -> bool:
        """Whether routing may send a session over it: Degraded links still produce key."""
        return self.state is not LinkState.DOWN

    @property
    def available_bps(self) -> float:
        """The key rate routing can hand out: measured when known, else the spec's promise."""
        if self.key_rate_bps is not None:
            return self.key_rate_bps
        return self.nominal_rate_bps or 0.0

    @property
    def current_qber(self) -> float | None:
        return self.qber if self.qber is not None else self.nominal_qber

    def far_end(self, node: str) -> str:
        a, b = self.ends
        return b if node == a else a


@dataclass(frozen=True, slots=True)
class LinkChange:
    link: LinkRecord
    before: LinkState
    after: LinkState


@dataclass
class Topology:
    events: EventLog
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    links: dict[str, LinkRecord] = field(default_factory=dict)
    _links_at: dict[str, set[str]] = field(default_factory=dict)
    _link_of_pair: dict[frozenset[str], str] = field(default_factory=dict)
    _node_of_sae: dict[str, str] = field(default_factory=dict)
    down_nodes: set[str] = field(default_factory=set)  # routing skips them on every edge it relaxes

    # --- registration (from resources) ----------------------------------------------

    def apply_node(self, node: QKDNode, now: float) -> NodeRecord:
        """Register a node, or take its new spec; its state (up or down) is kept."""
        sae_ids = frozenset(node.spec.sae_ids)
        for sae in sorted(sae_ids):
            elsewhere = self._node_of_sae.get(sae, node.name)
            if elsewhere != node.name:
                raise ControlError(
                    f"QKDNode {node.name}: SAE {sae!r} is already attached to QKDNode {elsewhere}; "
                    "an SAE is attached to exactly one node"
                )
        record = self.nodes.get(node.name)
        if record is None:
            record = self.nodes[node.name] = NodeRecord(node.name, node.kme_id, sae_ids)
            self._links_at[node.name] = set()
            self.events.record(now, Subject.NODE, node.name, None, record.status, "Registered",
                               f"node {node.name} registered with SAEs {sorted(sae_ids)}")
        else:
            for sae in record.sae_ids - sae_ids:
                del self._node_of_sae[sae]
            record.kme_id = node.kme_id
            record.sae_ids = sae_ids
        self._node_of_sae.update(dict.fromkeys(sae_ids, node.name))
        return record

    def apply_link(self, link: QKDLink, now: float) -> tuple[LinkRecord, bool]:
        """Register a link, or take its new spec; True when it is new."""
        a, b = link.spec.nodes
        for end in (a, b):
            if end not in self.nodes:
                raise UnresolvedReference(
                    f"QKDLink {link.name}: spec.nodes names {end!r}, which is not a registered QKDNode; "
                    f"register the node first (known: {', '.join(sorted(self.nodes)) or 'none'})"
                )
        emulated = link.spec.emulated
        record = self.links.get(link.name)
        if record is not None:
            if set(record.ends) != {a, b}:
                raise ControlError(
                    f"QKDLink {link.name}: spec.nodes is immutable ({list(record.ends)}), got {[a, b]}; "
                    "delete and re-create the link instead"
                )
            record.type = link.spec.type
            record.qber_threshold = link.spec.qber_threshold
            record.nominal_rate_bps = emulated.key_rate_bps if emulated else None
            record.nominal_qber = emulated.qber if emulated else None
            return record, False
        pair = frozenset((a, b))
        if pair in self._link_of_pair:
            raise ControlError(
                f"QKDLink {link.name}: nodes {a} and {b} are already joined by QKDLink "
                f"{self._link_of_pair[pair]}; expected at most one link per node pair"
            )
        record = LinkRecord(
            name=link.name, ends=(a, b), type=link.spec.type, qber_threshold=link.spec.qber_threshold,
            nominal_rate_bps=emulated.key_rate_bps if emulated else None,
            nominal_qber=emulated.qber if emulated else None,
        )
        self.links[link.name] = record
        self._link_of_pair[pair] = link.name
        self._links_at[a].add(link.name)
        self._links_at[b].add(link.name)
        self.events.record(now, Subject.LINK, link.name, None, record.state, "Registered",
                           f"link {link.name} registered between {a} and {b}")
        return record, True

    def remove_link(self, name: str) -> LinkRecord:
        record = self._link(name)
        del self.links[name]
        del self._link_of_pair[frozenset(record.ends)]
        for end in record.ends:
            self._links_at[end].discard(name)
        return record

    def remove_node(self, name: str) -> NodeRecord:
        record = self.node(name)
        if self._links_at[name]:
            raise ControlError(
                f"QKDNode {name} is still joined by QKDLinks {', '.join(sorted(self._links_at[name]))}; "
                "delete those links first"
            )
        del self.nodes[name]
        del self._links_at[name]
        self.down_nodes.discard(name)
        for sae in record.sae_ids:
            del self._node_of_sae[sae]
        return record

    # --- lookups ---------------------------------------------------------------------

    def node(self, name: str) -> NodeRecord:
        try:
            return self.nodes[name]
        except KeyError:
            raise UnresolvedReference(f"no QKDNode named {name!r} is registered") from None

    def _link(self, name: str) -> LinkRecord:
        try:
            return self.links[name]
        except KeyError:
            raise UnresolvedReference(f"no QKDLink named {name!r} is registered") from None

    def links_at(self, node: str) -> list[LinkRecord]:
        return [self.links[name] for name in sorted(self._links_at.get(node, ()))]

    def node_of_sae(self, sae_id: str) -> str | None:
        return self._node_of_sae.get(sae_id)

    # --- changes ---------------------------------------------------------------------

    def set_link_state(self, name: str, state: LinkState, reason: str, message: str, now: float) -> LinkChange | None:
        """Move a link to ``state``; the change when the state differs, else None (reason kept current)."""
        record = self._link(name)
        before = record.state
        record.reason, record.message = reason, message
        if before is state:
            return None
        record.state = state
        self.events.record(now, Subject.LINK, name, before, state, reason, message)
        return LinkChange(record, before, state)

    def set_node_state(self, name: str, up: bool, reason: str, message: str, now: float) -> bool:
        """Mark a node's KM up or down; True when that changed."""
        record = self.node(name)
        if record.up == up:
            return False
        before = record.status
        record.up, record.reason, record.message = up, ("" if up else reason), ("" if up else message)
        if up:
            self.down_nodes.discard(name)
        else:
            self.down_nodes.add(name)
        self.events.record(now, Subject.NODE, name, before, record.status, reason, message)
        return True
