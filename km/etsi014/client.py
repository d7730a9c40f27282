"""Southbound ETSI GS QKD 014 client: how a KM draws key from a QKD module.

The same client talks to the emulated module pair and to real QKD devices, so it trusts
nothing it receives: key counts, key IDs and key sizes are checked on every answer.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError

from vqkd.km.etsi014 import schema
from vqkd.km.tls import TLSFiles, client_context


class ETSI014Error(Exception):
    """A KME refused a request or answered something unusable.

    ``status`` is the HTTP status of the answer, or 0 when no answer arrived (connection
    refused, TLS failure, timeout). A 200 with a malformed body keeps status 200.
    """

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message

    @property
    def keys_not_found(self) -> bool:
        """The KME does not know a key asked for by ID (a slave end may not have synchronised yet).

        ETSI 014 answers 400 with a fixed message; devices word it differently, some answer 404.
        """
        return self.status in (400, 404) and "not found" in self.message.lower()


def _error_message(status: int, reason: str | None, body: bytes) -> str:
    # 401 and proxies' errors may carry no JSON at all.
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    if isinstance(message, str) and message:
        return message
    text = body.decode(errors="replace").strip()[:200]
    return text or reason or f"HTTP {status}"


class ETSI014Client:
    """An async ETSI 014 client for one KME (one QKD module end), over mutual TLS 1.2 or 1.3.

    ``base_url`` is the KME's https root, e.g. ``https://10.0.0.5:8443``. The session is
    opened on first use inside the running event loop; ``close()`` releases it.
    """

    def __init__(self, base_url: str, tls_files: TLSFiles, *, timeout_s: float = 10.0, max_connections: int = 8):
        self.base_url = base_url.rstrip("/")
        self._keys_url = self.base_url + "/api/v1/keys/"
        self._ssl = client_context(tls_files)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ETSI014Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=self._max_connections),
                timeout=self._timeout,
            )
        return self._session

    async def _call(self, method: str, sae_id: str, call: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self._keys_url}{quote(sae_id, safe='')}/{call}"
        try:
            async with self._client().request(method, url, json=body) as resp:
                status, reason, raw = resp.status, resp.reason, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ETSI014Error(0, f"{method} {url}: no answer from KME: {e!r}") from e
        if status != 200:
            raise ETSI014Error(status, _error_message(status, reason, raw))
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ETSI014Error(200, f"{method} {url}: answer is not JSON: {e}") from None

    async def status(self, slave_sae_id: str) -> schema.Status:
        data = await self._call("GET", slave_sae_id, "status")
        try:
            return schema.Status.model_validate(data)
        except ValidationError as e:
            raise ETSI014Error(200, f"status for slave SAE {slave_sae_id!r} is malformed: {e}") from None

    async def enc_keys(self, slave_sae_id: str, number: int, size: int) -> list[tuple[str, bytes]]:
        """Get ``number`` new keys of ``size`` bits shared with ``slave_sae_id``: [(key ID, key)]."""
        data = await self._call("POST", slave_sae_id, "enc_keys", {"number": number, "size": size})
        keys = _decode_keys(data, size)
        if len(keys) != number:
            raise ETSI014Error(200, f"asked for {number} keys for slave SAE {slave_sae_id!r}, got {len(keys)}")
        return keys

    async def dec_keys(
        self, master_sae_id: str, key_ids: Sequence[str], *, size: int | None = None
    ) -> list[tuple[str, bytes]]:
        """Collect the keys ``master_sae_id`` took with these IDs, in the order asked for.

        ``size`` (bits), when given, is checked against every key returned.
        """
        body = {"key_IDs": [{"key_ID": key_id} for key_id in key_ids]}
        data = await self._call("POST", master_sae_id, "dec_keys", body)
        got = dict(_decode_keys(data, size))
        if len(got) != len(key_ids) or not all(key_id in got for key_id in key_ids):
            raise ETSI014Error(
                200, f"asked master SAE {master_sae_id!r}'s keys for {len(key_ids)} key IDs, got other keys back"
            )
        return [(key_id, got[key_id]) for key_id in key_ids]


def _decode_keys(data: Any, size: int | None) -> list[tuple[str, bytes]]:
    """The (key ID, key) pairs of a key container, each key ``size`` bits when given."""
    b64decode = base64.b64decode
    try:
        keys = [(item["key_ID"], b64decode(item["key"], validate=True)) for item in data["keys"]]
    except (KeyError, TypeError, binascii.Error) as e:
        raise ETSI014Error(200, f"malformed key container: {e!r}") from None
    for key_id, key in keys:
        if not isinstance(key_id, str):
            raise ETSI014Error(200, f"malformed key container: key_ID {key_id!r} is not a string")
        if size is not None and len(key) * 8 != size:
            raise ETSI014Error(200, f"key {key_id} has {len(key) * 8} bits, expected {size}")
    return keys
