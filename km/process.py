"""Assembles one KM process from its configuration and runs it until told to stop.

``KMProcess`` builds the domain (key manager, sessions, relay, key exchange), plugs in its
transports (a gRPC ``PeerClient`` per link, the module feeds, the control-plane client) and
serves. Listeners: the application API (ETSI 014 and ETSI 004 over HTTPS, mutual TLS),
gRPC (KM <-> KM, KeyManagerControl for the control plane and the standard health service,
mutual TLS), and plain HTTP for /metrics, the /healthz probe and the /events log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vqkd.km import tls
from vqkd.km.config import KMConfig, split_host_port
from vqkd.km.domain.exchange import KeyExchange
from vqkd.km.domain.keymanager import KeyManager
from vqkd.km.domain.relay import RelayService
from vqkd.km.domain.sessions import SessionTable
from vqkd.km.etsi004.routes import ETSI004Routes
from vqkd.km.etsi004.service import ETSI004Service
from vqkd.km.etsi014.client import ETSI014Client
from vqkd.km.etsi014.routes import MAX_BODY_BYTES, ETSI014Routes
from vqkd.km.etsi014.service import ETSI014Service
from vqkd.km.metrics import KMMetrics
from vqkd.km.module_feed import LinkFeed, PeerKeyCollector
from vqkd.km.rpc.control_plane_client import GrpcControlPlane
from vqkd.km.rpc.control_service import KeyManagerControlService
from vqkd.km.rpc.credentials import grpc_channel_credentials, grpc_server_credentials
from vqkd.km.rpc.peers import RPC_TIMEOUT_S, LinkPeerService, PeerClient
from vqkd.km.v1 import km_pb2_grpc

log = logging.getLogger("vqkd.km")

# A restarted peer KM is back within a second; gRPC's default reconnect backoff (up to two
# minutes) would keep the link dark far longer than the peer was.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
]
SESSION_SWEEP_S = 0.25
# A draw is sized so that the slave's module end hands it over within half the KM ⇄ KM
# deadline: the rest is the margin for the network and the peer's own work.
DRAW_TARGET_S = RPC_TIMEOUT_S / 2


class KMProcess:
    def __init__(self, config: KMConfig):
        self.config = config
        self.km = KeyManager(config)
        self.metrics = KMMetrics(self.km)
        self.sessions = SessionTable(config.node)
        self.relays = RelayService(
            self.km, self.sessions,
            on_reject=lambda reason: self.metrics.relay_rejected(self.km.node, reason).inc(),
            on_relayed=self._relayed,
            on_fallback=lambda keys: self.metrics.fallback_keys(self.km.node).inc(keys),
            on_relay_done=lambda direct, seconds: self.metrics.relay_seconds(
                self.km.node, "yes" if direct else "no").observe(seconds),
        )
        self.tls_files = config.tls.files()
        self.control_plane: GrpcControlPlane | None = None
        if config.control_plane:
            channel = grpc.aio.secure_channel(config.control_plane, grpc_channel_credentials(self.tls_files),
                                              options=CHANNEL_OPTIONS)
            self.control_plane = GrpcControlPlane(config.node, channel)
        self.exchange = KeyExchange(self.km, self.sessions, self.relays, self.control_plane)
        self.modules = {
            link.name: ETSI014Client(
                link.config.module_url,
                link.config.module_tls.files() if link.config.module_tls else self.tls_files,
            )
            for link in self.km.links.values()
        }
        self.collectors = {
            link.name: PeerKeyCollector(self.km.node, link, self.modules[link.name], draw_target_s=DRAW_TARGET_S)
            for link in self.km.links.values()
        }
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: list[asyncio.Task] = []
        self._runners: list[web.AppRunner] = []
        self._grpc: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()

    def _drawn(self, link, bits: int) -> None:
        link.drawn_bits += bits
        self.metrics.link_drawn_bits(self.km.node, link.name).inc(bits)

    def _relayed(self, role: str, bits: int) -> None:
        self.metrics.relayed_bits(self.km.node, role).inc(bits)

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(SESSION_SWEEP_S)
            for session in self.sessions.expired():
                self.sessions.terminate(session.session_id, "inactivity timer expired")
                if self.control_plane is not None:
                    await self.control_plane.session_closed(session.session_id, "inactivity timer expired")

    async def start(self) -> None:
        await self._start_grpc()
        self._tasks.append(asyncio.create_task(self._expire_sessions(), name="session-timers"))
        credentials = grpc_channel_credentials(self.tls_files)
        for link in self.km.links.values():
            channel = grpc.aio.secure_channel(link.config.peer_grpc, credentials, options=CHANNEL_OPTIONS)
            self._channels.append(channel)
            link.peer = PeerClient(self.km, link, channel)
            feed = LinkFeed(self.km.node, link, self.modules[link.name], draw_target_s=DRAW_TARGET_S,
                            on_drawn=self._drawn)
            self._tasks.append(asyncio.create_task(feed.run(), name=f"feed-{link.name}"))
        await self._start_http()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("KM %s (KME %s) serving: ETSI 014 https://%s, gRPC %s, metrics http://%s/metrics",
                 self.km.node, self.km.kme_id, self.config.etsi014_listen, self.config.grpc_listen,
                 self.config.metrics_listen)

    async def _start_grpc(self) -> None:
        server = grpc.aio.server()
        km_pb2_grpc.add_LinkPeerServicer_to_server(
            LinkPeerService(self.km, self.exchange, self.collectors, self.relays), server)
        km_pb2_grpc.add_KeyManagerControlServicer_to_server(KeyManagerControlService(self.km, self.sessions), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_secure_port(self.config.grpc_listen, grpc_server_credentials(self.tls_files))
        await server.start()
        self._grpc = server

    async def _start_http(self) -> None:
        api = web.Application(client_max_size=MAX_BODY_BYTES)
        ETSI014Routes(ETSI014Service(self.km, self.exchange), self.metrics).add_to(api)
        ETSI004Routes(ETSI004Service(self.km, self.sessions, self.exchange, self.control_plane),
                      self.metrics).add_to(api)
        host, port = split_host_port(self.config.etsi014_listen)
        await self._serve(api, host, port, tls.server_context(self.tls_files))

        admin = web.Application()
        admin.router.add_get("/metrics", self._metrics)
        admin.router.add_get("/healthz", self._healthz)
        admin.router.add_get("/events", self._events)
        host, port = split_host_port(self.config.metrics_listen)
        await self._serve(admin, host, port, None)

    async def _serve(self, app: web.Application, host: str, port: int, ssl_context) -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=1024).start()
        self._runners.append(runner)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"node": self.km.node, "incarnation": self.km.incarnation, "status": "ok"})

    async def _events(self, request: web.Request) -> web.Response:
        """Session cycle transitions, oldest first (no key material): for people and dashboards."""
        return web.json_response([
            {"at": e.at, "session_id": e.session_id, "event": e.event, "state": e.state.value, "detail": e.detail}
            for e in self.sessions.events
        ])

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for collector in self.collectors.values():
            await collector.close()
        for runner in self._runners:
            await runner.cleanup()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        for channel in self._channels:
            await channel.close()
        for module in self.modules.values():
            await module.close()


async def serve(config: KMConfig) -> None:
    service = KMProcess(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    # What start-up built (modules, configuration, servers) lives as long as the process: move
    # it out of the collector's reach, so full collections only walk what serving allocates.
    gc.collect()
    gc.freeze()
    print(f"KM {config.node} ready", flush=True)
    await stop.wait()
    await service.stop()
