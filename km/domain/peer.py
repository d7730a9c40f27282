"""The peer KM at the far end of a link, as the KM's domain sees it.

``Link.peer`` is a ``Peer``: the domain hands it what goes to the other KM of the link and
never learns how it travels. A KM process plugs in the gRPC client of
``vqkd.km.rpc.peers``; the in-process relay tests plug in a stand-in that calls the
neighbour's domain directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vqkd.km.domain.keypool import Span
from vqkd.km.domain.relay_crypto import RelayFields


@dataclass(frozen=True, slots=True)
class HybridMessage:
    """One hop of the hybrid fallback exchange (km.proto HybridRequest)."""

    link: str
    session_id: str
    relay_id: str
    index: int
    master_sae_id: str
    slave_sae_ids: tuple[str, ...]
    key_ids: tuple[str, ...]
    size_bits: int
    stream: bool
    offer: bytes


class Peer(Protocol):
    """What goes to the peer KM. The calls that carry keys raise ``errors.PeerUnavailable``
    when the peer did not take them: then nobody got the keys."""

    async def hello(self) -> None:
        """Learn the peer's incarnation (``Link.observe_peer``)."""

    async def agree_keys(self, key_ids: list[str]) -> str:
        """Tell the peer which module keys this KM drew; returns the peer incarnation they
        are shared with."""

    async def deliver(self, master: str, slaves: list[str], key_ids: list[str], size_bits: int,
                      spans: list[Span]) -> None:
        """Have the peer hold keys cut from shared link material (``spans``) for its slave SAEs."""

    async def relay(self, fields: RelayFields, tag: bytes) -> None:
        """Send one relay hop; returns when the destination holds the keys."""

    async def hybrid(self, message: HybridMessage) -> bytes:
        """Send a hybrid offer towards the destination KM; returns its reply."""

    async def commit(self, link: str, session_id: str, relay_id: str) -> None:
        """Release a relay's keys at the destination; returns once they are released."""
