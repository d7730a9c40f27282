"""KMs kept in memory: a ``KMPusher`` for tests and for benchmarking the control core alone.

Each KM is just its forwarding table (session ID → configuration), applying the same rule
as a real KM: a configuration not newer than the one held changes nothing. Nodes can be
made unreachable to see how the control plane copes with missing confirmations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vqkd.operator.control.session_config import KMSessionConfig


class KMUnreachable(ConnectionError):
    pass


@dataclass
class InMemoryKMs:
    tables: dict[str, dict[str, KMSessionConfig]] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    # Every push in order: ("configure", node, session ID, version) or ("delete", node, session ID, 0).
    calls: list[tuple[str, str, str, int]] = field(default_factory=list)
    record_calls: bool = True

    async def configure(self, node: str, config: KMSessionConfig) -> None:
        self._reach(node, "configure", config.session_id, config.version)
        table = self.tables.setdefault(node, {})
        held = table.get(config.session_id)
        if held is None or held.version < config.version:
            table[config.session_id] = config

    async def delete(self, node: str, session_id: str, reason: str) -> None:
        self._reach(node, "delete", session_id, 0)
        self.tables.get(node, {}).pop(session_id, None)

    def _reach(self, node: str, operation: str, session_id: str, version: int) -> None:
        if self.record_calls:
            self.calls.append((operation, node, session_id, version))
        if node in self.unreachable:
            raise KMUnreachable(f"KM of node {node} is unreachable")

    def holders(self, session_id: str) -> set[str]:
        """The nodes whose KM holds an entry for the session."""
        return {node for node, table in self.tables.items() if session_id in table}

    def entry(self, node: str, session_id: str) -> KMSessionConfig | None:
        return self.tables.get(node, {}).get(session_id)
