"""What the control core and monitoring find, shown on the resources.

- ``Transitions``: every transition the core records (a session admitted, rerouted, held,
  closed; a link or node down or back) becomes a Kubernetes Event on its resource — a
  Warning for those an operator should look at — and refreshes the statuses it touches.
- ``Measurements``: after every monitoring round the QKDLink statuses are refreshed with the
  new measurements. Keys delivered change with every key request, so the KeySession and
  UserProfile statuses showing them are refreshed at the slower ``counts_interval_s`` (and
  only written where the figures changed: the status writer skips equal statuses).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vqkd.operator.control.events import Event, Subject
from vqkd.operator.host import HostListener
from vqkd.operator.kopf.handlers.application_sessions import ApplicationSessions
from vqkd.operator.kopf.runtime import Runtime

# Core transitions worth a Warning Event rather than a Normal one.
_WARNING_STATES = {"Down", "DOWN", "Held", "Degraded"}


class Transitions:
    def __init__(self, runtime: Runtime, applications: ApplicationSessions):
        self.runtime = runtime
        self.applications = applications
        runtime.core.events.subscribe(self._on_core_event)

    def _on_core_event(self, event: Event) -> None:
        status = self.runtime.status
        kind, name = str(event.subject), event.name
        if event.subject is Subject.SESSION:
            session = self.runtime.core.session(event.name)
            if session is not None:
                status.mark("UserProfile", session.user)
                for link in session.route.links if session.route else ():
                    status.mark("QKDLink", link)
            name = self.applications.resource_of(event.name)
            if name is None:
                return
        refused = event.subject is Subject.SESSION and event.to_state == "Terminated" \
            and event.from_state in (None, "Accepted")
        warning = event.to_state in _WARNING_STATES or refused
        before = event.from_state or "new"
        status.event(kind, name, "Warning" if warning else "Normal", event.reason,
                     f"{before} -> {event.to_state}: {event.message}")
        status.mark(kind, name)


class Measurements(HostListener):
    def __init__(self, runtime: Runtime, applications: ApplicationSessions,
                 clock: Callable[[], float] = time.monotonic):
        self.runtime = runtime
        self.applications = applications
        self.clock = clock
        self._counts_shown_at: float | None = None

    def polled(self) -> None:
        runtime = self.runtime
        for row in runtime.core.links():
            runtime.status.mark("QKDLink", row["name"])
        now = self.clock()
        if self._counts_shown_at is not None and now - self._counts_shown_at < runtime.options.counts_interval_s:
            return
        self._counts_shown_at = now
        for session in runtime.core.sessions():
            if session["state"] == "Terminated":
                continue
            name = self.applications.resource_of(session["sessionId"])
            if name is not None:
                runtime.status.mark("KeySession", name)
            runtime.status.mark("UserProfile", session["user"])
