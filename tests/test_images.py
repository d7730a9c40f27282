"""The container images as `make images` builds them, run as the chart runs them.

From the KM image: one emulated QKD link and two KMs, each a container process on loopback
with real mutual TLS, as the image's user (uid 10001) and with nothing on the root filesystem
writable; applications at both KMs get the same keys over ETSI GS QKD 014. From the operator
image: `vqkd operator --help` and the kopf runtime's imports. Skipped where there is no
container engine or the images are not built.

With buildah (`--isolation chroot`, which shares the host's network) the root filesystem
cannot be mounted read-only, so the image's world-writable folders are covered by read-only
mounts and the test checks that uid 10001 can write nowhere on it; with Docker, `--read-only`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port

from vqkd.km import identity
from vqkd.km.etsi014.client import ETSI014Client, ETSI014Error
from vqkd.km.tls import TLSFiles

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("vqkd_images", ROOT / "tools" / "images.py")
images = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(images)

ENGINE = images.engine()
CONFIG_DIR = Path("/etc/vqkd")  # where the test's configs and certificates appear in the containers
LINK, NODES, SAES = "l1", ("alice", "bob"), {"alice": "sae-alice", "bob": "sae-bob"}
KEYS, KEY_BITS = 4, 256


def _require_images() -> None:
    if ENGINE is None:
        pytest.skip("no container engine: install buildah (Debian: apt-get install buildah debootstrap) or run "
                    "Docker, then `make images`")
    missing = [image for image in images.IMAGES.values() if not images.image_id(ENGINE, image)]
    if missing:
        pytest.skip(f"images not built in {ENGINE}'s storage: {', '.join(missing)}; run `make images`")


class Containers:
    """One working container per image; processes run in it and are stopped when the test ends."""

    def __init__(self, image: str, tmp: Path, volumes: dict[Path, Path]):
        self.image, self.tmp, self.procs = image, tmp, []
        tmp.mkdir(parents=True, exist_ok=True)
        self.volumes = list(volumes.items())
        self.container = None
        if ENGINE == "buildah":
            self.container = subprocess.run([*images.BUILDAH, "from", "--pull=never", image], capture_output=True,
                                            text=True, check=True).stdout.strip()
            covered = tmp / "read-only"
            covered.mkdir(mode=0o555)
            try:
                self.volumes += [(covered, Path(folder)) for folder in self._world_writable()]
            except BaseException:
                self.close()
                raise

    def _world_writable(self) -> list[str]:
        found = subprocess.run(self._argv(["find", "/", "-xdev", "-type", "d", "-perm", "-0002"], user="0:0"),
                               capture_output=True, text=True, check=True)
        return found.stdout.split()

    def _argv(self, argv: list[str], user: str | None = None) -> list[str]:
        mounts = [arg for host, ctr in self.volumes for arg in ("--volume", f"{host}:{ctr}:ro")]
        if ENGINE == "buildah":
            return [*images.BUILDAH, "run", "--isolation", "chroot", *(["--user", user] if user else []),
                    *mounts, self.container, "--", *argv]
        return ["docker", "run", "--rm", "--init", "--network", "host", "--read-only", *mounts, self.image, *argv]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(self._argv(argv), capture_output=True, text=True, timeout=120)

    def start(self, argv: list[str], name: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(self._argv(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.container:
            subprocess.run([*images.BUILDAH, "rm", self.container], capture_output=True)


@pytest.fixture
def km_image(tmp_path, pki):
    _require_images()
    shared = tmp_path / "etc"
    shared.mkdir(mode=0o755)
    containers = Containers(images.IMAGES["km"], tmp_path, {shared: CONFIG_DIR})
    yield containers, shared
    containers.close()


def tls_for(pki, ident: identity.Identity, shared: Path) -> dict[str, str]:
    """The identity's certificate and key where uid 10001 in the container can read them."""
    paths = {}
    for part, source in pki.paths(ident).items():
        target = shared / f"{ident.kind.value}-{ident.name.replace('/', '-')}.{part}"
        shutil.copyfile(source, target)
        target.chmod(0o644)  # a throwaway test key; the chart mounts keys 0440 for group 10001
        paths[part] = str(CONFIG_DIR / target.name)
    return paths


