"""aiohttp routes of the ETSI GS QKD 014 API: parse, authenticate, call the service, answer."""

from __future__ import annotations

import binascii
import functools
import json
import re
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from vqkd.km import identity
from vqkd.km.domain import errors
from vqkd.km.etsi014 import schema
from vqkd.km.etsi014.openapi import openapi_document
from vqkd.km.metrics import refusal_reason

if TYPE_CHECKING:
    from vqkd.km.etsi014.service import ETSI014Service
    from vqkd.km.metrics import KMMetrics

MAX_BODY_BYTES = 1024 * 1024

STATUS_OF = {
    errors.InvalidRequest: 400,
    errors.KeysNotFound: 400,
    errors.NotAuthorized: 401,
    errors.Unavailable: 503,
}


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def caller_of(request: web.Request) -> str:
    """The SAE ID named by the client certificate; 401 for anything but an SAE."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    who = identity.from_der(der) if der else None
    if who is None or who.kind is not identity.PrincipalKind.SAE:
        raise RequestError(401, "a client certificate naming an SAE (vqkd://sae/<id>) is required")
    return who.name


def _json(status: int, body: dict) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


# What json.dumps copies unchanged into a string: printable ASCII except '"' and '\\'.
_VERBATIM_IN_JSON = re.compile(r'[ !#-\[\]-~]*')
_b64 = functools.partial(binascii.b2a_base64, newline=False)


def _key_container_json(keys: list[tuple[str, bytes]]) -> bytes:
    """``json.dumps({"keys": [{"key_ID": ..., "key": <base64>}, ...]})``, byte for byte.

    json.dumps builds a dict per key and scans every character for escapes; for a batch of
    256 keys that was a fifth of the KM's time. Base64 never needs escaping and key IDs
    almost never do (this KM makes them as UUIDs), so the text is joined in C; key IDs that
    would need escaping take json.dumps' way.
    """
    ids = [key_id for key_id, _ in keys]
    encoded = list(map(bytes.decode, map(_b64, [key for _, key in keys])))
    if not ids or not _VERBATIM_IN_JSON.fullmatch("".join(ids)):
        return json.dumps({"keys": [{"key_ID": i, "key": k} for i, k in zip(ids, encoded)]}).encode()
    items = '"}, {"key_ID": "'.join(map('", "key": "'.join, zip(ids, encoded)))
    return f'{{"keys": [{{"key_ID": "{items}"}}]}}'.encode()


def _error(status: int, message: str) -> web.Response:
    return _json(status, {"message": message})


async def json_body(request: web.Request) -> dict:
    """The request's JSON object ({} for an empty body); 400 for anything else."""
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def validated(model, data: dict):
    """``data`` as ``model``; 400 naming every field that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise RequestError(400, f"invalid {model.__name__}: {problems}") from None


def _query_int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise RequestError(400, f"query parameter {name} must be an integer, got {value!r}") from None


class ETSI014Routes:
    def __init__(self, service: ETSI014Service, metrics: KMMetrics):
        self.service = service
        self.metrics = metrics
        # Counters made on first use, as before, then found in a dict rather than through
        # prometheus_client's locked labels() on every request.
        self._delivered = functools.cache(
            lambda role: (metrics.keys_delivered(metrics.node, role), metrics.key_bits_delivered(metrics.node, role))
        )

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/keys/{slave_SAE_ID}/status", self._wrap("status", self.status))
        app.router.add_get("/api/v1/keys/{slave_SAE_ID}/enc_keys", self._wrap("enc_keys", self.enc_keys_get))
        app.router.add_post("/api/v1/keys/{slave_SAE_ID}/enc_keys", self._wrap("enc_keys", self.enc_keys_post))
        app.router.add_get("/api/v1/keys/{master_SAE_ID}/dec_keys", self._wrap("dec_keys", self.dec_keys_get))
        app.router.add_post("/api/v1/keys/{master_SAE_ID}/dec_keys", self._wrap("dec_keys", self.dec_keys_post))
        app.router.add_get("/api/v1/openapi.json", self.openapi)

    def _wrap(self, call: str, handler: Callable[[web.Request], Awaitable[web.Response]]):
        node = self.metrics.node
        latency = self.metrics.request_seconds(node, call)
        responses = functools.cache(lambda status: self.metrics.responses(node, call, str(status)))

        async def endpoint(request: web.Request) -> web.Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except RequestError as e:
                response = web.Response(status=401) if e.status == 401 else _error(e.status, str(e))
            except errors.KMError as e:
                response = _error(STATUS_OF[next(c for c in STATUS_OF if isinstance(e, c))], str(e))
                if not isinstance(e, (errors.InvalidRequest, errors.KeysNotFound)):
                    self.metrics.refusals(node, refusal_reason(e)).inc()
            latency.observe(time.perf_counter() - started)
            responses(response.status).inc()
            return response

        return endpoint

    async def status(self, request: web.Request) -> web.Response:
        caller = caller_of(request)
        return _json(200, self.service.status(caller, request.match_info["slave_SAE_ID"]))

    # The caller is authenticated before its request is parsed: a stranger gets 401, never a
    # 400 about its request.

    async def _enc_keys(self, request: web.Request, caller: str, key_request: schema.KeyRequest) -> web.Response:
        issued = await self.service.enc_keys(caller, request.match_info["slave_SAE_ID"], key_request)
        return self._key_container(issued.keys, "master", issued.extension)

    async def enc_keys_get(self, request: web.Request) -> web.Response:
        caller = caller_of(request)
        return await self._enc_keys(
            request, caller, schema.KeyRequest(number=_query_int(request, "number"), size=_query_int(request, "size"))
        )

    async def enc_keys_post(self, request: web.Request) -> web.Response:
        caller = caller_of(request)
        return await self._enc_keys(request, caller, validated(schema.KeyRequest, await json_body(request)))

    async def _dec_keys(self, request: web.Request, caller: str, key_ids: list[str]) -> web.Response:
        found = await self.service.dec_keys(caller, request.match_info["master_SAE_ID"], key_ids)
        return self._key_container([(key_id, key) for key_id, key, _ in found], "slave",
                                   [extension for *_, extension in found])

    async def dec_keys_get(self, request: web.Request) -> web.Response:
        caller = caller_of(request)
        key_ids = request.query.getall("key_ID", [])
        if len(key_ids) != 1:
            raise RequestError(400, f"GET dec_keys takes exactly one key_ID query parameter, got {len(key_ids)}; "
                                    "use POST for several")
        return await self._dec_keys(request, caller, key_ids)

    async def dec_keys_post(self, request: web.Request) -> web.Response:
        caller = caller_of(request)
        ids = validated(schema.KeyIDs, await json_body(request))
        return await self._dec_keys(request, caller, [ref.key_ID for ref in ids.key_IDs])

    def _key_container(self, keys: list[tuple[str, bytes]], role: str,
                       extensions: dict | list[dict | None] | None = None) -> web.Response:
        """The key container; ``extensions`` is one key_extension for all keys or one per key."""
        count, bits = self._delivered(role)
        count.inc(len(keys))
        bits.inc(sum(map(len, [key for _, key in keys])) * 8)
        if isinstance(extensions, dict):
            extensions = [extensions] * len(keys)
        if extensions and any(extensions):  # rare (e.g. hybrid fallback keys): the plain way
            body = json.dumps({"keys": [
                {"key_ID": key_id, "key": _b64(key).decode(), **({"key_extension": ext} if ext else {})}
                for (key_id, key), ext in zip(keys, extensions)
            ]}).encode()
        else:
            body = _key_container_json(keys)
        return web.Response(status=200, body=body, content_type="application/json")

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(200, openapi_document())
