"""aiohttp routes of the ETSI 004 API: POST /api/v1/etsi004/{open_connect,get_key,close}."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from aiohttp import web

from vqkd.km.domain import errors
from vqkd.km.domain.vocabulary import QoS
from vqkd.km.etsi004 import schema
from vqkd.km.etsi004.service import Status
from vqkd.km.etsi014.routes import RequestError, caller_of, json_body, validated
from vqkd.km.metrics import refusal_reason

# GET_KEY and OPEN_CONNECT statuses that refuse a request, as refusal-reason labels.
REFUSED = {Status.INSUFFICIENT_KEY: "insufficient_key", Status.GET_KEY_PEER_NOT_CONNECTED: "peer_not_connected",
           Status.NO_QKD_CONNECTION: "no_path", Status.TIMEOUT: "timeout", Status.QOS_NOT_MET: "qos_not_met"}

if TYPE_CHECKING:
    from vqkd.km.etsi004.service import ETSI004Service
    from vqkd.km.metrics import KMMetrics

PREFIX = "/api/v1/etsi004"


def qos_out(q: QoS) -> dict:
    return {"Key_chunk_size": q.key_chunk_size, "Max_bps": q.max_bps, "Min_bps": q.min_bps, "Jitter": q.jitter,
            "Priority": q.priority, "Timeout": q.timeout_ms, "TTL": q.ttl_s, "vqkd_fallback": q.fallback}


class ETSI004Routes:
    def __init__(self, service: ETSI004Service, metrics: KMMetrics):
        self.service = service
        self.metrics = metrics

    def add_to(self, app: web.Application) -> None:
        app.router.add_post(f"{PREFIX}/open_connect", self._wrap("open_connect", schema.OpenConnect, self.open_connect))
        app.router.add_post(f"{PREFIX}/get_key", self._wrap("get_key", schema.GetKey, self.get_key))
        app.router.add_post(f"{PREFIX}/close", self._wrap("close", schema.Close, self.close))

    def _wrap(self, call, model, handler):
        node = self.metrics.node

        async def endpoint(request: web.Request) -> web.Response:
            try:
                caller = caller_of(request)
                message = validated(model, await json_body(request))
                response = web.json_response(await handler(caller, message))
            except RequestError as e:
                response = web.Response(status=401) if e.status == 401 else web.json_response({"message": str(e)},
                                                                                              status=e.status)
            except errors.NotAuthorized as e:
                response = web.json_response({"message": str(e)}, status=401)
                self.metrics.refusals(node, "not_authorized").inc()
            except errors.InvalidRequest as e:
                response = web.json_response({"message": str(e)}, status=400)
            except errors.KMError as e:
                response = web.json_response({"status": int(Status.NO_QKD_CONNECTION), "message": str(e)})
                self.metrics.refusals(node, refusal_reason(e)).inc()
            self.metrics.responses(node, f"etsi004_{call}", str(response.status)).inc()
            return response

        return endpoint

    async def open_connect(self, caller: str, m: schema.OpenConnect) -> dict:
        q = m.QoS
        result = await self.service.open_connect(caller, m.source, m.destination, QoS(
            key_chunk_size=q.Key_chunk_size, max_bps=q.Max_bps, min_bps=q.Min_bps, jitter=q.Jitter,
            priority=q.Priority, timeout_ms=q.Timeout, ttl_s=q.TTL, fallback=q.vqkd_fallback,
        ), m.Key_stream_ID)
        self._count_refusal(result.status)
        body = {"status": int(result.status), "Key_stream_ID": result.key_stream_id, "QoS": qos_out(result.qos)}
        if result.message:
            body["message"] = result.message
        return body

    async def get_key(self, caller: str, m: schema.GetKey) -> dict:
        result = await self.service.get_key(caller, m.Key_stream_ID, m.index, m.Metadata_size)
        self._count_refusal(result.status)
        body = {"status": int(result.status), "index": result.index}
        if result.status is Status.SUCCESS:
            body["Key_buffer"] = base64.b64encode(result.key).decode()
            body["Metadata"] = {"key_ID": result.key_id}
            self.metrics.keys_delivered(self.metrics.node, "stream").inc()
            self.metrics.key_bits_delivered(self.metrics.node, "stream").inc(len(result.key) * 8)
        if result.message:
            body["message"] = result.message
        return body

    def _count_refusal(self, status: Status) -> None:
        if status in REFUSED:
            self.metrics.refusals(self.metrics.node, REFUSED[status]).inc()

    async def close(self, caller: str, m: schema.Close) -> dict:
        return {"status": int(await self.service.close(caller, m.Key_stream_ID))}
