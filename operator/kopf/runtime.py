"""What one operator process shares between its controllers: its options and its services.

The services are the Kubernetes client, where the KMs and modules are reached, the CA, the
control-plane host (with the control core), the metrics, the status writer and the tasks
running in the background. None of them keeps a concern's state: each controller
(``handlers/``) keeps its own and they coordinate through the control core and through
resource status. Everything is rebuilt from the resources when the operator starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqkd.km.pki import DevCA
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.monitoring import MonitoringSettings
from vqkd.operator.host import ControlPlaneHost
from vqkd.operator.kopf.endpoints import EndpointResolver
from vqkd.operator.kopf.kube import Kube
from vqkd.operator.kopf.manifests import (
    CONTROL_PLANE_PORT, DEFAULT_MODULE_IMAGE, ClusterAddressing, content_hash, control_plane_address,
)
from vqkd.operator.kopf.metrics import OperatorMetrics
from vqkd.operator.kopf.status import StatusWriter
from vqkd.operator.plan import Addressing
from vqkd.operator.resources.network import Network

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
    addressing: Addressing | None = None  # given by tests whose KMs are local processes (see km_addressing)
    state_dir: Path = Path("/tmp/vqkd-operator")  # the CA's working copy and the certificates issued from it
    module_image: str = DEFAULT_MODULE_IMAGE
    poll_interval_s: float = 5.0  # KM and module statistics
    counts_interval_s: float = 30.0  # how often keys delivered are written to KeySession and UserProfile status
    replace_after_s: float = 15.0  # a KM unreachable this long gets its pod replaced
    workload_check_s: float = 10.0  # how often each node's workload is compared with the wish
    km_roll_wait_s: float = 120.0  # how long a KM whose pod template changed may take to be Ready before the next rolls
    retry_delay_s: float = 10.0  # before retrying a resource that waits for another one
    watch_timeout_s: float = 300.0
    admission: AdmissionSettings = AdmissionSettings()
    monitoring: MonitoringSettings = MonitoringSettings()

    @property
    def km_control_plane(self) -> str:
        return self.control_plane_address or control_plane_address(self.namespace)

    @property
    def km_addressing(self) -> Addressing | None:
        """Where the topologies pushed to the KMs point them (peers, modules, credentials):
        ``addressing`` when given; in a cluster its Service names and the paths where the pods
        mount their Secrets; None for the processes of ``vqkd up`` reached through
        ``endpoints_file``, whose own control plane pushes their topologies."""
        if self.addressing is not None:
            return self.addressing
        if self.endpoints_file:
            return None
        return ClusterAddressing(self.namespace, self.km_control_plane)

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


class Background:
    """Work the controllers start and nobody awaits: a failure is logged and counted, never lost."""

    def __init__(self, on_error: Callable[[], None] = lambda: None):
        self.on_error = on_error
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())
            self.on_error()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass(frozen=True)
class Runtime:
    """The operator's services, handed to each controller.

    ``resources`` is a cache of the latest accepted spec of each resource, by kind and name:
    each resource handler writes the specs of its kind once the control core took them (and
    removes them once the core deleted them), and the host's topology pusher plans every KM's
    topology from them, because a KM's topology names the whole network's SAEs.
    """

    options: OperatorOptions
    kube: Kube
    endpoints: EndpointResolver
    ca: DevCA
    host: ControlPlaneHost
    metrics: OperatorMetrics
    status: StatusWriter
    resources: Network
    background: Background

    @property
    def core(self) -> ControlCore:
        return self.host.core

    @property
    def namespace(self) -> str:
        return self.options.namespace

    @property
    def ca_hash(self) -> str:
        """The CA as the pod templates of the KMs and modules carry it: a new CA changes them."""
        return content_hash(self.ca.cert_path.read_text())
