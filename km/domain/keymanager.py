"""The key manager of one QKD node: its links, the keys waiting for its SAEs, its identity."""

from __future__ import annotations

import time
import uuid
from typing import Callable

from vqkd.km.config import KMConfig
from vqkd.km.domain.keystore import KeyStore
from vqkd.km.domain.links import Link


class KeyManager:
    def __init__(self, config: KMConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.node = config.node
        self.kme_id = config.kme_id
        self.limits = config.limits
        # Drawn anew by every process: peers use it to notice that this KM lost its pools.
        self.incarnation = uuid.uuid4().hex
        self.links: dict[str, Link] = {c.name: Link(c) for c in config.links}
        self.link_to: dict[str, Link] = {link.peer_node: link for link in self.links.values()}
        self.store = KeyStore(config.delivered_key_ttl_s, config.delivered_store_max_bits, clock)

    def node_of(self, sae_id: str) -> str | None:
        return self.config.saes.get(sae_id)

    def is_local(self, sae_id: str) -> bool:
        return self.config.saes.get(sae_id) == self.node

    def kme_id_of(self, node: str) -> str:
        if node == self.node:
            return self.kme_id
        link = self.link_to.get(node)
        return link.config.peer_kme_id if link else node
