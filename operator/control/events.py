"""The record of every state transition in the control plane, for the runtimes to show.

Sessions, links and nodes each move between states; every move is one ``Event`` with the
time, the subject, the old and new state and why. The kopf runtime turns them into
Kubernetes Events on the matching resource, the local runtime prints them. The log keeps
the most recent events only (a long-running control plane must not grow without bound);
listeners see every event as it happens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class Subject(StrEnum):
    """What changed state, named by the resource kind that shows it."""

    SESSION = "KeySession"
    LINK = "QKDLink"
    NODE = "QKDNode"


@dataclass(frozen=True, slots=True)
class Event:
    at: float  # seconds on the control core's clock
    subject: Subject
    name: str  # session ID, link name or node name
    from_state: str | None  # None when the subject was just created
    to_state: str
    reason: str  # CamelCase, usable as a condition or Kubernetes Event reason
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Listener = Callable[[Event], None]


class EventLog:
    def __init__(self, capacity: int = 10_000):
        if capacity <= 0:
            raise ValueError(f"event log capacity must be > 0, got {capacity}")
        self._recent: deque[Event] = deque(maxlen=capacity)
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def record(
        self, at: float, subject: Subject, name: str, from_state: str | None, to_state: str, reason: str, message: str,
    ) -> Event:
        event = Event(at, subject, name, from_state, to_state, reason, message)
        self._recent.append(event)
        for listener in self._listeners:
            listener(event)
        return event

    def __iter__(self) -> Iterator[Event]:
        return iter(self._recent)

    def __len__(self) -> int:
        return len(self._recent)

    def about(self, name: str) -> list[Event]:
        """The retained events of one session, link or node, oldest first."""
        return [event for event in self._recent if event.name == name]
