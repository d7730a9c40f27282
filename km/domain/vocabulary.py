"""The words the key managers and the control plane share, defined once.

A session runs between two ``Endpoint``s (an SAE and the node its KM runs on); each KM on
its path plays one ``Role``; applications ask for it with ETSI GS QKD 004 ``QoS``; a QKD
link is in one ``LinkState``, as each KM sees it and as the control plane judges it. The KM's
gRPC messages (``vqkd.km.v1``) and the control core use these types, so a name means the
same thing on both sides of the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """A KM's part in one session (paper Fig. 3); the names are those of ``vqkd.km.v1.Role``."""

    SOURCE = "SOURCE"
    INTERMEDIATE = "INTERMEDIATE"
    DESTINATION = "DESTINATION"


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One end of a session: an SAE and the node its KM runs on."""

    node: str
    sae_id: str

    def __str__(self) -> str:
        return f"{self.sae_id}@{self.node}"


@dataclass(frozen=True, slots=True)
class QoS:
    """ETSI GS QKD 004 QoS as a KM asks for it; zero means 'let the control plane choose'."""

    key_chunk_size: int = 0
    max_bps: float = 0.0
    min_bps: float = 0.0
    jitter: float = 0.0
    priority: int = 0
    timeout_ms: int = 0
    ttl_s: int = 0
    fallback: str = ""


class LinkState(StrEnum):
    """A QKD link's state: Up, Degraded (serving key, with trouble worth watching) or Down."""

    UP = "Up"
    # Below the rate reserved on it, near the QBER threshold, device errors or burned key.
    DEGRADED = "Degraded"
    DOWN = "Down"
