"""What one operator process holds while it runs: the control core and its adapters.

Everything here is rebuilt from the resources when the operator starts: the control core
(loaded from every QKDNode, QKDLink, UserProfile and KeySession), the cache of the latest
valid spec of each resource (``resources``), which application sessions have a KeySession,
and what was last seen of each KM. Nothing is the only copy of a fact.

kopf hands the runtime to every handler through ``memo.runtime``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqkd.km.pki import DevCA
from vqkd.km.tls import TLSFiles
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.events import Event, Subject
from vqkd.operator.control.monitoring import MonitoringSettings
from vqkd.operator.control.network_session import NetworkSession
from vqkd.operator.adapters.kms import GrpcKMs
from vqkd.operator.kopf.endpoints import EndpointResolver
from vqkd.operator.kopf.kube import Kube
from vqkd.operator.kopf.metrics import OperatorMetrics
from vqkd.operator.kopf.manifests import CONTROL_PLANE_PORT, DEFAULT_MODULE_IMAGE, control_plane_address
from vqkd.operator.kopf.status import Key, ObjectRef, StatusWriter
from vqkd.operator.resources.network import Network
from vqkd.operator.resources.models import TokenSecretRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorOptions:
    """How to run the operator; ``vqkd operator`` fills it from its flags, tests directly."""

    namespace: str = "default"
    kubeconfig: str | None = None  # None: the pod's service account
    control_plane_listen: str = f"0.0.0.0:{CONTROL_PLANE_PORT}"
    control_plane_address: str | None = None  # what KMs dial; None: the operator's Service in the namespace
    metrics_listen: str | None = "0.0.0.0:9090"
    liveness_endpoint: str | None = "http://0.0.0.0:8080/healthz"
    endpoints_file: str | None = None  # a local runtime's endpoints.json instead of Service DNS names
    endpoints: EndpointResolver | None = None  # given by tests; wins over endpoints_file
    state_dir: Path = Path("/tmp/vqkd-operator")  # the CA's working copy and the certificates issued from it
    module_image: str = DEFAULT_MODULE_IMAGE
    poll_interval_s: float = 5.0  # KM and module statistics
    counts_interval_s: float = 30.0  # how often keys delivered are written to KeySession and UserProfile status
    replace_after_s: float = 15.0  # a KM unreachable this long gets its pod replaced
    workload_check_s: float = 10.0  # how often each node's workload is compared with the wish
    retry_delay_s: float = 10.0  # before retrying a resource that waits for another one
    watch_timeout_s: float = 300.0
    admission: AdmissionSettings = AdmissionSettings()
    monitoring: MonitoringSettings = MonitoringSettings()

    @property
    def km_control_plane(self) -> str:
        return self.control_plane_address or control_plane_address(self.namespace)

    @classmethod
    def from_env(cls) -> OperatorOptions:
        """For ``kopf run -m vqkd.operator.kopf.main``: the same settings from VQKD_* variables."""
        env = os.environ
        return cls(
            namespace=env.get("VQKD_NAMESPACE", "default"),
            kubeconfig=env.get("VQKD_KUBECONFIG") or env.get("KUBECONFIG") or None,
            control_plane_address=env.get("VQKD_CONTROL_PLANE_ADDRESS") or None,
            endpoints_file=env.get("VQKD_ENDPOINTS") or None,
            state_dir=Path(env.get("VQKD_STATE_DIR", "/tmp/vqkd-operator")),
            module_image=env.get("VQKD_MODULE_IMAGE", DEFAULT_MODULE_IMAGE),
        )


@dataclass(frozen=True)
class Problem:
    """Why a resource is not (fully) in effect; ``permanent`` when only a change of it helps."""

    reason: str
    message: str
    permanent: bool


@dataclass
class NodeHealth:
    """What the last polls said about a node's KM."""

    ok: bool | None = None  # None: not polled yet
    failing_since: float | None = None
    error: str = ""
    restarted_at: float | None = None  # when the operator last replaced its pod
    replacements: int = 0  # pods replaced since it last answered


# Core transitions worth a Warning Event rather than a Normal one.
_WARNING_STATES = {"Down", "DOWN", "Held", "Degraded"}


