"""The one writer of the status of every vqkd resource and of the Events about them.

Status changes come from handlers, from the control core (sessions rerouted, held, closed
by a KM, expired) and from monitoring. If each wrote its own patch, an older view could
land after a newer one. Instead every source only marks a resource dirty; one task renders
its status from the current state at write time and patches what changed, so the last
write is always the newest view. Events are posted by the same task, after the status.

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

from vqkd.operator.kopf.kube import EVENTS, VQKD, Kube, KubeError
from vqkd.operator.resources.models import API_VERSION

log = logging.getLogger(__name__)

COMPONENT = "vqkd-operator"
RETRY_S = 1.0
MAX_MESSAGE = 1024

Key = tuple[str, str]  # (kind, name)
# (name, the status as last written) -> the status now, or None when there is nothing to show yet
Render = Callable[[str, dict[str, Any]], dict[str, Any] | None]


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
    def __init__(self, kube: Kube, refs: Callable[[Key], ObjectRef | None],
                 on_error: Callable[[str], None] = lambda kind: None):
        self.kube = kube
        self.refs = refs
        self.on_error = on_error
        self.renderers: dict[str, Render] = {}
        self._known: dict[Key, dict[str, Any]] = {}
        self._dirty: dict[Key, None] = {}  # insertion-ordered set
        self._events: deque[_Event] = deque(maxlen=1000)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._instance = socket.gethostname()

    def seed(self, key: Key, status: dict[str, Any] | None) -> None:
        """What the resource's status is on the server, when the writer has not written it yet."""
        self._known.setdefault(key, copy.deepcopy(dict(status or {})))

    def forget(self, key: Key) -> None:
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
        if self.refs(key) is None:
            return  # not seen (yet) or deleted: nothing to write to
        previous = self._known.get(key, {})
        try:
            status = self.renderers[kind](name, copy.deepcopy(previous))
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
                self.forget(key)
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
        ref = self.refs((event.kind, event.name))
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
