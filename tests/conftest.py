"""Shared fixtures: a development CA, free loopback ports and real child processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vqkd.km import identity
from vqkd.km.pki import DevCA
from vqkd.km.tls import TLSFiles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class PKI:
    """A development CA in a temporary directory that issues TLSFiles per identity."""

    def __init__(self, directory: Path):
        self.ca = DevCA.load_or_create(directory)

    def files(self, ident: identity.Identity) -> TLSFiles:
        stem = f"{ident.kind.value}-{ident.name.replace('/', '-')}"
        issued = self.ca.issue(ident, stem)
        return TLSFiles(self.ca.cert_path, issued.cert, issued.key)

    def paths(self, ident: identity.Identity) -> dict[str, str]:
        f = self.files(ident)
        return {"ca": str(f.ca), "cert": str(f.cert), "key": str(f.key)}


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


class Processes:
    """Child processes started by a test; every one is stopped when the test ends."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.procs: list[subprocess.Popen] = []

    def start(self, module: str, config: dict, name: str) -> subprocess.Popen:
        cfg = self.directory / f"{name}.json"
        cfg.write_text(json.dumps(config))
        with open(self.directory / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", module, "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def processes(tmp_path) -> Processes:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
