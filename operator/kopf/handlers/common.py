"""What every controller does the same way: read a resource, and say why it is not in effect."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import kopf

from vqkd.operator.kopf.manifests import name_problem
from vqkd.operator.kopf.status import StatusWriter
from vqkd.operator.resources.models import InvalidResource, Resource, parse

INVALID = "InvalidSpec"


@dataclass(frozen=True)
class Problem:
    """Why a resource is not (fully) in effect; ``permanent`` when only a change of it helps."""

    reason: str
    message: str
    permanent: bool


class Problems:
    """The problems one controller found with the resources of one kind, by name. Each
    controller keeps its own and shows them in the conditions it owns; a change refreshes
    the resource's status."""

    def __init__(self, kind: str, status: StatusWriter, retry_delay_s: float):
        self.kind = kind
        self.status = status
        self.retry_delay_s = retry_delay_s
        self._problems: dict[str, Problem] = {}

    def get(self, name: str) -> Problem | None:
        return self._problems.get(name)

    def note(self, name: str, reason: str, message: str, *, permanent: bool) -> None:
        self._problems[name] = Problem(reason, message, permanent)
        self.status.mark(self.kind, name)

    def refuse(self, name: str, reason: str, message: str) -> NoReturn:
        """Refused for good, until the resource changes."""
        self.note(name, reason, message, permanent=True)
        raise kopf.PermanentError(message)

    def wait(self, name: str, reason: str, message: str, delay: float | None = None) -> NoReturn:
        """Waits for something else; kopf tries again after ``delay``."""
        self.note(name, reason, message, permanent=False)
        raise kopf.TemporaryError(message, delay=self.retry_delay_s if delay is None else delay)

    def solved(self, name: str) -> None:
        self._problems.pop(name, None)
        self.status.mark(self.kind, name)

    def forget(self, name: str) -> None:
        self._problems.pop(name, None)


def plain(value: Any) -> Any:
    """kopf's views of an object as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def validated(status: StatusWriter, problems: Problems, body: Mapping[str, Any],
              document: dict[str, Any] | None = None) -> Resource:
    """The resource as a model; an invalid one gets a condition saying why and is refused for good
    (until it changes), before anything is created for it."""
    kind = problems.kind
    status.remember(kind, body)
    name = body["metadata"]["name"]
    try:
        resource = parse(document if document is not None else plain(body))
    except InvalidResource as e:
        problems.refuse(name, INVALID, str(e))
    problem = name_problem(kind, name) if kind in ("QKDNode", "QKDLink") else None
    if problem is not None:
        problems.refuse(name, "InvalidName", problem)
    return resource

