"""The emulated QKD module pair as a real process on loopback, reached over mutual TLS."""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import time
from dataclasses import dataclass

import aiohttp
import pytest
from conftest import free_port, wait_for_port

from vqkd.km import identity
from vqkd.km.emulator import physics
from vqkd.km.etsi014 import schema
from vqkd.km.etsi014.client import ETSI014Client, ETSI014Error
from vqkd.km.tls import TLSFiles, client_context

LINK = "l1"
SAE = {"a": "km-A", "b": "km-B"}
KM = {"a": identity.km("A"), "b": identity.km("B")}
BUFFER_BITS = 1 << 20
MAX_KEY_SIZE = 16384
MAX_PER_REQUEST = 256


@dataclass
class Emulator:
    urls: dict[str, str]
    admin: str
    tls: dict[str, TLSFiles]
    proc: object
    name: str

    def client(self, end: str, as_end: str | None = None) -> ETSI014Client:
        """A client for ``end``, presenting the certificate of the KM at ``as_end``."""
        return ETSI014Client(self.urls[end], self.tls[as_end or end], timeout_s=5)


@pytest.fixture
def emulator(pki, processes) -> Emulator:
    ports = {"a": free_port(), "b": free_port(), "admin": free_port()}
    config = {
        "link": LINK,
        "key_rate_bps": 1e7,
        "qber": 0.0,
        "buffer_bits": BUFFER_BITS,
        "device": {"key_size": 256, "max_key_size": MAX_KEY_SIZE, "max_keys_per_request": MAX_PER_REQUEST},
        "admin_listen": f"127.0.0.1:{ports['admin']}",
        "ends": {
            end: {
                "listen": f"127.0.0.1:{ports[end]}",
                "sae_id": SAE[end],
                "client": KM[end].uri,
                "kme_id": f"kme-{LINK}-{end}",
                "tls": pki.paths(identity.module(LINK, end)),
            }
            for end in ("a", "b")
        },
    }
    proc = processes.start("vqkd.km.emulator", config, "emulator")
    for port in ports.values():
        wait_for_port(port, proc=proc)
    return Emulator(
        urls={end: f"https://127.0.0.1:{ports[end]}" for end in ("a", "b")},
        admin=f"http://127.0.0.1:{ports['admin']}",
        tls={end: pki.files(KM[end]) for end in ("a", "b")},
        proc=proc,
        name="emulator",
    )


async def control(emu: Emulator, **changes) -> dict:
    async with aiohttp.ClientSession() as s:
        if changes:
            async with s.post(f"{emu.admin}/control", json=changes) as r:
                assert r.status == 200, await r.text()
        async with s.get(f"{emu.admin}/control") as r:
            return await r.json()


async def filled(emu: Emulator) -> None:
    """Wait until the link's buffer is full (1 Mbit at 10 Mbit/s: about 0.1 s after start)."""
    while (await control(emu))["buffer_bits"] < BUFFER_BITS:
        await asyncio.sleep(0.02)


