"""Keeps a link's outgoing pool filled from this KM's end of the QKD module.

The loop asks the module how much key it holds, draws up to what the pool lacks as master
SAE (naming the peer KM as slave), and tells the peer the key IDs. The material joins the
outgoing pool only once the peer confirmed it holds the same keys; if the peer failed, the
drawn keys are dropped — they are gone from the module, so they can never be used twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from vqkd.km.domain.links import Link

if TYPE_CHECKING:
    from vqkd.km.etsi014.client import ETSI014Client

log = logging.getLogger(__name__)

IDLE_S = 0.05  # pool full, or nothing new at the module
MAX_BACKOFF_S = 2.0
# Blocks per draw, whatever the module allows: a module's whole max_key_per_request (4096
# blocks of 8192 bits is a 5.9 MB JSON body) is parsed in one go and stalls the event loop of
# both KMs (~40 ms) while SAE requests wait; 512 blocks keep each stall short.
MAX_BLOCKS_PER_DRAW = 512


class LinkFeed:
    def __init__(self, link: Link, module: ETSI014Client, on_drawn: Callable[[Link, int], None] | None = None):
        self.link = link
        self.module = module
        self.on_drawn = on_drawn or (lambda link, bits: None)
        self._backoff = IDLE_S

    def _batch(self, module_bits: int, module_max_per_request: int) -> int:
        """How many blocks to draw now: what the module holds, the pool lacks, one request allows
        (and at most MAX_BLOCKS_PER_DRAW)."""
        cfg = self.link.config
        lacking = cfg.pool_target_bits - self.link.outgoing.available_bits
        return max(0, min(module_bits // cfg.block_bits, lacking // cfg.block_bits, module_max_per_request,
                          MAX_BLOCKS_PER_DRAW))

    async def step(self) -> int:
        """Draw one batch; returns the bits added to the outgoing pool (0 if none was due)."""
        link, cfg = self.link, self.link.config
        status = await self.module.status(cfg.peer_module_sae_id)
        module_bits = status.stored_key_count * status.key_size
        number = self._batch(module_bits, status.max_key_per_request)
        if number == 0:
            return 0
        blocks = await self.module.enc_keys(cfg.peer_module_sae_id, number, cfg.block_bits)
        if link.peer is None:
            return 0
        incarnation = await link.peer.agree_keys([key_id for key_id, _ in blocks])
        if link.peer_incarnation != incarnation:
            return 0  # the peer restarted meanwhile: these keys were shared with no one alive
        link.outgoing.add(blocks)
        link.queue.notify()
        bits = sum(len(b) for _, b in blocks) * 8
        self.on_drawn(link, bits)
        return bits

    async def run(self) -> None:
        while True:
            try:
                if self.link.peer is not None and self.link.peer_incarnation is None:
                    # Announce ourselves first: a peer that knew a previous instance of this
                    # KM drops what it shared with it before it names any of it to us.
                    await self.link.peer.hello()
                added = await self.step()
                self._backoff = IDLE_S
                if not added:
                    await asyncio.sleep(IDLE_S)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # module or peer down: keep trying, slower
                log.info("link %s: cannot draw key now (%s); retrying in %.2fs", self.link.name, e, self._backoff)
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
