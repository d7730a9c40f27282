"""What the control plane sends to the KMs on a session's path, and the interface it goes through.

Each KM on a path gets its own ``KMSessionConfig``: the session's terms plus the KM's role
and its previous and next hop — never the whole path (paper §3.2, Fig. 3a). The fields
mirror ``vqkd.km.v1.SessionConfig`` one to one, so the gRPC adapter only copies them.

``KMPusher`` is the way out to the KMs; the runtimes implement it over gRPC. A push that
raises is a missing confirmation, whatever the transport's reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from vqkd.km.domain.vocabulary import Endpoint, Role


@dataclass(frozen=True, slots=True)
class KMSessionConfig:
    session_id: str
    version: int
    role: Role
    user: str
    source: Endpoint
    destination: Endpoint
    prev_hop: str  # "" at the source
    next_hop: str  # "" at the destination
    priority: int
    rate_bps: float
    bucket_bits: int
    inactivity_timeout_ms: int
    request_timeout_ms: int
    key_chunk_size: int
    ttl_s: int
    fallback: str


@dataclass(frozen=True, slots=True)
class SessionTerms:
    """The part of a session's configuration that is the same at every KM of its path."""

    session_id: str
    user: str
    source: Endpoint
    destination: Endpoint
    priority: int
    rate_bps: float
    bucket_bits: int
    inactivity_timeout_ms: int
    request_timeout_ms: int
    key_chunk_size: int
    ttl_s: int
    fallback: str

    def for_path(self, nodes: tuple[str, ...], version: int) -> dict[str, KMSessionConfig]:
        """One configuration per KM on ``nodes`` (source first), keyed by node."""
        if len(nodes) < 2 or nodes[0] != self.source.node or nodes[-1] != self.destination.node:
            raise ValueError(
                f"session {self.session_id}: a path must run from {self.source.node} to "
                f"{self.destination.node} over at least one link, got {list(nodes)}"
            )
        last = len(nodes) - 1
        configs = {}
        for index, node in enumerate(nodes):
            role = Role.SOURCE if index == 0 else Role.DESTINATION if index == last else Role.INTERMEDIATE
            configs[node] = KMSessionConfig(
                session_id=self.session_id, version=version, role=role, user=self.user,
                source=self.source, destination=self.destination,
                prev_hop=nodes[index - 1] if index > 0 else "",
                next_hop=nodes[index + 1] if index < last else "",
                priority=self.priority, rate_bps=self.rate_bps, bucket_bits=self.bucket_bits,
                inactivity_timeout_ms=self.inactivity_timeout_ms, request_timeout_ms=self.request_timeout_ms,
                key_chunk_size=self.key_chunk_size, ttl_s=self.ttl_s, fallback=self.fallback,
            )
        return configs


def next_version(previous: int, now: float) -> int:
    """A version newer than ``previous`` and than any an earlier control-plane process pushed.

    KMs ignore a configuration not newer than the one they hold. Versions drawn from the
    clock (milliseconds) stay ahead of those a restarted control plane pushed before it
    forgot its counters; the +1 covers pushes less than a millisecond apart.
    """
    return max(previous + 1, int(now * 1000))


class KMPusher(Protocol):
    async def configure(self, node: str, config: KMSessionConfig) -> None:
        """Install or replace the session's entry at the KM of ``node``; returns once confirmed."""

    async def delete(self, node: str, session_id: str, reason: str) -> None:
        """Remove the session from the KM of ``node``; returns once its state and reservations are gone.

        Deleting a session the KM does not hold succeeds: every push is idempotent.
        """


@dataclass
class Confirmations:
    """Which KMs confirmed a push and why the others did not."""

    confirmed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.failed

    def describe_failures(self) -> str:
        return "; ".join(f"{node}: {error}" for node, error in sorted(self.failed.items()))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def configure_all(pusher: KMPusher, configs: Mapping[str, KMSessionConfig]) -> Confirmations:
    """Push every KM its configuration at once and collect the confirmations."""
    nodes = list(configs)
    results = await asyncio.gather(
        *(pusher.configure(node, configs[node]) for node in nodes), return_exceptions=True,
    )
    return _collect(nodes, results)


async def delete_all(pusher: KMPusher, nodes: Iterable[str], session_id: str, reason: str) -> Confirmations:
    """Send every KM in ``nodes`` the deletion signal at once and collect the confirmations."""
    ordered = sorted(nodes)
    results = await asyncio.gather(
        *(pusher.delete(node, session_id, reason) for node in ordered), return_exceptions=True,
    )
    return _collect(ordered, results)


def _collect(nodes: list[str], results: list[object]) -> Confirmations:
    outcome = Confirmations()
    for node, result in zip(nodes, results):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result  # cancellation and interpreter exits are not push failures
            outcome.failed[node] = _describe(result)
        else:
            outcome.confirmed.append(node)
    return outcome