async def drain(emu: Emulator) -> None:
    """Stop production and take everything the link holds."""
    await control(emu, outage=True)
    async with emu.client("a") as a:
        while (bits := (await control(emu))["buffer_bits"]) >= 8:
            size = min(MAX_KEY_SIZE, bits // 8 * 8)
            await a.enc_keys(SAE["b"], min(MAX_PER_REQUEST, bits // size), size)


async def test_both_ends_get_the_same_key_once(emulator):
    await filled(emulator)
    async with emulator.client("a") as a, emulator.client("b") as b:
        status = await a.status(SAE["b"])
        assert (status.source_KME_ID, status.target_KME_ID) == ("kme-l1-a", "kme-l1-b")
        assert (status.master_SAE_ID, status.slave_SAE_ID) == ("km-A", "km-B")
        assert (status.key_size, status.max_key_size, status.max_key_per_request) == (256, MAX_KEY_SIZE, 256)
        assert status.max_key_count == BUFFER_BITS // 256 and status.max_SAE_ID_count == 0
        assert status.stored_key_count == status.max_key_count

        sent = await a.enc_keys(SAE["b"], 128, 8192)
        assert len({key_id for key_id, _ in sent}) == 128 and all(len(key) == 1024 for _, key in sent)
        ids = [key_id for key_id, _ in sent]
        assert await b.dec_keys(SAE["a"], ids, size=8192) == sent
        with pytest.raises(ETSI014Error) as e:
            await b.dec_keys(SAE["a"], ids[:1])
        assert (e.value.status, e.value.message) == (400, schema.MSG_KEYS_NOT_FOUND)

        # The other direction at the same time, and the single-key GET forms.
        back = await b.enc_keys(SAE["a"], 1, 256)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(emulator.tls["a"]))) as s:
            url = f"{emulator.urls['a']}/api/v1/keys/{SAE['b']}/dec_keys"
            async with s.get(url, params={"key_ID": back[0][0]}) as r:
                assert r.status == 200
                body = await r.json()
            assert body == {"keys": [{"key_ID": back[0][0], "key": base64.b64encode(back[0][1]).decode()}]}
            async with s.get(f"{emulator.urls['a']}/api/v1/keys/{SAE['b']}/enc_keys?number=2&size=64") as r:
                assert r.status == 200
                assert [len(base64.b64decode(k["key"])) for k in (await r.json())["keys"]] == [8, 8]


async def test_only_the_km_of_an_end_may_call_it(emulator, pki):
    strangers = {
        "an application": ETSI014Client(emulator.urls["a"], pki.files(identity.sae("x"))),
        "the KM of the other end": emulator.client("a", as_end="b"),
        "the module itself": ETSI014Client(emulator.urls["a"], pki.files(identity.module(LINK, "a"))),
    }
    for who, client in strangers.items():
        async with client:
            for call in (client.status(SAE["b"]), client.enc_keys(SAE["b"], 1, 256),
                         client.dec_keys(SAE["b"], ["00000000-0000-4000-8000-000000000000"])):
                with pytest.raises(ETSI014Error) as e:
                    await call
                assert e.value.status == 401, who
    async with emulator.client("b") as b:
        assert (await b.status(SAE["a"])).source_KME_ID == "kme-l1-b"


async def test_bad_requests_get_400_with_a_message_and_consume_nothing(emulator):
    await control(emulator, outage=True)
    before = await control(emulator)
    base = f"{emulator.urls['a']}/api/v1/keys"
    enc, dec = f"{base}/{SAE['b']}/enc_keys", f"{base}/{SAE['b']}/dec_keys"
    cases = [
        ("GET", f"{base}/km-X/status", None, "slave SAE 'km-X'.*expected 'km-B'"),
        ("GET", f"{base}/km-X/enc_keys", None, "slave SAE 'km-X'.*expected 'km-B'"),
        ("POST", f"{base}/km-A/dec_keys", {"key_IDs": [{"key_ID": "k"}]}, "master SAE 'km-A'.*expected 'km-B'"),
        ("GET", f"{enc}?size=12", None, f"^{schema.MSG_SIZE_MULTIPLE_OF_8}$"),
        ("POST", enc, {"number": 1, "size": 100}, f"^{schema.MSG_SIZE_MULTIPLE_OF_8}$"),
        ("GET", f"{enc}?number=0", None, "number must be between 1 and max_key_per_request=256, got 0"),
        ("POST", enc, {"number": 257}, "number must be between 1 and max_key_per_request=256, got 257"),
        ("POST", enc, {"size": 2 * MAX_KEY_SIZE}, f"max_key_size={MAX_KEY_SIZE}"),
        ("GET", f"{enc}?number=lots", None, "number must be an integer, got 'lots'"),
        ("POST", enc, {"number": "5"}, "number: Input should be a valid integer"),
        ("POST", enc, {"size": True}, "size: Input should be a valid integer"),
        ("POST", enc, [1, 2], "invalid key request"),
        ("POST", enc, b"{not json", "invalid key request.*JSON"),
        ("POST", enc, {"extension_mandatory": [{"vqkd_route": "x"}]}, f"^{schema.MSG_MANDATORY_UNSUPPORTED}$"),
        ("POST", enc, {"additional_slave_SAE_IDs": ["km-C"]}, "additional_slave_SAE_IDs are not supported"),
        ("GET", dec, None, "exactly one key_ID"),
        ("GET", f"{dec}?key_ID=00000000-0000-4000-8000-000000000000", None, f"^{schema.MSG_KEYS_NOT_FOUND}$"),
        ("POST", dec, b"\xff\xfe", "not valid JSON"),
        ("POST", dec, {"key_ids": []}, "key_IDs"),
        ("POST", dec, {"key_IDs": [{"key_ID": 7}]}, r"key_IDs\[0\] must be an object with a string key_ID"),
        ("POST", dec, {"key_IDs": []}, "at least one key"),
        ("POST", dec, {"key_IDs": [{"key_ID": "k"}] * 2}, "more than once"),
    ]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(emulator.tls["a"]))) as s:
        for method, url, body, expected in cases:
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
            async with s.request(method, url, **kwargs) as r:
                answer = await r.json()
                assert r.status == 400, (method, url, body, answer)
                assert set(answer) == {"message"}
                assert re.search(expected, answer["message"]), (expected, answer)
    after = await control(emulator)
    assert after["buffer_bits"] == before["buffer_bits"] and after["pending_bits"] == {"a": 0, "b": 0}


