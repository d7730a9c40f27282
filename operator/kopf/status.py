"""The one writer of the status of every vqkd resource and of the Events about them.

Status changes come from the controllers, from the control core (sessions rerouted, held,
closed by a KM, expired) and from monitoring. If each wrote its own patch, an older view
could land after a newer one. Instead every source only marks a resource dirty; one task
renders its status from the current state at write time and patches what changed, so the
last write is always the newest view. Events are posted by the same task, after the status.

A status is rendered in parts, one per concern (``in_parts``): each controller writes the
fields and conditions it owns, in a fixed order, and a later part reads what an earlier
one wrote (a node is Ready only when its workload is Configured), so the controllers
coordinate through the status itself rather than through each other's state.

Events are posted through the API rather than with ``kopf.event()``: kopf can post only
from within its own per-object handler context, and most transitions happen elsewhere
(the ControlPlane gRPC service, the monitoring loop).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel

from vqkd.operator.kopf.kube import EVENTS, VQKD, Kube, KubeError
from vqkd.operator.resources.models import API_VERSION

log = logging.getLogger(__name__)

COMPONENT = "vqkd-operator"
RETRY_S = 1.0
MAX_MESSAGE = 1024

Key = tuple[str, str]  # (kind, name)
# (name, the status as last written, the resource's generation) -> the status now, or None
# when there is nothing to show yet
Render = Callable[[str, dict[str, Any], int | None], dict[str, Any] | None]
# One concern's part of a status: writes its fields and conditions into the status model as
# the parts before it left it; True when the status is complete and later parts add nothing.
StatusPart = Callable[[str, Any, int | None], bool]


@dataclass(frozen=True)
class ObjectRef:
    """What the operator remembers of a resource it saw: enough to address it and its Events."""

    namespace: str
    uid: str
    generation: int | None


@dataclass(frozen=True)
class _Event:
    kind: str
    name: str
    type: str
    reason: str
    message: str
    at: datetime


def dump(status: BaseModel) -> dict[str, Any]:
    """A status model in its wire form."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def in_parts(model: type[BaseModel], *parts: StatusPart) -> Render:
    """A status rendered by several concerns in turn, each owning its fields and conditions."""
    def render(name: str, previous: dict[str, Any], generation: int | None) -> dict[str, Any]:
        status = model.model_validate(previous)
        for part in parts:
            if part(name, status, generation):
                break
        status.observed_generation = generation
        return dump(status)
    return render


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) turning ``old`` into ``new``; {} when they are equal."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value) if isinstance(value, dict) and isinstance(old[key], dict) \
                else copy.deepcopy(value)
    return patch


class StatusWriter:
    def __init__(self, kube: Kube, on_error: Callable[[str], None] = lambda kind: None):
        self.kube = kube
        self.on_error = on_error
        self._renderers: dict[str, Render] = {}
        self._refs: dict[Key, ObjectRef] = {}
        self._known: dict[Key, dict[str, Any]] = {}
        self._dirty: dict[Key, None] = {}  # insertion-ordered set
        self._events: deque[_Event] = deque(maxlen=1000)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._instance = socket.gethostname()

    def show(self, kind: str, render: Render) -> None:
        """Render the status of every resource of ``kind`` with ``render``."""
        self._renderers[kind] = render

    def remember(self, kind: str, body: Any) -> None:
        """A controller saw this object: keep its address and, unless the writer wrote it
        since, what its status on the server says."""
        meta = body["metadata"]
        key = (kind, meta["name"])
        self._refs[key] = ObjectRef(meta.get("namespace") or self.kube.namespace, meta.get("uid", ""),
                                    meta.get("generation"))
        self._known.setdefault(key, copy.deepcopy(dict(body.get("status") or {})))

    def ref(self, kind: str, name: str) -> ObjectRef | None:
        """The address of a resource seen and not deleted since; None otherwise."""
        return self._refs.get((kind, name))

    def generation(self, kind: str, name: str) -> int | None:
        ref = self._refs.get((kind, name))
        return ref.generation if ref else None

    def forget(self, kind: str, name: str) -> None:
        """The resource is gone: nothing more is written to it."""
        key = (kind, name)
        self._refs.pop(key, None)
        self._known.pop(key, None)
        self._dirty.pop(key, None)

    def mark(self, kind: str, name: str) -> None:
        self._dirty[(kind, name)] = None
        self._idle.clear()
        self._wake.set()

    def event(self, kind: str, name: str, type: str, reason: str, message: str) -> None:
        self._events.append(_Event(kind, name, type, reason, message, datetime.now(timezone.utc)))
        self._idle.clear()
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything marked so far is written."""
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty or self._events:
                dirty = list(self._dirty)
                self._dirty.clear()
                for key in dirty:
                    await self._write(key)
                events = list(self._events)
                self._events.clear()
                for event in events:
                    await self._post(event)
            if not self._dirty and not self._events:
                self._idle.set()

    def _retry(self, key: Key) -> None:
        asyncio.get_running_loop().call_later(RETRY_S, self.mark, *key)

    async def _write(self, key: Key) -> None:
        kind, name = key
        ref = self._refs.get(key)
        if ref is None:
            return  # not seen (yet) or deleted: nothing to write to
        previous = self._known.get(key, {})
        try:
            status = self._renderers[kind](name, copy.deepcopy(previous), ref.generation)
        except Exception:
            log.exception("rendering the status of %s %s failed", kind, name)
            self.on_error(kind)
            return
        if status is None:
            return
        patch = merge_patch(previous, status)
        if not patch:
            return
        try:
            await asyncio.to_thread(self.kube.patch, VQKD[kind], name, {"status": patch}, "status")
        except KubeError as e:
            if e.not_found:
                self.forget(kind, name)
                return
            log.warning("status of %s %s not written, retrying: %s", kind, name, e)
            self.on_error(kind)
            self._retry(key)
            return
        except OSError as e:
            log.warning("status of %s %s not written (API server unreachable), retrying: %s", kind, name, e)
            self.on_error(kind)
            self._retry(key)
            return
        self._known[key] = status

    async def _post(self, event: _Event) -> None:
        ref = self._refs.get((event.kind, event.name))
        if ref is None:
            return
        stamp = event.at.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{event.name}.", "namespace": ref.namespace},
            "involvedObject": {"apiVersion": API_VERSION, "kind": event.kind, "name": event.name,
                               "namespace": ref.namespace, "uid": ref.uid},
            "type": event.type, "reason": event.reason, "message": event.message[:MAX_MESSAGE],
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": self._instance, "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            await asyncio.to_thread(self.kube.create, EVENTS, body)
        except (KubeError, OSError) as e:
            # An Event is a courtesy to people; the status already says the same.
            log.warning("event %s on %s %s not posted: %s", event.reason, event.kind, event.name, e)
            self.on_error(event.kind)
