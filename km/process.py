"""Assembles one KM process from its configuration and runs it until told to stop.

``KMProcess`` builds the domain (key manager, sessions, relay, key exchange, the node's
replicas), plugs in its transports (the control-plane client; per link end — one per KM
replica of the peer node — a module client, a gRPC ``PeerClient`` and the module feed; per
other KM replica of its node a ``SiblingClient``) and serves. Listeners: the application API
(ETSI 014 and ETSI 004 over HTTPS, mutual TLS; with ``etsi014_reuse_port`` shared with the
node's other replicas on the host), gRPC (KM <-> KM, NodeReplicas between the node's KM
replicas, KeyManagerControl for the control plane and the standard health service, mutual
TLS), and plain HTTP for /metrics, the /healthz probe and the /events log.

A topology pushed by the control plane is applied live (``apply_topology``): the link ends
it adds get their transports at once, the ends it removes lose theirs, and every other end
goes on as it was.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vqkd.km import tls
from vqkd.km.config import KMConfig, KMTopology, split_host_port
from vqkd.km.domain.exchange import KeyExchange
from vqkd.km.domain.keymanager import End, KeyManager
from vqkd.km.domain.links import Link
from vqkd.km.domain.relay import RelayService
from vqkd.km.domain.replicas import CHECK_SIBLINGS_S, DEPARTING_S, NodeReplicas
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
from vqkd.km.rpc.replicas import NodeReplicasService, SiblingClient
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


@dataclass(frozen=True)
class LinkTransport:
    """What carries one link end: the client of its module end, the channel to the peer KM,
    the collector of the keys the peer drew and the feed keeping its outgoing pool filled."""

    module: ETSI014Client
    channel: grpc.aio.Channel
    collector: PeerKeyCollector
    feed: asyncio.Task


class KMProcess:
    def __init__(self, config: KMConfig):
        self.config = config
        self.km = KeyManager(config)
        self.metrics = KMMetrics(self.km)
        self.sessions = SessionTable(config.node)
        self.replicas = NodeReplicas(
            self.km, on_held_once=lambda keys: self.metrics.keys_held_once(self.km.node).inc(keys),
            on_promoted=lambda keys: self.metrics.copies_promoted(self.km.node).inc(keys))
        self.relays = RelayService(
            self.km, self.sessions,
            on_reject=lambda reason: self.metrics.relay_rejected(self.km.node, reason).inc(),
            on_relayed=self._relayed,
            on_fallback=lambda keys: self.metrics.fallback_keys(self.km.node).inc(keys),
            on_relay_done=lambda direct, seconds: self.metrics.relay_seconds(
                self.km.node, "yes" if direct else "no").observe(seconds),
            replicas=self.replicas,
        )
        self.tls_files = config.tls.files()
        self._channel_credentials = grpc_channel_credentials(self.tls_files)
        self.control_plane: GrpcControlPlane | None = None
        if config.control_plane:
            channel = grpc.aio.secure_channel(config.control_plane, self._channel_credentials, options=CHANNEL_OPTIONS)
            self.control_plane = GrpcControlPlane(config.node, channel, self.km.replica)
        self.exchange = KeyExchange(self.km, self.sessions, self.relays, self.control_plane)
        self.etsi004 = ETSI004Service(self.km, self.sessions, self.exchange, self.control_plane,
                                      owner_of=self._stream_owner)
        self._siblings: dict[int, tuple[str, grpc.aio.Channel, SiblingClient]] = {}  # by replica ordinal
        self._departing: dict[int, tuple[grpc.aio.Channel, SiblingClient, float]] = {}  # ordinal -> since when
        self.modules: dict[End, ETSI014Client] = {}  # link end -> its module end
        # link end -> what collects, as slave, the keys the peer KM drew from the module as master
        self.collectors: dict[End, PeerKeyCollector] = {}
        self._links: dict[End, LinkTransport] = {}
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
            if self.km.siblings:
                # A session's requests spread over the node's replicas: one that sees none would
                # end a session its siblings serve. The control plane's timer, fed by every
                # replica's key-request signals, ends it instead.
                continue
            for session in self.sessions.expired():
                self.sessions.terminate(session.session_id, "inactivity timer expired")
                if self.control_plane is not None:
                    await self.control_plane.session_closed(session.session_id, "inactivity timer expired")

    async def _check_siblings(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SIBLINGS_S)
            if self._departing:
                for channel in self._connect_siblings():  # closes those departed long enough ago
                    await channel.close()
            if self.replicas.siblings:
                try:
                    await self.replicas.check_siblings()
                except Exception:  # one bad round must not stop the checks
                    log.exception("KM %s: checking the node's other replicas failed; trying again", self.km.node)

    def _stream_owner(self, key_stream_id: str) -> SiblingClient | None:
        owner = self.replicas.stream_owner(key_stream_id)
        return None if owner is None else self.replicas.siblings[owner]

    def _connect_siblings(self) -> list[grpc.aio.Channel]:
        """Clients of the node's other KM replicas as the topology names them; returns the
        channels of those moved, or departed long enough ago, to be closed. One the topology no
        longer names is kept as departing for a while: it may be handing its keys over."""
        wanted = dict(self.km.siblings)
        now = self.replicas.clock()
        for ordinal, (address, channel, client) in self._siblings.items():
            if ordinal not in wanted:
                self._departing[ordinal] = (channel, client, now)
        gone = [channel for ordinal, (address, channel, _) in self._siblings.items()
                if ordinal in wanted and wanted[ordinal] != address]
        gone += [channel for ordinal, (channel, _, since) in self._departing.items()
                 if ordinal in wanted or now - since >= DEPARTING_S]
        self._departing = {ordinal: held for ordinal, held in self._departing.items()
                           if ordinal not in wanted and now - held[2] < DEPARTING_S}
        self.replicas.departing = {ordinal: (client, since) for ordinal, (_, client, since) in self._departing.items()}
        self._siblings = {ordinal: held for ordinal, held in self._siblings.items() if wanted.get(ordinal) == held[0]}
        for ordinal, address in wanted.items():
            if ordinal not in self._siblings:
                channel = grpc.aio.secure_channel(address, self._channel_credentials, options=CHANNEL_OPTIONS)
                self._siblings[ordinal] = (address, channel, SiblingClient(self.replicas.replica, ordinal, channel))
        self.replicas.siblings = {ordinal: client for ordinal, (_, _, client) in self._siblings.items()}
        return gone

    async def start(self) -> None:
        # Transports first: a peer's call may arrive as soon as the gRPC server listens.
        for link in self.km.links.values():
            self._attach(link)
        self._connect_siblings()
        await self._start_grpc()
        self._tasks.append(asyncio.create_task(self._expire_sessions(), name="session-timers"))
        self._tasks.append(asyncio.create_task(self._check_siblings(), name="sibling-checks"))
        await self._start_http()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("KM %s replica %d (KME %s) serving: ETSI 014 https://%s, gRPC %s, metrics http://%s/metrics; %s",
                 self.km.node, self.km.replica, self.km.kme_id, self.config.etsi014_listen, self.config.grpc_listen,
                 self.config.metrics_listen,
                 "awaiting its topology from the control plane" if self.km.topology is None
                 else f"{len(self.km.links)} links, {len(self.km.saes)} SAEs known")

    async def apply_topology(self, topology: KMTopology) -> int:
        """Apply a topology live; returns the version held afterwards.

        The key manager's change and the transports of the links it adds happen without an
        await in between, so no request sees one without the other; removed links' feeds,
        channels and module clients are closed afterwards.
        """
        change = self.km.apply_topology(topology)
        gone = [self._detach(link) for link in change.removed]
        for link in change.added:
            self._attach(link)
        siblings_gone = self._connect_siblings()
        if change.applied:
            log.info("KM %s: topology version %d applied: links added %s, removed %s, retuned %s; %d kept as they were",
                     self.km.node, change.version, _names(change.added), _names(change.removed),
                     _names(change.retuned), len(self.km.links) - len(change.added) - len(change.retuned))
        await self._close(gone)
        for channel in siblings_gone:
            await channel.close()
        return change.version

    def _attach(self, link: Link) -> None:
        cfg = link.config
        module = ETSI014Client(cfg.module_url, cfg.module_tls.files() if cfg.module_tls else self.tls_files)
        channel = grpc.aio.secure_channel(cfg.peer_grpc, self._channel_credentials, options=CHANNEL_OPTIONS)
        link.peer = PeerClient(link, channel, self.km.replica)
        self.modules[link.end] = module
        collector = PeerKeyCollector(self.km.node, link, module, draw_target_s=DRAW_TARGET_S)
        self.collectors[link.end] = collector
        feed = asyncio.create_task(
            LinkFeed(self.km.node, link, module, draw_target_s=DRAW_TARGET_S, on_drawn=self._drawn).run(),
            name=f"feed-{link.name}-{link.peer_replica}")
        self._links[link.end] = LinkTransport(module, channel, collector, feed)

    def _detach(self, link: Link) -> LinkTransport:
        transport = self._links.pop(link.end)
        del self.modules[link.end]
        del self.collectors[link.end]
        transport.feed.cancel()
        if link.name not in {end.name for end in self.km.links.values()}:
            self.metrics.forget_link(link.name)
        return transport

    async def _close(self, transports: list[LinkTransport]) -> None:
        await asyncio.gather(*(t.feed for t in transports), return_exceptions=True)
        for transport in transports:
            await transport.collector.close()
            await transport.channel.close()
            await transport.module.close()

    async def _start_grpc(self) -> None:
        server = grpc.aio.server()
        km_pb2_grpc.add_LinkPeerServicer_to_server(
            LinkPeerService(self.km, self.exchange, self.collectors, self.relays), server)
        km_pb2_grpc.add_NodeReplicasServicer_to_server(
            NodeReplicasService(self.km, self.replicas, self.sessions, self.etsi004), server)
        km_pb2_grpc.add_KeyManagerControlServicer_to_server(
            KeyManagerControlService(self.km, self.sessions, self.apply_topology), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_secure_port(self.config.grpc_listen, grpc_server_credentials(self.tls_files))
        await server.start()
        self._grpc = server

    async def _start_http(self) -> None:
        api = web.Application(client_max_size=MAX_BODY_BYTES)
        ETSI014Routes(ETSI014Service(self.km, self.exchange, self.replicas), self.metrics).add_to(api)
        ETSI004Routes(self.etsi004, self.metrics).add_to(api)
        host, port = split_host_port(self.config.etsi014_listen)
        # With reuse_port the node's replicas on one host share the port: the kernel spreads
        # the SAEs' connections over them.
        await self._serve(api, host, port, tls.server_context(self.tls_files),
                          reuse_port=self.config.etsi014_reuse_port)

        admin = web.Application()
        admin.router.add_get("/metrics", self._metrics)
        admin.router.add_get("/healthz", self._healthz)
        admin.router.add_get("/events", self._events)
        host, port = split_host_port(self.config.metrics_listen)
        await self._serve(admin, host, port, None)

    async def _serve(self, app: web.Application, host: str, port: int, ssl_context, reuse_port: bool = False) -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=1024, reuse_port=reuse_port).start()
        self._runners.append(runner)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.exposed), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        # Live as soon as it serves, with or without a topology: a KM awaiting its topology
        # from the control plane must not be restarted for it.
        return web.json_response({"node": self.km.node, "incarnation": self.km.incarnation, "status": "ok",
                                  "topologyVersion": self.km.topology_version})

    async def _events(self, request: web.Request) -> web.Response:
        """Session cycle transitions, oldest first (no key material): for people and dashboards."""
        return web.json_response([
            {"at": e.at, "session_id": e.session_id, "event": e.event, "state": e.state.value, "detail": e.detail}
            for e in self.sessions.events
        ])

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.replicas.hand_over()  # a replica scaled away leaves its keys to one that stays
        transports, self._links = list(self._links.values()), {}
        for task in [*self._tasks, *(t.feed for t in transports)]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in self._runners:
            await runner.cleanup()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        await self._close(transports)
        for _, channel, _ in self._siblings.values():
            await channel.close()
        for channel, _, _ in self._departing.values():
            await channel.close()


def _names(links: tuple[Link, ...]) -> str:
    return ", ".join(f"{link.name} (to replica {link.peer_replica})" for link in links) or "none"


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