class Runtime:
    def __init__(self, options: OperatorOptions, kube: Kube, endpoints: EndpointResolver, ca: DevCA,
                 controller_tls: TLSFiles):
        self.options = options
        self.namespace = options.namespace
        self.kube = kube
        self.endpoints = endpoints
        self.ca = ca
        self.controller_tls = controller_tls
        self.kms = GrpcKMs(endpoints.km_grpc, controller_tls,
                           on_push=lambda call, seconds: self.metrics.control.push_seconds(call).observe(seconds))
        self.core = ControlCore(self.kms, namespace=self.namespace, token_lookup=self._token,
                                admission=options.admission, monitoring=options.monitoring)
        self.metrics = OperatorMetrics(self.core)
        self.resources = Network(namespace=self.namespace)  # latest valid spec of each resource, by kind and name
        self.refs: dict[Key, ObjectRef] = {}
        self.problems: dict[Key, Problem] = {}
        self.configured: set[Key] = set()  # resources whose children (workloads, KM configurations) are applied
        self.health: dict[str, NodeHealth] = defaultdict(NodeHealth)
        self.replacing: dict[str, float] = {}  # node -> when its KM was found unreachable or missing
        self.app_sessions: dict[str, str] = {}  # session ID -> KeySession of a session an application opened
        self.app_recorded: dict[str, str] = {}  # session ID -> its record's vqkd.io/registered, as written
        self.app_recording: dict[str, bool] = {}  # session ID -> whether its recorder must look again
        self.counts_shown_at = 0.0  # monotonic time the delivered-key counts were last marked for writing
        self.tokens: dict[tuple[str, str, str], str] = {}  # (namespace, Secret, key) -> bearer token
        self.workload_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.status = StatusWriter(kube, self.refs.get, on_error=lambda kind: self.metrics.errors(kind).inc())
        # Set by the sessions concern: records (and keeps up to date) a session an application
        # opened as a KeySession.
        self.on_application_session: Callable[[NetworkSession], None] = lambda session: None
        self._tasks: set[asyncio.Task] = set()
        self.core.events.subscribe(self._on_core_event)

    # --- what was seen of resources --------------------------------------------------

    def remember(self, kind: str, body: Any) -> None:
        """A handler saw this object: keep its address and what its status says now."""
        meta = body["metadata"]
        key = (kind, meta["name"])
        self.refs[key] = ObjectRef(meta.get("namespace") or self.namespace, meta.get("uid", ""),
                                   meta.get("generation"))
        self.status.seed(key, body.get("status"))

    def forget(self, kind: str, name: str) -> None:
        key = (kind, name)
        self.refs.pop(key, None)
        self.problems.pop(key, None)
        self.configured.discard(key)
        self.status.forget(key)
        self.resources.of_kind(kind).pop(name, None)

    def generation(self, kind: str, name: str) -> int | None:
        ref = self.refs.get((kind, name))
        return ref.generation if ref else None

    def problem(self, kind: str, name: str, reason: str, message: str, *, permanent: bool) -> None:
        self.problems[(kind, name)] = Problem(reason, message, permanent)
        self.mark(kind, name)

    def solved(self, kind: str, name: str) -> None:
        self.problems.pop((kind, name), None)
        self.mark(kind, name)

    def mark(self, kind: str, name: str) -> None:
        self.status.mark(kind, name)

    # --- sessions and their resources -------------------------------------------------

    def session_resource(self, session_id: str) -> str | None:
        """The KeySession showing a session, if there is one."""
        session = self.core.session(session_id)
        if session is not None and session.declared_as is not None:
            return session.declared_as
        return self.app_sessions.get(session_id)

    def session_of(self, name: str) -> NetworkSession | None:
        """The session a KeySession shows."""
        session = self.core.declared_session(name)
        if session is not None:
            return session
        for session_id, resource in self.app_sessions.items():
            if resource == name:
                return self.core.session(session_id)
        return None

    def _on_core_event(self, event: Event) -> None:
        kind, name = str(event.subject), event.name
        if event.subject is Subject.SESSION:
            session = self.core.session(event.name)
            name = self.session_resource(event.name)
            if session is not None:
                self.mark("UserProfile", session.user)
                for link in session.route.links if session.route else ():
                    self.mark("QKDLink", link)
            if session is not None and session.live and session.grant is not None \
                    and (session.declared_as is None or session.id in self.app_sessions):
                self.on_application_session(session)
            if name is None:
                return
        warning = event.to_state in _WARNING_STATES or (
            event.subject is Subject.SESSION and event.to_state == "Terminated" and event.from_state in (None, "Accepted"))
        before = event.from_state or "new"
        self.status.event(kind, name, "Warning" if warning else "Normal", event.reason,
                          f"{before} -> {event.to_state}: {event.message}")
        self.mark(kind, name)

    def _token(self, namespace: str, ref: TokenSecretRef) -> str | None:
        return self.tokens.get((namespace, ref.name, ref.key))

    # --- background work --------------------------------------------------------------

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Run ``coroutine`` in the background; a failure is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())
            self.metrics.errors("Operator").inc()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.kms.close()
        await asyncio.to_thread(self.kube.close)
