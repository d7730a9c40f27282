"""What a KM asks of the control plane (paper Fig. 2a), as the KM's domain sees it.

When an application opens a session the KM asks admission control for a configuration;
key requests are signalled so the control plane's session timer stays alive; closes and
timer expiry are reported. The configuration itself arrives separately, pushed over
KeyManagerControl once the peer registered and a path was reserved. The gRPC client in
``vqkd.km.rpc.control_plane_client`` is one implementation of ``ControlPlaneClient``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vqkd.km.domain.vocabulary import Endpoint, QoS


@dataclass(frozen=True, slots=True)
class OpenRequest:
    node: str
    caller_sae_id: str
    source: Endpoint
    destination: Endpoint
    qos: QoS
    session_id: str = ""
    implicit: bool = False


@dataclass(frozen=True, slots=True)
class OpenResult:
    accepted: bool
    session_id: str
    reason: str
    qos: QoS
    peer_registered: bool
    etsi004_status: int = 0
    unauthorized: bool = False


class ControlPlaneClient(Protocol):
    async def open_session(self, request: OpenRequest) -> OpenResult: ...
    async def key_requested(self, session_id: str) -> None: ...
    async def session_closed(self, session_id: str, reason: str) -> None: ...