async def test_503_when_the_link_holds_too_little_key_and_nothing_is_consumed(emulator):
    await drain(emulator)
    held = await control(emulator)
    assert held["buffer_bits"] < 8
    async with emulator.client("a") as a:
        with pytest.raises(ETSI014Error) as e:
            await a.enc_keys(SAE["b"], 1, 256)
    assert e.value.status == 503 and "retry later" in e.value.message
    await control(emulator, outage=False)
    await asyncio.sleep(0.05)  # 1e7 bit/s fills the 1 Mbit buffer within 0.1 s
    full = await control(emulator, outage=True)
    async with emulator.client("b") as b:
        with pytest.raises(ETSI014Error) as e:
            await b.enc_keys(SAE["a"], 256, MAX_KEY_SIZE)
    assert e.value.status == 503
    assert await control(emulator) == full


async def test_control_sets_rate_qber_and_outage(emulator):
    await drain(emulator)
    state = await control(emulator, key_rate_bps=200_000, qber=0.0, outage=False)
    assert (state["key_rate_bps"], state["secret_key_rate_bps"], state["outage"]) == (200_000, 200_000, False)
    t0, b0 = time.monotonic(), state["buffer_bits"]
    await asyncio.sleep(0.5)
    state = await control(emulator)
    grown = (state["buffer_bits"] - b0) / (time.monotonic() - t0)
    assert 150_000 < grown < 230_000

    state = await control(emulator, qber=0.05)
    assert state["secret_key_rate_bps"] == pytest.approx(physics.secret_key_rate(200_000, 0.05))
    for changes in ({"qber": 0.11}, {"qber": 0.01, "outage": True}):
        state = await control(emulator, **changes)
        assert state["secret_key_rate_bps"] == 0
        await asyncio.sleep(0.2)
        assert (await control(emulator))["buffer_bits"] == state["buffer_bits"]
    async with emulator.client("a") as a:
        assert (await a.status(SAE["b"])).status_extension["vqkd_outage"] is True

    async with aiohttp.ClientSession() as s:
        for bad, expected in (({"qber": 0.6}, "qber must be between 0 and 0.5"),
                              ({"key_rate_bps": -5}, "key_rate_bps must be a finite number"),
                              ({"key_rate_bps": "fast"}, "key_rate_bps must be a number"),
                              ({"outage": 1}, "outage must be true or false"),
                              ({"rate": 5}, "unknown control fields ['rate']"),
                              ([], "must be a JSON object")):
            async with s.post(f"{emulator.admin}/control", json=bad) as r:
                assert r.status == 400
                assert expected in (await r.json())["message"]
    state = await control(emulator)
    assert (state["key_rate_bps"], state["qber"], state["outage"]) == (200_000, 0.01, True)


async def test_metrics_logs_and_clean_shutdown(emulator, processes):
    async with emulator.client("a") as a, emulator.client("b") as b:
        sent = await a.enc_keys(SAE["b"], 4, 256)
        await b.dec_keys(SAE["a"], [key_id for key_id, _ in sent[:3]])
        with pytest.raises(ETSI014Error):
            await b.dec_keys(SAE["a"], [sent[0][0]])
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{emulator.admin}/metrics") as r:
            assert r.status == 200 and r.content_type == "text/plain"
            text = await r.text()
    samples = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['vqkd_module_generated_bits_total{link="l1"}'] > 0
    assert samples['vqkd_module_delivered_bits_total{end="a",link="l1"}'] == 1024
    assert samples['vqkd_module_delivered_bits_total{end="b",link="l1"}'] == 768
    assert samples['vqkd_module_pending_bits{end="b",link="l1"}'] == 256
    assert samples['vqkd_module_key_rate_bits_per_second{link="l1"}'] == 1e7
    assert samples['vqkd_module_secret_key_rate_bits_per_second{link="l1"}'] == 1e7
    assert samples['vqkd_module_qber{link="l1"}'] == 0
    assert samples['vqkd_module_outage{link="l1"}'] == 0
    assert samples['vqkd_module_buffer_capacity_bits{link="l1"}'] == BUFFER_BITS
    assert 0 < samples['vqkd_module_buffer_bits{link="l1"}'] <= BUFFER_BITS - 256
    assert samples['vqkd_module_expired_bits_total{end="b",link="l1"}'] == 0
    assert samples['vqkd_module_requests_total{code="200",end="a",link="l1"}'] == 1
    assert samples['vqkd_module_requests_total{code="200",end="b",link="l1"}'] == 1
    assert samples['vqkd_module_requests_total{code="400",end="b",link="l1"}'] == 1

    emulator.proc.send_signal(signal.SIGTERM)
    assert emulator.proc.wait(timeout=5) == 0
    log = processes.log(emulator.name)
    assert "emulated link l1 listening" in log and log.count("\n") == 1
    assert not any(base64.b64encode(key).decode() in log or key.hex() in log for _, key in sent)
