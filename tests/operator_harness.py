"""A cluster stand-in for the operator tests: an API server, the operator, and a "kubelet".

- ``ApiServer``: the kmock Kubernetes emulator on a loopback port, in a thread of its own,
  with the vqkd CRDs registered and a kubeconfig pointing at it. ``FilledEmulator`` fills
  what a real API server fills and kmock does not (namespace, uid, creationTimestamp,
  resourceVersion, generation, names from generateName), and records when each StatefulSet
  was written.
- ``InProcessOperator``: the operator run by ``vqkd.operator.kopf.main.operate``, exactly as
  ``vqkd operator`` runs it, in a thread with its own event loop; it can be stopped and
  started again.
- ``Kubelet``: no controllers run in the emulator, so this stands in for the pods: real KM
  and emulated-module processes on loopback (a ``LocalNetwork``), restarted when the
  operator replaces a pod (a new StatefulSet or Deployment, or any change of its pod
  template, as a ``restartedAt`` stamp), and started when the workload appears and its
  process is not running.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jsonpatch
import kmock
import yaml
from kmock._internal import dicts as kmock_dicts

from vqkd.operator.kopf.kube import DEPLOYMENTS, STATEFULSETS, Kube
from vqkd.operator.kopf.main import operate
from vqkd.operator.kopf.runtime import OperatorOptions
from vqkd.operator.kopf.manifests import KM_PREFIX, LINK_PREFIX
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.resources.models import API_GROUP, API_VERSION_NAME, KINDS

VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]
KEEP_REQUESTS = 8


class FilledEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the metadata a real API server maintains."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        # (time.monotonic() when the API server took it, name, the object as written) of every
        # StatefulSet create and update, in order.
        self.statefulset_writes: list[tuple[float, str, dict[str, Any]]] = []

    async def _handle(self, request: kmock.Request):
        # kmock keeps every request for assertions and scans them all to route each new one,
        # which grows quadratic over an operator's thousands of calls; nothing here asserts
        # on past requests. The request being routed is the last one kept.
        del self._requests[:-KEEP_REQUESTS]
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(request.data, dict):
            self._fill_created(request)
        elif request.resource is not None and request.action == kmock.action.UPDATE and request.name:
            self._fill_updated(request)
        elif request.resource is not None and request.action == kmock.action.DELETE and request.name:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                # Marking an object for deletion is a change too: its watchers must see it as new.
                self.objects[key].patch({"metadata": {"resourceVersion": str(next(self._versions))}})
        return await super()._handle(request)

    async def _serve_list(self, request: kmock.Request):
        listing = await super()._serve_list(request)
        listing["metadata"]["resourceVersion"] = str(max(self._latest(listing["items"]), 0))
        return listing

    async def _serve_watch(self, request: kmock.Request):
        """kmock replays every existing object as ADDED to each new watch; a client that listed
        first (kopf) would see stale copies of what it already handled. Like an API server,
        start after the resourceVersion the client asks for."""
        since = request.params.get("resourceVersion", "")
        since = int(since) if since.isdigit() else -1
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and event.get("type") == "ADDED" and \
                    self._latest([event.get("object", {})]) <= since:
                continue
            yield event

    @staticmethod
    def _latest(objects) -> int:
        versions = [obj.get("metadata", {}).get("resourceVersion", "") for obj in objects]
        return max((int(v) for v in versions if str(v).isdigit()), default=-1)

    def _fill_created(self, request: kmock.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta["namespace"] = request.namespace or meta.get("namespace")
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1
        self._written(request, request.data)

    def _fill_updated(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # the parent answers 404
        current = dict(self.objects[key].raw)
        version = str(next(self._versions))
        if isinstance(request.data, dict):
            changed = kmock_dicts.patch_dict(copy.deepcopy(current), request.data)
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = version
            if request.subresource is None and changed.get("spec") != current.get("spec"):
                meta["generation"] = current.get("metadata", {}).get("generation", 1) + 1
        elif isinstance(request.data, list):
            try:
                changed = kmock_dicts.patch_dict(copy.deepcopy(current), request.data)
            except jsonpatch.JsonPatchException as e:
                # A failed "test" op (kopf tests resourceVersion): 422, as an API server answers.
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from None
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            if request.subresource is None and changed.get("spec") != current.get("spec"):
                request.data.append({"op": "add", "path": "/metadata/generation",
                                     "value": current.get("metadata", {}).get("generation", 1) + 1})
        else:
            return  # no body to apply: the parent answers
        if request.subresource is None:
            self._written(request, changed)

    def _written(self, request: kmock.Request, written: dict[str, Any]) -> None:
        if request.resource.plural == STATEFULSETS.plural:
            self.statefulset_writes.append((time.monotonic(), written["metadata"]["name"], copy.deepcopy(written)))


class ApiServer:
    """The emulator served on 127.0.0.1 from a background thread."""

    def __init__(self, directory: Path, namespace: str):
        self.directory = directory
        self.namespace = namespace
        self.kubeconfig = directory / "kubeconfig"
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self.emulator: FilledEmulator | None = None
        self.thread = threading.Thread(target=self._run, name="kmock", daemon=True)

    def start(self) -> ApiServer:
        self.thread.start()
        if not self._ready.wait(15):
            raise TimeoutError("the kmock API server did not start within 15 s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to start()
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        emulator = FilledEmulator()
        emulator.resources.load_bundled()
        for kind, info in KINDS.items():
            emulator.resources[f"{API_GROUP}/{API_VERSION_NAME}/{info.plural}"] = kmock.ResourceInfo(
                namespaced=True, kind=kind, singular=info.singular, verbs=VERBS, shortnames=info.short_names,
                categories=info.categories, subresources={"status"})
        self.emulator = emulator
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with emulator, kmock.Server(emulator) as server:
            self.url = str(server.url).rstrip("/")
            self.kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                "users": [{"name": "tester", "user": {"token": "kmock-does-not-check"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester",
                                                           "namespace": self.namespace}}],
                "current-context": "kmock",
            }))
            self._ready.set()
            await self._stop.wait()

    def client(self) -> Kube:
        return Kube.connect(str(self.kubeconfig), self.namespace)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)


class InProcessOperator:
    """``operate(options)`` in a thread; ``stop()`` then ``start()`` is an operator restart."""

    def __init__(self, options: OperatorOptions):
        self.options = options
        self.thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def start(self, timeout: float = 30.0) -> None:
        self._stop, ready = threading.Event(), threading.Event()

        def run() -> None:
            try:
                asyncio.run(operate(self.options, stop_flag=self._stop, ready_flag=ready))
            except BaseException as e:
                self.errors.append(e)
                ready.set()

        self.thread = threading.Thread(target=run, name="operator", daemon=True)
        self.thread.start()
        if not ready.wait(timeout) or self.errors:
            raise RuntimeError(f"the operator did not start within {timeout:.0f} s: {self.errors}")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the operator did not stop within {timeout:.0f} s")


class Kubelet:
    """Keeps the processes of a LocalNetwork in step with the workloads in the API server."""

    def __init__(self, kube: Kube, network: LocalNetwork, period_s: float = 0.1):
        self.kube = kube
        self.network = network
        self.period_s = period_s
        self.seen: dict[str, tuple[str, str | None]] = {}
        self.restarts: list[tuple[str, float]] = []  # (process, when it answered again)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kubelet", daemon=True)

    def start(self) -> Kubelet:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._step()
            except BaseException as e:  # surfaced by the tests
                self.errors.append(e)

    def _step(self) -> None:
        for kind, prefix, process_prefix in ((STATEFULSETS, KM_PREFIX, "km-"), (DEPLOYMENTS, LINK_PREFIX, "link-")):
            for workload in self.kube.list(kind):
                meta = workload["metadata"]
                if meta.get("deletionTimestamp") or not meta["name"].startswith(prefix):
                    continue
                process = process_prefix + meta["name"].removeprefix(prefix)
                if process not in self.network.processes:
                    continue
                identity = (meta["uid"], json.dumps(workload["spec"]["template"], sort_keys=True))
                before = self.seen.get(process)
                self.seen[process] = identity
                popen = self.network.processes[process].popen
                running = popen is not None and popen.poll() is None
                if (before is not None and before != identity) or not running:
                    self.network.restart(process)
                    self.restarts.append((process, time.monotonic()))


def manifests(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]
