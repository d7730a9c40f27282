"""The control plane of the local runtime: the control core with its servers and loops.

It runs in the ``vqkd up`` process, beside the KM and module processes it supervises:

- the ControlPlane gRPC service the KMs call (open, key-request signal, close);
- configuration pushes to the KMs over gRPC (the core's KMPusher);
- monitoring: every second the KMs' stats and the modules' metrics become link samples;
- supervision: a KM process that dies is started again and, once it answers, gets every
  session it takes part in pushed again;
- a status API on loopback (plain HTTP): ``/sessions``, ``/links``, ``/nodes``,
  ``/alarms``, ``/events``, ``/metrics`` and the ETSI GS QKD 015 view at
  ``/restconf/data/etsi-qkd-sdn-node:qkd_node?node=NAME``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vqkd.km import identity
from vqkd.km.rpc.credentials import grpc_server_credentials
from vqkd.km.v1 import km_pb2_grpc
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.monitoring import MonitoringSettings
from vqkd.operator.adapters.kms import ControlPlaneService, GrpcKMs
from vqkd.operator.local.processes import HOST, LocalNetwork
from vqkd.operator.adapters.metrics import ControlMetrics
from vqkd.operator.adapters.sampling import LinkMonitor

log = logging.getLogger(__name__)

POLL_S = 1.0
TICK_S = 0.25
SUPERVISE_S = 0.25


class LocalControlPlane:
    def __init__(self, network: LocalNetwork, *, admission: AdmissionSettings | None = None,
                 monitoring: MonitoringSettings | None = None, supervise: bool = True):
        self.network = network
        network.plan()
        controller = network._tls(identity.controller()).files()
        self.tls_files = controller
        self.kms = GrpcKMs(lambda node: network.endpoints["nodes"][node]["grpc"], controller,
                           on_push=lambda call, seconds: self.metrics.push_seconds(call).observe(seconds))
        self.core = ControlCore(
            self.kms,
            admission=admission or AdmissionSettings(),
            monitoring=monitoring or MonitoringSettings(no_key_window_s=5.0),
        )
        self.metrics = ControlMetrics(self.core)
        self.supervise = supervise
        self.paused: set[str] = set()  # KMs deliberately left down (node loss drills)
        self.monitor = LinkMonitor(
            self.core, self.kms, nodes=list(network.manifest.nodes),
            links={name: tuple(link.spec.nodes) for name, link in network.manifest.links.items()},
            module_metrics={name: info["metrics_url"] for name, info in network.endpoints.get("links", {}).items()},
            on_replaced=lambda node: self.metrics.km_replacements(node).inc(),
        )
        self._grpc: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Serve, start the processes, declare the resources, then keep everything current."""
        grpc_address = self.network.control_plane
        server = grpc.aio.server()
        km_pb2_grpc.add_ControlPlaneServicer_to_server(ControlPlaneService(self.core), server)
        server.add_secure_port(grpc_address, grpc_server_credentials(self.tls_files))
        await server.start()
        self._grpc = server
        await self._serve_status()
        await asyncio.to_thread(self.network.start)
        await self.core.load(self.network.manifest)
        self._tasks = [
            asyncio.create_task(self._every(POLL_S, self.monitor.poll), name="monitor"),
            asyncio.create_task(self._every(TICK_S, self.core.tick), name="timers"),
        ]
        if self.supervise:
            self._tasks.append(asyncio.create_task(self._every(SUPERVISE_S, self._supervise), name="supervisor"))

    async def _every(self, period: float, step) -> None:
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not stop monitoring or timers
                log.exception("control plane loop %s failed; continuing", step.__name__)
            await asyncio.sleep(period)

    async def _supervise(self) -> None:
        for name, proc in self.network.processes.items():
            if proc.popen is None or proc.popen.poll() is None or name.removeprefix("km-") in self.paused:
                continue
            log.warning("%s exited with code %s; starting it again", name, proc.popen.returncode)
            started = time.monotonic()
            await asyncio.to_thread(self.network.restart, name)
            if name.startswith("km-"):
                node = name.removeprefix("km-")
                await self.core.node_up(node, "KMReplaced", f"KM of {node} restarted after it exited")
                self.metrics.km_replacements(node).inc()
                log.warning("KM of %s replaced and reconfigured in %.2f s", node, time.monotonic() - started)

    async def _serve_status(self) -> None:
        app = web.Application()
        def json_view(view):
            async def handler(request: web.Request) -> web.Response:
                return _json(view())
            return handler

        app.router.add_get("/sessions", json_view(self.core.sessions))
        app.router.add_get("/links", json_view(self.core.links))
        app.router.add_get("/nodes", json_view(self.core.nodes))
        app.router.add_get("/users", json_view(self.core.users))
        app.router.add_get("/alarms", json_view(lambda: [asdict(a) for a in self.core.alarms()]))
        app.router.add_get("/events", json_view(lambda: [e.to_dict() for e in self.core.events]))
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/restconf/data/etsi-qkd-sdn-node:qkd_node", self._etsi015)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = self.network.status_port
        await web.TCPSite(runner, HOST, port).start()
        self._runner = runner

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _etsi015(self, request: web.Request) -> web.Response:
        views = self.core.etsi015()
        node = request.query.get("node")
        if node is None:
            return _json(views)
        if node not in views:
            return _json({"message": f"no node {node!r}; nodes: {sorted(views)}"}, status=404)
        return _json(views[node])

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.network.stop)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._grpc is not None:
            await self._grpc.stop(0.5)
        await self.kms.close()


def _json(body, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, default=str))
