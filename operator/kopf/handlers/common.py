"""What every concern does the same way: read a resource, refuse it with a reason, write a status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.kopf.manifests import name_problem
from vqkd.operator.resources.models import InvalidResource, Resource, parse

INVALID = "InvalidSpec"


def plain(value: Any) -> Any:
    """kopf's views of an object as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def validated(runtime: Runtime, kind: str, body: Mapping[str, Any], document: dict[str, Any] | None = None) -> Resource:
    """The resource as a model; an invalid one gets a condition saying why and is refused for good
    (until it changes), before anything is created for it."""
    runtime.remember(kind, body)
    name = body["metadata"]["name"]
    try:
        resource = parse(document if document is not None else plain(body))
    except InvalidResource as e:
        refuse(runtime, kind, name, INVALID, str(e))
    problem = name_problem(kind, name) if kind in ("QKDNode", "QKDLink") else None
    if problem is not None:
        refuse(runtime, kind, name, "InvalidName", problem)
    return resource


def refuse(runtime: Runtime, kind: str, name: str, reason: str, message: str) -> None:
    runtime.problem(kind, name, reason, message, permanent=True)
    raise kopf.PermanentError(message)


def wait(runtime: Runtime, kind: str, name: str, reason: str, message: str, delay: float | None = None) -> None:
    runtime.problem(kind, name, reason, message, permanent=False)
    raise kopf.TemporaryError(message, delay=runtime.options.retry_delay_s if delay is None else delay)


def dump(status: Any) -> dict[str, Any]:
    """A status model in its wire form."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)
