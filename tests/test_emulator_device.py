"""Device profiles of the emulated QKD module pair: it behaves like devices that are not vqkd's."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
import urllib.request

import pytest
from conftest import free_port, wait_for_port

from vqkd.km import identity
from vqkd.km.emulator.module import EmulatedLink, KeysNotFound
from vqkd.km.etsi014.client import ETSI014Client, ETSI014Error
from vqkd.km.tls import client_context
from vqkd.operator.resources.models import EmulatedKeySource

LINK = "dev"
SAE = {"a": "km-A", "b": "km-B"}
KM = {"a": identity.km("A"), "b": identity.km("B")}


def test_keys_reach_the_other_end_only_after_the_synchronisation_lag():
    now = [0.0]
    link = EmulatedLink("l", SAE, key_rate_bps=1e6, qber=0.0, buffer_bits=1 << 20, sync_lag_s=0.3,
                        clock=lambda: now[0])
    now[0] = 1.0
    keys = link.enc_keys("a", SAE["b"], 4, 256)
    now[0] += 0.29
    with pytest.raises(KeysNotFound):
        link.dec_keys("b", SAE["a"], [k for k, _ in keys])
    now[0] += 0.02
    assert link.dec_keys("b", SAE["a"], [k for k, _ in keys]) == keys


def test_a_resource_profile_becomes_the_modules_configuration():
    source = EmulatedKeySource.model_validate({"keyRateBps": 1e5, "device": {
        "maxKeySize": 128, "maxKeysPerRequest": 128, "slaveLatencyMsPerKey": 40, "syncLagMs": 300,
        "errorRate": 0.01, "tls12Only": True}})
    profile = source.device_profile()
    assert (profile.key_size, profile.max_key_size, profile.max_keys_per_request) == (128, 128, 128)
    assert (profile.slave_latency_ms_per_key, profile.sync_lag_ms, profile.error_rate, profile.tls12_only) == (
        40, 300, 0.01, True)
    assert EmulatedKeySource(key_rate_bps=1).device_profile().max_key_size == 65536  # today's twin


class Device:
    def __init__(self, pki, processes, profile: dict):
        self.ports = {"a": free_port(), "b": free_port(), "admin": free_port()}
        proc = processes.start("vqkd.km.emulator", {
            "link": LINK, "key_rate_bps": 1e7, "qber": 0.0, "admin_listen": f"127.0.0.1:{self.ports['admin']}",
            "device": profile,
            "ends": {end: {"listen": f"127.0.0.1:{self.ports[end]}", "sae_id": SAE[end], "client": KM[end].uri,
                           "kme_id": f"kme-{end}", "tls": pki.paths(identity.module(LINK, end))} for end in "ab"},
        }, "device")
        for port in self.ports.values():
            wait_for_port(port, proc=proc)
        self.tls = {end: pki.files(KM[end]) for end in "ab"}

    def client(self, end: str) -> ETSI014Client:
        return ETSI014Client(f"https://127.0.0.1:{self.ports[end]}", self.tls[end], timeout_s=10)

    def control(self, **changes) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports['admin']}/control",
                                     data=json.dumps(changes).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def tls_version(self, end: str, minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> str:
        ctx = client_context(self.tls[end])
        ctx.minimum_version = minimum
        with socket.create_connection(("127.0.0.1", self.ports[end]), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
                return conn.version()


async def test_a_slow_slave_end_answers_one_request_at_a_time(pki, processes):
    device = Device(pki, processes, {"slave_latency_ms_per_key": 20})
    async with device.client("a") as a, device.client("b") as b:
        drawn = [await a.enc_keys(SAE["b"], 10, 256) for _ in range(2)]
        started = time.monotonic()
        got = await asyncio.gather(*(b.dec_keys(SAE["a"], [k for k, _ in keys]) for keys in drawn))
        elapsed = time.monotonic() - started
    assert got == drawn
    assert elapsed >= 2 * 10 * 0.020, f"two requests of 10 keys at 20 ms a key took {elapsed:.3f}s"


async def test_refusals_at_the_error_rate_consume_nothing(pki, processes):
    device = Device(pki, processes, {"error_rate": 0.5})
    outcomes = []
    async with device.client("a") as a:
        for _ in range(40):
            try:
                await a.status(SAE["b"])
                outcomes.append("ok")
            except ETSI014Error as e:
                assert e.status == 503 and "emulated device error" in e.message and "nothing was consumed" in e.message
                outcomes.append("refused")
    assert 5 <= outcomes.count("refused") <= 35, outcomes


async def test_one_end_out_of_service_and_back(pki, processes):
    device = Device(pki, processes, {})
    assert device.control(end_outage={"b": True})["end_outage"] == {"a": False, "b": True}
    async with device.client("a") as a, device.client("b") as b:
        assert (await a.status(SAE["b"])).slave_SAE_ID == SAE["b"]
        with pytest.raises(ETSI014Error) as e:
            await b.status(SAE["a"])
        assert e.value.status == 503 and "end b of QKD link dev is out of service" in e.value.message
        device.control(end_outage={"b": False})
        assert (await b.status(SAE["a"])).slave_SAE_ID == SAE["a"]


def test_a_tls12_only_device_negotiates_tls12_with_the_km(pki, processes):
    device = Device(pki, processes, {"tls12_only": True})
    assert device.tls_version("a") == "TLSv1.2"
    with pytest.raises(ssl.SSLError):
        device.tls_version("a", minimum=ssl.TLSVersion.TLSv1_3)
    assert Device(pki, processes, {}).tls_version("b") == "TLSv1.3"