def configs(pki, shared: Path) -> tuple[dict, dict[str, dict], dict[str, int]]:
    ports = {name: free_port() for name in ("end-a", "end-b", "admin", *(f"{n}-{p}" for n in NODES
                                                                           for p in ("etsi014", "grpc", "metrics")))}
    ends = dict(zip("ab", NODES))
    link = {
        "link": LINK, "key_rate_bps": 1e6, "qber": 0.01, "admin_listen": f"127.0.0.1:{ports['admin']}",
        "ends": {end: {"listen": f"127.0.0.1:{ports[f'end-{end}']}", "sae_id": node, "client": identity.km(node).uri,
                       "kme_id": f"{LINK}-{end}", "tls": tls_for(pki, identity.module(LINK, end), shared)}
                 for end, node in ends.items()},
    }
    kms = {}
    for end, node in ends.items():
        peer = ends["b" if end == "a" else "a"]
        kms[node] = {
            "node": node, "kme_id": node, "etsi014_listen": f"127.0.0.1:{ports[f'{node}-etsi014']}",
            "grpc_listen": f"127.0.0.1:{ports[f'{node}-grpc']}", "metrics_listen": f"127.0.0.1:{ports[f'{node}-metrics']}",
            "tls": tls_for(pki, identity.km(node), shared),
            "topology": {
                "saes": {sae: n for n, sae in SAES.items()},
                "links": [{"name": LINK, "peer_node": peer, "peer_kme_id": peer,
                           "peer_grpc": f"127.0.0.1:{ports[f'{peer}-grpc']}",
                           "module_url": f"https://127.0.0.1:{ports[f'end-{end}']}",
                           "module_sae_id": node, "peer_module_sae_id": peer, "block_bits": 8192}],
            },
        }
    return link, kms, ports


async def matching_keys(pki, ports: dict[str, int]) -> None:
    def client(node: str) -> ETSI014Client:
        files = TLSFiles(*(Path(p) for p in pki.paths(identity.sae(SAES[node])).values()))
        return ETSI014Client(f"https://127.0.0.1:{ports[f'{node}-etsi014']}", files, timeout_s=10)

    async with client("alice") as alice, client("bob") as bob:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            try:
                sent = await alice.enc_keys(SAES["bob"], KEYS, KEY_BITS)
                break
            except ETSI014Error as e:  # 503 until the KMs drew key from the link
                assert e.status == 503 and loop.time() < deadline, e
                await asyncio.sleep(0.2)
        assert len(sent) == KEYS and all(len(key) == KEY_BITS // 8 for _, key in sent)
        assert await bob.dec_keys(SAES["alice"], [key_id for key_id, _ in sent]) == sent


def test_km_image_serves_matching_keys_from_an_emulated_link(km_image, pki):
    containers, shared = km_image
    probe = containers.run(["sh", "-c", "id -u; find / -xdev -writable 2>/dev/null"])
    assert probe.returncode in (0, 1), probe.stderr  # find exits 1 over folders it may not read
    uid, *writable = probe.stdout.split()
    assert uid == "10001" and writable == []

    link, kms, ports = configs(pki, shared)
    for name, config in {"link": link, **kms}.items():
        (shared / f"{name}.json").write_text(json.dumps(config))
    procs = {"link": containers.start(["python", "-P", "-m", "vqkd.km.emulator", "--config",
                                       str(CONFIG_DIR / "link.json")], "link")}
    try:
        for port in ("end-a", "end-b", "admin"):
            wait_for_port(ports[port], timeout=60, proc=procs["link"])
        for node in NODES:
            procs[node] = containers.start(["python", "-P", "-m", "vqkd.km", "--config", str(CONFIG_DIR / f"{node}.json")],
                                           node)
        for node in NODES:
            wait_for_port(ports[f"{node}-etsi014"], timeout=60, proc=procs[node])
        asyncio.run(matching_keys(pki, ports))
    except BaseException:
        print("\n".join(f"--- {name}\n{containers.log(name)[-3000:]}" for name in procs))
        raise
    assert all(proc.poll() is None for proc in procs.values())


def test_operator_image_runs_the_operator_and_km_image_has_none_of_it(tmp_path):
    _require_images()
    operator = Containers(images.IMAGES["operator"], tmp_path / "operator", {})
    km = None
    try:
        out = operator.run(["vqkd", "operator", "--help"])
        assert out.returncode == 0 and "--namespace" in out.stdout, out.stderr
        out = operator.run(["python", "-P", "-c", "import os, vqkd.operator.kopf.main; print(os.getuid())"])
        assert (out.returncode, out.stdout.strip()) == (0, "10001"), out.stderr
        km = Containers(images.IMAGES["km"], tmp_path / "km", {})
        out = km.run(["vqkd", "operator"])
        assert out.returncode != 0 and "pip install 'vqkd[operator]'" in out.stderr, out.stderr
    finally:
        operator.close()
        if km:
            km.close()
