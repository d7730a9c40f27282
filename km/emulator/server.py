"""HTTP adapter of the emulated QKD module pair.

Each end of the link is its own HTTPS site speaking ETSI GS QKD 014 to exactly one client,
the KM of that end's node, identified by its certificate. A plain-HTTP admin site on
loopback serves Prometheus metrics and the twin's controls (key rate, QBER, outage of the
link or of one end).

The device profile makes the pair behave like a particular device: request limits, a slave
end that answers ``dec_keys`` one request at a time and takes a while per key, keys that
reach the other end late, random refusals, TLS 1.2 only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import ValidationError

from vqkd.km import identity, tls
from vqkd.km.config import EmulatedLinkConfig
from vqkd.km.emulator.module import (
    ENDS,
    OTHER_END,
    BadRequest,
    EmulatedLink,
    InvalidControl,
    ModuleError,
    NotEnoughKey,
    RequestLimits,
)
from vqkd.km.etsi014 import schema

KEYS_PREFIX = "/api/v1/keys"
CONTROL_FIELDS = ("key_rate_bps", "qber", "outage", "end_outage")


def split_host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def link_from_config(cfg: EmulatedLinkConfig, clock: Callable[[], float] = time.monotonic) -> EmulatedLink:
    device = cfg.device
    return EmulatedLink(
        cfg.link,
        {end: cfg.ends[end].sae_id for end in ENDS},
        key_rate_bps=cfg.key_rate_bps,
        qber=cfg.qber,
        buffer_bits=cfg.buffer_bits,
        limits=RequestLimits(
            key_size=device.key_size, max_key_size=device.max_key_size,
            max_key_per_request=device.max_keys_per_request,
        ),
        sync_lag_s=device.sync_lag_ms / 1000,
        clock=clock,
    )


def end_tls_context(cfg: EmulatedLinkConfig, end: str) -> ssl.SSLContext:
    ctx = tls.server_context(cfg.ends[end].tls.files())
    if cfg.device.tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _json_response(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json_response(status, {"message": message})


def _load_json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from None


def _describe(e: ValidationError, what: str) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors(include_url=False)
    )
    return f"invalid {what}: {problems}"


def _query_int(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer, got {value!r}") from None


def _key_container(keys: list[tuple[str, bytes]]) -> web.Response:
    """The ETSI 014 key container, written directly as JSON bytes.

    json.dumps scans every character of the base64 text for escapes and took two thirds
    of the cost of a 128-key answer. Nothing here needs escaping: the module makes every
    key ID (hex and dashes) and base64 uses only letters, digits, '+', '/' and '='.
    """
    b64 = base64.b64encode
    body = b",".join(b'{"key_ID":"%s","key":"%s"}' % (key_id.encode(), b64(key)) for key_id, key in keys)
    return web.Response(body=b'{"keys":[' + body + b"]}", content_type="application/json")


def _peer_identity(request: web.Request) -> identity.Identity | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return identity.from_der(der) if der else None


class _EndAPI:
    """The ETSI 014 routes of one end; every request must come from that end's KM.

    An end in outage answers every request with 503, as a device in maintenance does.
    """

    def __init__(self, cfg: EmulatedLinkConfig, end: str, link: EmulatedLink, requests: Counter,
                 rng: random.Random):
        self.end = end
        self.link = link
        self.client = identity.Identity.parse(cfg.ends[end].client)
        self.kme_id = cfg.ends[end].kme_id
        self.peer_kme_id = cfg.ends[OTHER_END[end]].kme_id
        self.requests = requests
        self.label = cfg.link
        self.device = cfg.device
        self.rng = rng
        self.outage = False
        # A device synchronises and answers one dec_keys request at a time.
        self._dec_keys_turn = asyncio.Lock()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get(KEYS_PREFIX + "/{slave_SAE_ID}/status", self.status)
        app.router.add_get(KEYS_PREFIX + "/{slave_SAE_ID}/enc_keys", self.enc_keys_get)
        app.router.add_post(KEYS_PREFIX + "/{slave_SAE_ID}/enc_keys", self.enc_keys_post)
        app.router.add_get(KEYS_PREFIX + "/{master_SAE_ID}/dec_keys", self.dec_keys_get)
        app.router.add_post(KEYS_PREFIX + "/{master_SAE_ID}/dec_keys", self.dec_keys_post)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        peer = _peer_identity(request)
        try:
            if peer != self.client:
                response = _error(
                    401,
                    f"client {peer or 'without a vqkd identity'} may not use end {self.end} of link "
                    f"{self.label}; only {self.client} may",
                )
            elif self.outage:
                response = _error(503, f"end {self.end} of QKD link {self.label} is out of service; retry later")
            elif self.device.error_rate and self.rng.random() < self.device.error_rate:
                response = _error(503, f"end {self.end} of QKD link {self.label} failed to serve the request "
                                       "(emulated device error); nothing was consumed, retry")
            else:
                try:
                    response = await handler(request)
                except BadRequest as e:
                    response = _error(400, e.message)
                except NotEnoughKey as e:
                    response = _error(503, e.message)
        except web.HTTPException as e:
            self.requests.labels(self.label, self.end, str(e.status)).inc()
            raise
        self.requests.labels(self.label, self.end, str(response.status)).inc()
        return response

    async def status(self, request: web.Request) -> web.Response:
        slave = request.match_info["slave_SAE_ID"]
        self.link.expect_peer(self.end, slave, "slave")
        state = self.link.snapshot()
        limits = self.link.limits
        return _json_response(200, {
            "source_KME_ID": self.kme_id,
            "target_KME_ID": self.peer_kme_id,
            "master_SAE_ID": self.link.sae_ids[self.end],
            "slave_SAE_ID": slave,
            "key_size": limits.key_size,
            "stored_key_count": state.buffer_bits // limits.key_size,
            "max_key_count": state.buffer_capacity_bits // limits.key_size,
            "max_key_per_request": limits.max_key_per_request,
            "max_key_size": limits.max_key_size,
            "min_key_size": limits.min_key_size,
            "max_SAE_ID_count": 0,
            # Vendor extension: what a real device's management interface would show.
            "status_extension": {
                "vqkd_link": self.label,
                "vqkd_secret_key_rate_bps": state.secret_key_rate_bps,
                "vqkd_qber": state.qber,
                "vqkd_outage": state.outage,
            },
        })

    async def enc_keys_get(self, request: web.Request) -> web.Response:
        number = _query_int(request, "number", 1)
        size = _query_int(request, "size", self.link.limits.key_size)
        return _key_container(self.link.enc_keys(self.end, request.match_info["slave_SAE_ID"], number, size))

    async def enc_keys_post(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            # Strict: "5" or true is not a number of keys.
            req = schema.KeyRequest.model_validate_json(raw or b"{}", strict=True)
        except ValidationError as e:
            raise BadRequest(_describe(e, "key request")) from None
        if req.extension_mandatory:
            raise BadRequest(schema.MSG_MANDATORY_UNSUPPORTED)
        if req.additional_slave_SAE_IDs:
            raise BadRequest("additional_slave_SAE_IDs are not supported: max_SAE_ID_count is 0")
        number = 1 if req.number is None else req.number
        size = self.link.limits.key_size if req.size is None else req.size
        return _key_container(self.link.enc_keys(self.end, request.match_info["slave_SAE_ID"], number, size))

    async def _dec_keys(self, master_sae_id: str, key_ids: list[str]) -> web.Response:
        latency_s = self.device.slave_latency_ms_per_key / 1000
        if not latency_s:
            return _key_container(self.link.dec_keys(self.end, master_sae_id, key_ids))
        async with self._dec_keys_turn:
            keys = self.link.dec_keys(self.end, master_sae_id, key_ids)
            await asyncio.sleep(latency_s * len(keys))
        return _key_container(keys)

    async def dec_keys_get(self, request: web.Request) -> web.Response:
        key_ids = request.query.getall("key_ID", [])
        if len(key_ids) != 1:
            raise BadRequest(
                f"GET dec_keys takes exactly one key_ID query parameter, got {len(key_ids)}; POST key_IDs for several"
            )
        return await self._dec_keys(request.match_info["master_SAE_ID"], key_ids)

    async def dec_keys_post(self, request: web.Request) -> web.Response:
        # Parsed by hand: a pydantic object per key ID would dominate the cost of a batch.
        body = _load_json(await request.read(), "key IDs request")
        refs = body.get("key_IDs") if isinstance(body, dict) else None
        if not isinstance(refs, list):
            raise BadRequest('key IDs request must be a JSON object {"key_IDs": [{"key_ID": "<uuid>"}, ...]}')
        key_ids = [ref.get("key_ID") if isinstance(ref, dict) else None for ref in refs]
        for i, key_id in enumerate(key_ids):
            if not isinstance(key_id, str):
                raise BadRequest(f"key_IDs[{i}] must be an object with a string key_ID, got {refs[i]!r}")
        return await self._dec_keys(request.match_info["master_SAE_ID"], key_ids)


class _LinkCollector:
    """Reads the link at scrape time, so the hot path updates no metric objects."""

    def __init__(self, link: EmulatedLink):
        self.link = link

    def collect(self):
        s = self.link.snapshot()
        name = [self.link.name]

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, doc, labels=["link"])
            family.add_metric(name, value)
            return family

        def per_end(family, values) -> CounterMetricFamily | GaugeMetricFamily:
            for end in ENDS:
                family.add_metric(name + [end], values[end])
            return family

        generated = CounterMetricFamily(
            "vqkd_module_generated_bits", "secret key bits produced into the module buffer", labels=["link"]
        )
        generated.add_metric(name, s.generated_bits_total)
        yield generated
        yield per_end(CounterMetricFamily(
            "vqkd_module_delivered_bits", "key bits handed to the KM at each end (enc_keys and dec_keys)",
            labels=["link", "end"]), s.delivered_bits_total)
        yield per_end(CounterMetricFamily(
            "vqkd_module_expired_bits", "key bits discarded because the KM at this end never collected them",
            labels=["link", "end"]), s.expired_bits_total)
        yield gauge("vqkd_module_key_rate_bits_per_second", "configured key rate at zero QBER", s.key_rate_bps)
        yield gauge("vqkd_module_secret_key_rate_bits_per_second",
                    "current secret key rate after QBER and outage", s.secret_key_rate_bps)
        yield gauge("vqkd_module_qber", "quantum bit error rate (ratio)", s.qber)
        yield gauge("vqkd_module_outage", "1 while the link is in outage", float(s.outage))
        yield gauge("vqkd_module_buffer_bits", "produced key not yet drawn by either end", s.buffer_bits)
        yield gauge("vqkd_module_buffer_capacity_bits", "bound on produced plus pending key",
                    s.buffer_capacity_bits)
        yield per_end(GaugeMetricFamily(
            "vqkd_module_pending_bits", "key bits taken by the other end, waiting for this end's dec_keys",
            labels=["link", "end"]), s.pending_bits)


class EmulatorServer:
    """Both ends' ETSI 014 sites and the admin site of one emulated link."""

    def __init__(self, cfg: EmulatedLinkConfig, link: EmulatedLink | None = None):
        self.cfg = cfg
        self.link = link if link is not None else link_from_config(cfg)
        self.registry = CollectorRegistry()
        self.registry.register(_LinkCollector(self.link))
        requests = Counter(
            "vqkd_module_requests", "ETSI 014 requests by end and HTTP status",
            ["link", "end", "code"], registry=self.registry,
        )
        rng = random.Random()
        self.ends = {end: _EndAPI(cfg, end, self.link, requests, rng) for end in ENDS}
        self._apps = [(self.ends[end].app(), cfg.ends[end].listen, end_tls_context(cfg, end)) for end in ENDS]
        self._apps.append((self._admin_app(), cfg.admin_listen, None))
        self._runners: list[web.AppRunner] = []

    @property
    def urls(self) -> dict[str, str]:
        """Where each end and the admin site listen."""
        urls = {end: f"https://{self.cfg.ends[end].listen}" for end in ENDS}
        urls["admin"] = f"http://{self.cfg.admin_listen}"
        return urls

    async def start(self) -> None:
        try:
            for app, listen, ssl_context in self._apps:
                # Access logs stay off: request lines carry key IDs, and logging costs the hot path.
                runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
                await runner.setup()
                self._runners.append(runner)
                host, port = split_host_port(listen)
                await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        while self._runners:
            await self._runners.pop().cleanup()

    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/control", self._get_control)
        app.router.add_post("/control", self._post_control)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _control_state(self) -> dict[str, Any]:
        s = self.link.snapshot()
        return {
            "link": self.link.name,
            "key_rate_bps": s.key_rate_bps,
            "qber": s.qber,
            "outage": s.outage,
            "secret_key_rate_bps": s.secret_key_rate_bps,
            "buffer_bits": s.buffer_bits,
            "buffer_capacity_bits": s.buffer_capacity_bits,
            "pending_bits": dict(s.pending_bits),
            "end_outage": {end: api.outage for end, api in self.ends.items()},
        }

    async def _get_control(self, request: web.Request) -> web.Response:
        return _json_response(200, self._control_state())

    async def _post_control(self, request: web.Request) -> web.Response:
        try:
            body = _load_json(await request.read(), "control request")
            if not isinstance(body, dict):
                raise BadRequest(f"control request must be a JSON object with any of {', '.join(CONTROL_FIELDS)}")
            unknown = sorted(set(body) - set(CONTROL_FIELDS))
            if unknown:
                raise BadRequest(f"unknown control fields {unknown}; expected any of {', '.join(CONTROL_FIELDS)}")
            end_outage = body.pop("end_outage", {})
            if not isinstance(end_outage, dict) or not set(end_outage) <= set(ENDS) or not all(
                    isinstance(v, bool) for v in end_outage.values()):
                raise BadRequest(f'end_outage must map ends to true or false, e.g. {{"b": true}}; got {end_outage!r}')
            for field, value in body.items():
                if field == "outage":
                    if not isinstance(value, bool):
                        raise BadRequest(f"outage must be true or false, got {value!r}")
                elif isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise BadRequest(f"{field} must be a number, got {value!r}")
            self.link.control(**body)
            for end, down in end_outage.items():
                self.ends[end].outage = down
        except ModuleError as e:
            return _error(400, e.message)
        except InvalidControl as e:
            return _error(400, str(e))
        return _json_response(200, self._control_state())
