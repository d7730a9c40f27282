"""The control plane of the local runtime: the control-plane host, supervision and status views.

It runs in the ``vqkd up`` process, beside the KM and module processes it supervises:

- the control-plane host (``vqkd.operator.host``): the control core, the ControlPlane and
  health gRPC services the KMs call, timers, and monitoring every second from the KMs'
  stats and the modules' metrics;
- every KM's topology, pushed by the host from the network's resources and addressing: the
  KMs start with their identity only, and the network is published (``endpoints.json``)
  once each holds its topology;
- supervision, as a kubelet would: a process that exits is started again; for a KM replica
  the host is told, and asks the new instance at once, so it gets its topology and every
  session its node takes part in pushed again (the node's other replicas serve meanwhile);
- a status API on loopback (plain HTTP): ``/sessions``, ``/links``, ``/nodes``,
  ``/alarms``, ``/events``, ``/metrics`` and the ETSI GS QKD 015 view at
  ``/restconf/data/etsi-qkd-sdn-node:qkd_node?node=NAME``; and the changes of
  ``vqkd apply`` and ``vqkd delete`` (``POST /apply``, ``POST /delete``: see ``changes``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vqkd.km import identity
from vqkd.operator.adapters.kms import GrpcKMs
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.control.monitoring import MonitoringSettings
from vqkd.operator.host import TICK_S, Cadence, ControlPlaneHost
from vqkd.operator.local.changes import LiveChanges
from vqkd.operator.local.processes import HOST, READY_TIMEOUT_S, LocalNetwork
from vqkd.operator.topologies import instance_name

log = logging.getLogger(__name__)

POLL_S = 1.0
SUPERVISE_S = 0.25


class LocalControlPlane:
    def __init__(self, network: LocalNetwork, *, admission: AdmissionSettings | None = None,
                 monitoring: MonitoringSettings | None = None, supervise: bool = True):
        self.network = network
        network.plan()
        controller = network._tls(identity.controller()).files()
        self.host = ControlPlaneHost(
            GrpcKMs(lambda node, replica: network.addressing.km(node, replica).grpc, controller), controller,
            network.control_plane,
            module_metrics=lambda link: network.endpoints.get("links", {}).get(link, {}).get("metrics_url"),
            cadence=Cadence(poll_interval_s=POLL_S),
            admission=admission or AdmissionSettings(),
            monitoring=monitoring or MonitoringSettings(no_key_window_s=5.0),
        )
        self.host.track(network.manifest, network.addressing)
        self.core = self.host.core
        self.supervise = supervise
        self.paused: set[str] = set()  # nodes whose KMs are deliberately left down (node loss drills)
        self.changing: set[str] = set()  # processes a change is starting or stopping
        self.changes = LiveChanges(network, self.host, self.changing)
        self._runner: web.AppRunner | None = None
        self._supervisor: asyncio.Task | None = None

    async def start(self) -> None:
        """Serve, start the processes, push every KM its topology, declare the resources,
        publish the endpoints, then keep everything current."""
        await self.host.serve()
        await self._serve_status()
        await asyncio.to_thread(self.network.launch)
        try:
            await self._push_topologies()
            await self.core.load(self.network.manifest)
        except BaseException:
            await asyncio.to_thread(self.network.stop)
            raise
        await asyncio.to_thread(self.network.publish)
        self.host.start()
        if self.supervise:
            self._supervisor = asyncio.create_task(self._supervise_forever(), name="supervisor")

    async def _push_topologies(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Every KM holds its topology, or the network does not come up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self.host.topologies.refresh()
            missing = self.host.topologies.unconfirmed()
            if not missing:
                return
            if loop.time() > deadline:
                raise RuntimeError(f"KMs without their topology after {timeout:.0f} s: "
                                   + "; ".join(f"{instance_name(*km)}: {why}" for km, why in missing.items()))
            await asyncio.sleep(TICK_S)

    async def _supervise_forever(self) -> None:
        while True:
            try:
                await self._supervise()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not stop supervision
                log.exception("supervising the processes failed; continuing")
            await asyncio.sleep(SUPERVISE_S)

    async def _supervise(self) -> None:
        for name, proc in list(self.network.processes.items()):
            if proc.popen is None or proc.popen.poll() is None or name in self.changing \
                    or (proc.km is not None and proc.km[0] in self.paused):
                continue
            log.warning("%s exited with code %s; starting it again", name, proc.popen.returncode)
            if proc.km is not None:
                self.host.km_lost(*proc.km)
            await asyncio.to_thread(self.network.restart, name)
            if proc.km is not None:
                await self.host.check(*proc.km)

    async def _serve_status(self) -> None:
        app = web.Application()
        def json_view(view):
            async def handler(request: web.Request) -> web.Response:
                return _json(view())
            return handler

        app.router.add_get("/sessions", json_view(self.core.sessions))
        app.router.add_get("/links", json_view(self.core.links))
        app.router.add_get("/nodes", json_view(self.host.nodes))
        app.router.add_get("/users", json_view(self.core.users))
        app.router.add_get("/alarms", json_view(lambda: [asdict(a) for a in self.core.alarms()]))
        app.router.add_get("/events", json_view(lambda: [e.to_dict() for e in self.core.events]))
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/restconf/data/etsi-qkd-sdn-node:qkd_node", self._etsi015)
        self.changes.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = self.network.status_port
        await web.TCPSite(runner, HOST, port).start()
        self._runner = runner

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.host.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _etsi015(self, request: web.Request) -> web.Response:
        views = self.core.etsi015()
        node = request.query.get("node")
        if node is None:
            return _json(views)
        if node not in views:
            return _json({"message": f"no node {node!r}; nodes: {sorted(views)}"}, status=404)
        return _json(views[node])

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await self.host.stop()
        await asyncio.to_thread(self.network.stop)
        if self._runner is not None:
            await self._runner.cleanup()


def _json(body, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, default=str))
