"""The KM's view of one end of a QKD link: its two pools and what it knows of the peer KM.

A KM has one end of a link per KM replica of the peer node; each end pairs with one replica,
with pools of its own.

Keeping the pools consistent with the peer hinges on *incarnations*: each end of a link
presents a random ID, drawn when the KM process starts (and a new one when a topology
change recreates the link end). An end with a new incarnation has lost its pools, so the
first time this side sees a new incarnation it drops everything it shared with the old one.
"""

from __future__ import annotations

import logging

from vqkd.km.config import LinkEndConfig
from vqkd.km.domain.devices import LinkDevices
from vqkd.km.domain.keypool import IncomingPool, OutgoingPool
from vqkd.km.domain.keyqueue import KeyQueue
from vqkd.km.domain.peer import Peer

log = logging.getLogger(__name__)


class Link:
    def __init__(self, config: LinkEndConfig, incarnation: str):
        self.config = config
        self.name = config.name
        self.peer_node = config.peer_node
        self.peer_replica = config.peer_replica
        self.end = config.end
        self.incarnation = incarnation  # what this end presents to the peer KM
        self.outgoing = OutgoingPool()
        self.incoming = IncomingPool()
        # Requests waiting for outgoing key: by priority, then first come first served.
        self.queue = KeyQueue()
        self.peer_incarnation: str | None = None
        self.peer: Peer | None = None  # plugged in by the process once its transport is up
        self.flushed_bits = 0  # dropped because the peer's end was new
        self.peer_restarts = 0
        # When a call to the peer KM last failed to reach it (its transport's clock), None once
        # one got through: a replica that went away is passed over for a while.
        self.peer_unreachable_at: float | None = None
        self.drawn_bits = 0
        self.relayed_bits = 0
        self.devices = LinkDevices()
        self.module_drawn_bits = 0  # taken from this KM's module end as master, agreed or not
        self.burned_bits: dict[str, int] = {}  # taken as master, then given up: by reason

    @property
    def lacking_bits(self) -> int:
        """Key the outgoing pool lacks to reach its target, counting the keys drawn for it that
        wait for the peer."""
        return self.config.pool_target_bits - self.outgoing.available_bits - self.devices.awaiting_peer_bits

    @property
    def pool_full(self) -> bool:
        """Whether the outgoing pool is as full as drawing makes it: it lacks less than one key."""
        return self.lacking_bits < (self.devices.block_bits or 1)

    def observe_peer(self, incarnation: str) -> bool:
        """Record the peer's incarnation; on a change, drop all shared material. True if dropped."""
        if incarnation == self.peer_incarnation:
            return False
        if self.peer_incarnation is not None:
            self.peer_restarts += 1
            log.warning("link %s: the KM of %s (replica %d) restarted or recreated its end of the link; dropping "
                        "key material shared with its previous incarnation", self.name, self.peer_node,
                        self.peer_replica)
        self.flush()
        self.peer_incarnation = incarnation
        return True

    def flush(self) -> None:
        self.flushed_bits += self.wipe()

    def wipe(self) -> int:
        """Empty both pools; returns the bits dropped."""
        return self.outgoing.clear() + self.incoming.clear()

    def forget_peer(self) -> None:
        """The peer no longer knows us as we knew it: start over with a new handshake."""
        self.flush()
        self.peer_incarnation = None
