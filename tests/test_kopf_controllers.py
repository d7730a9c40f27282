"""The operator's controllers one by one, without kopf, the emulator or KM processes.

Each controller runs as the operator assembles it (``lifecycle.assemble``), against the
Kubernetes API kept in memory (``MemoryKube``) and KMs kept in memory (``FakeKMs``), with
the real control core; statuses are written by the real status writer.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import datetime
import itertools
import logging
import uuid
from typing import Any

import kopf
import pytest
import yaml
from cryptography import x509

from conftest import PKI
from test_control_core import Clock
from test_host import FakeKMs
from vqkd.km import identity
from vqkd.km.config import KMConfig
from vqkd.km.domain.vocabulary import Endpoint
from vqkd.km.v1 import km_pb2
from vqkd.operator.control.access import Credentials
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.kopf.endpoints import LocalEndpoints
from vqkd.operator.kopf.handlers.lifecycle import Operator, assemble, restore
from vqkd.operator.kopf.kube import (
    CONFIGMAPS, DEPLOYMENTS, EVENTS, HORIZONTALPODAUTOSCALERS, PODS, SECRETS, SERVICES, STATEFULSETS, VQKD, Kind, Kube,
    KubeError,
)
from vqkd.operator.kopf.manifests import (
    ANNOTATION_CA_HASH, ANNOTATION_REGISTERED, ANNOTATION_RESTARTED_AT, ANNOTATION_SESSION_ID, ClusterAddressing,
    build_km_statefulset, km_server_names, service_hosts, template_hash,
)
from vqkd.operator.kopf.runtime import OperatorOptions

NAMESPACE = "qkd"
NODES = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: a}
spec: {saeIds: [sae-a]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: b}
spec: {saeIds: [sae-b]}
"""
LINK = """
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: ab}
spec:
  nodes: [a, b]
  emulated: {keyRateBps: 100000, qber: 0.01}
"""
USER = """
apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {name: lab}
spec: {saeIds: [sae-a, sae-b]}
"""
SESSION = """
apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata: {name: s}
spec:
  user: lab
  source: {node: a, saeId: sae-a}
  destination: {node: b, saeId: sae-b}
"""


def merged(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merged(result.get(key), value)
    return result


class MemoryKube(Kube):
    """One namespace of a Kubernetes API in memory, answering as a server does (404, 409)."""

    def __init__(self, namespace: str = NAMESPACE):
        super().__init__(api=None, namespace=namespace)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (plural, name) -> object
        self.writes: list[tuple[str, str]] = []  # (plural, name) of each create and patch, in order
        self.refused: set[str] = set()  # plurals whose every call fails
        self._names = itertools.count()

    def _call(self, method, path, what, body=None, content_type=None, query=None):
        plural, _, rest = path.split(f"/namespaces/{self.namespace}/", 1)[1].partition("/")
        name, _, subresource = rest.partition("/")
        if plural in self.refused:
            raise KubeError(500, "InternalError", "refused by the test", what)
        key = (plural, name)
        if method == "GET" and not name:
            return {"items": [copy.deepcopy(o) for (p, _), o in self.objects.items() if p == plural]}
        if method == "POST":
            meta = body.setdefault("metadata", {})
            meta.setdefault("name", f"{meta.get('generateName', '')}{next(self._names)}")
            key = (plural, meta["name"])
            if key in self.objects:
                raise KubeError(409, "AlreadyExists", f"{meta['name']} exists", what)
            meta.update(namespace=self.namespace, uid=str(uuid.uuid4()), generation=1)
            self.objects[key] = copy.deepcopy(body)
            self.writes.append(key)
            return copy.deepcopy(body)
        if key not in self.objects:
            raise KubeError(404, "NotFound", f"{name} not found", what)
        if method == "GET":
            return copy.deepcopy(self.objects[key])
        if method == "PATCH":
            self.objects[key] = merged(self.objects[key], body)
            self.writes.append(key)
            return copy.deepcopy(self.objects[key])
        if method == "DELETE":
            return self.objects.pop(key)
        raise AssertionError(f"unexpected {method} {path}")

    def close(self) -> None:
        pass

    def has(self, kind: Kind, name: str) -> bool:
        return (kind.plural, name) in self.objects

    def body(self, kind: Kind, name: str) -> dict[str, Any]:
        return self.objects[(kind.plural, name)]

    def status(self, kind: str, name: str) -> dict[str, Any]:
        return self.body(VQKD[kind], name).get("status", {})

    def condition(self, kind: str, name: str, type: str) -> dict[str, Any]:
        return next(c for c in self.status(kind, name)["conditions"] if c["type"] == type)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for (p, _), e in self.objects.items() if p == EVENTS.plural and e["involvedObject"]["name"] == name]


class Cluster:
    """The assembled operator, its API and its KMs, and a way to create resources."""

    def __init__(self, operator: Operator, kube: MemoryKube, kms: FakeKMs, clock: Clock):
        self.operator, self.kube, self.kms, self.clock = operator, kube, kms, clock
        self.runtime = operator.runtime

    def create(self, text: str) -> list[dict[str, Any]]:
        return [self.kube.create(VQKD[doc["kind"]], doc) for doc in yaml.safe_load_all(text) if doc]

    def body(self, kind: str, name: str) -> dict[str, Any]:
        return self.kube.body(VQKD[kind], name)

    async def accept(self, text: str) -> None:
        """Create the resources and hand them to their controllers, as kopf would."""
        op = self.operator
        for body in self.create(text):
            kind, name = body["kind"], body["metadata"]["name"]
            if kind == "QKDNode":
                await op.nodes.reconcile(body)
                await op.runtime.host.topologies.refresh()
                await op.workloads.node_changed(name)
                await op.replicas.node_changed(name)
            elif kind == "QKDLink":
                await op.links.reconcile(body)
                await op.runtime.host.topologies.refresh()
                await op.workloads.link_changed(name)
            elif kind == "UserProfile":
                await op.users.reconcile(body)
            else:
                await op.sessions.reconcile(body)

    async def shown(self) -> None:
        """Everything marked so far written."""
        await asyncio.sleep(0)
        await self.runtime.status.flush()


async def until(check, what: str, timeout: float = 5.0) -> None:
    """Let the operator's background work run until ``check()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f} s")
        await asyncio.sleep(0.01)


@pytest.fixture
async def cluster(pki):
    kube, kms, clock = MemoryKube(), FakeKMs(), Clock(1000.0)
    endpoints = LocalEndpoints({"nodes": {n: {"grpc": f"127.0.0.1:{p}", "etsi014_url": f"https://127.0.0.1:{p + 1}",
                                               "metrics_url": f"http://127.0.0.1:{p + 2}/metrics"}
                                          for n, p in (("a", 4000), ("b", 5000))}})
    options = OperatorOptions(namespace=NAMESPACE, retry_delay_s=0.1, counts_interval_s=30,
                              admission=AdmissionSettings(peer_wait_s=30))
    operator = assemble(options, kube, endpoints, pki.ca, pki.files(identity.controller()), kms)
    operator.runtime.core.clock = clock
    writer = asyncio.create_task(operator.runtime.status.run())
    yield Cluster(operator, kube, kms, clock)
    writer.cancel()
    await operator.stop()


def km_config(c: Cluster, node: str) -> KMConfig:
    return KMConfig.model_validate_json(c.kube.body(CONFIGMAPS, f"vqkd-km-{node}")["data"]["km.json"])


# --- QKDNode: resource handler, workloads, KM health ----------------------------------


async def test_an_accepted_node_gets_its_km_and_every_km_learns_its_saes(cluster):
    c = cluster
    node_a, node_b = NODES.split("---")
    await c.accept(node_a)
    template = c.kube.body(STATEFULSETS, "vqkd-km-a")["spec"]["template"]
    await c.accept(node_b)
    for node in ("a", "b"):
        for kind in (STATEFULSETS, SERVICES, CONFIGMAPS):
            owner = c.kube.body(kind, f"vqkd-km-{node}")["metadata"]["ownerReferences"][0]
            assert (owner["kind"], owner["uid"]) == ("QKDNode", c.body("QKDNode", node)["metadata"]["uid"])
        assert c.kube.has(SECRETS, f"vqkd-km-{node}-tls")
        assert km_config(c, node).topology is None, "the ConfigMap holds the KM's identity only"
    assert c.kms.topology("a").saes == {"sae-a": "a", "sae-b": "b"}, "a was pushed the SAEs of b when b came"
    assert c.kube.body(STATEFULSETS, "vqkd-km-a")["spec"]["template"] == template, "and its pod left as it was"
    await c.shown()
    assert c.kube.condition("QKDNode", "a", "Configured")["reason"] == "WorkloadApplied"
    ready = c.kube.condition("QKDNode", "a", "Ready")
    assert (ready["status"], ready["reason"], c.kube.status("QKDNode", "a")["phase"]) == (
        "False", "NotPolledYet", "Pending")
    await c.runtime.host.poll()
    await c.shown()
    status = c.kube.status("QKDNode", "a")
    assert (status["phase"], status["ready"], status["endpoints"]["grpc"]) == ("Running", True, "127.0.0.1:4000")


def test_the_topologies_pushed_point_the_kms_at_the_cluster_unless_they_are_a_local_runtimes():
    options = OperatorOptions(namespace=NAMESPACE)
    assert options.km_addressing == ClusterAddressing(NAMESPACE, options.km_control_plane)
    # The processes of `vqkd up`: their own control plane pushes their topologies.
    assert OperatorOptions(namespace=NAMESPACE, endpoints_file="endpoints.json").km_addressing is None


async def test_a_node_refused_gets_a_condition_saying_why_and_no_children(cluster):
    c = cluster
    await c.accept(NODES)
    for text, reason in (("metadata: {name: c}\nspec: {saeIds: ['not an sae id']}", "InvalidSpec"),
                         ("metadata: {name: d}\nspec: {saeIds: [sae-a]}", "Conflict")):
        (body,) = c.create(f"apiVersion: vqkd.io/v1alpha1\nkind: QKDNode\n{text}")
        with pytest.raises(kopf.PermanentError):
            await c.operator.nodes.reconcile(body)
        name = body["metadata"]["name"]
        await c.shown()
        assert c.kube.condition("QKDNode", name, "Ready")["reason"] == reason
        assert c.kube.status("QKDNode", name)["phase"] == "Failed"
        assert not c.kube.has(STATEFULSETS, f"vqkd-km-{name}")
    assert set(c.kms.topology("a").saes) == {"sae-a", "sae-b"}


async def test_a_km_workload_that_cannot_be_applied_waits_and_says_why(cluster):
    c = cluster
    c.kube.refused.add(STATEFULSETS.plural)
    (body,) = c.create(NODES.split("---")[0])
    await c.operator.nodes.reconcile(body)
    with pytest.raises(kopf.TemporaryError, match="applying its KM workload failed"):
        await c.operator.workloads.node_changed("a")
    await c.shown()
    assert c.kube.condition("QKDNode", "a", "Configured")["reason"] == "WorkloadNotApplied"
    c.kube.refused.clear()
    await c.operator.workloads.node_changed("a")
    await c.shown()
    assert c.kube.condition("QKDNode", "a", "Configured")["status"] == "True"


async def test_a_deleted_node_takes_its_km_along_and_the_other_kms_forget_its_saes(cluster):
    c = cluster
    await c.accept(NODES)
    await c.operator.nodes.delete(c.body("QKDNode", "b"))
    await c.runtime.host.topologies.refresh()
    await c.operator.workloads.node_deleted("b")
    assert not any(c.kube.has(kind, "vqkd-km-b") for kind in (STATEFULSETS, SERVICES, CONFIGMAPS))
    assert not c.kube.has(SECRETS, "vqkd-km-b-tls")
    assert c.kms.topology("a").saes == {"sae-a": "a"}
    assert [row["name"] for row in c.runtime.core.nodes()] == ["a"]


class Stopped:
    """kopf's DaemonStopped for ``rounds`` rounds of a daemon."""

    def __init__(self, rounds: int):
        self.rounds, self.waits = rounds, 0

    def __bool__(self) -> bool:
        return self.waits > self.rounds

    async def wait(self, timeout: float | None = None) -> Stopped:
        self.waits += 1
        return self


async def test_a_missing_statefulset_is_created_again_and_the_replacement_timed(cluster):
    c = cluster
    await c.accept(NODES)
    await c.runtime.host.poll()
    c.kube.delete(STATEFULSETS, "vqkd-km-b")
    await c.operator.workloads.guard("b", Stopped(rounds=1), logging.getLogger("guard"))
    assert c.kube.has(STATEFULSETS, "vqkd-km-b")
    c.kms.restart("b")  # the pod of the new StatefulSet
    await c.runtime.host.poll()
    await c.shown()
    assert c.runtime.metrics.registry.get_sample_value("vqkd_operator_km_replacement_seconds_count") == 1
    (replaced,) = [e for e in c.kube.events("b") if e["reason"] == "KMReplaced"]
    assert replaced["message"].startswith("KM replaced in ")
    assert "with its 0 sessions pushed again" in replaced["message"]


async def test_a_km_that_stops_answering_gets_a_new_pod_and_its_node_says_why(cluster):
    c = cluster
    await c.accept(NODES)
    await c.runtime.host.poll()
    c.kms.unreachable.add("a")
    await c.runtime.host.poll()
    await c.shown()
    ready = c.kube.condition("QKDNode", "a", "Ready")
    assert (ready["reason"], c.kube.status("QKDNode", "a")["ready"]) == ("KMUnreachable", False)
    assert "unreachable" in ready["message"]
    assert c.operator.km_health.probe() == {"kms": 2, "answering": 1}
    await c.operator.km_health.replace("a", 0)
    template = c.kube.body(STATEFULSETS, "vqkd-km-a")["spec"]["template"]["metadata"]
    assert ANNOTATION_RESTARTED_AT in template["annotations"]
    c.kube.refused.add(PODS.plural)
    await c.operator.km_health.replace("a", 0)  # refused: counted, retried on a later tick
    assert c.runtime.metrics.registry.get_sample_value("vqkd_operator_errors_total", {"kind": "QKDNode"}) == 1


# --- KM pod template changes, one KM at a time -------------------------------------------

NODE_C = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: c}
spec: {saeIds: [sae-c]}
"""


@pytest.fixture
async def restart(tmp_path):
    """Start the operator again over the same API and KMs, as a new operator process with other
    options or another CA would; it loads every resource as at startup."""
    started: list[tuple[Operator, asyncio.Task]] = []

    async def restarted(c: Cluster, pki: PKI | None = None, **options: Any) -> Cluster:
        runtime = c.runtime
        ca = pki.ca if pki is not None else runtime.ca
        tls = pki.files(identity.controller()) if pki is not None else runtime.host.tls
        operator = assemble(dataclasses.replace(runtime.options, **options), c.kube, runtime.endpoints, ca, tls,
                            c.kms)
        operator.runtime.core.clock = c.clock
        started.append((operator, asyncio.create_task(operator.runtime.status.run())))
        await restore(operator)
        return Cluster(operator, c.kube, c.kms, c.clock)

    yield restarted
    for operator, writer in started:
        writer.cancel()
        await operator.stop()


def templates(c: Cluster) -> dict[str, str]:
    """The pod template of each KM, as its StatefulSet was last written, by node."""
    return {name.removeprefix("vqkd-km-"): template_hash(body) for (plural, name), body in c.kube.objects.items()
            if plural == STATEFULSETS.plural}


def issuer(c: Cluster, secret: str) -> bytes:
    return base64.b64decode(c.kube.body(SECRETS, secret)["data"]["ca.crt"])


def reasons(c: Cluster, node: str) -> list[str]:
    return [e["reason"] for e in c.kube.events(node)]


async def test_a_new_ca_rolls_the_kms_one_at_a_time_each_once_the_one_before_serves_again(cluster, restart, tmp_path):
    """Every KM's TLS Secret is stale under a new CA, so every pod template changes: the KMs are
    written in the order of their names, each once the one before answers as a new instance
    holding its topology; further syncs leave the ones waiting as they are."""
    c = cluster
    await c.accept(NODES + "---" + NODE_C + "---" + LINK)
    await c.runtime.host.poll()
    before = templates(c)
    old_ca = c.runtime.ca.cert_path.read_bytes()
    new_ca = PKI(tmp_path / "new-ca")
    new = await restart(c, new_ca)
    writes = len(c.kube.writes)
    for name in ("c", "b", "a"):  # as kopf resumes them, in no order of ours
        await new.operator.workloads.node_changed(name)
    await new.operator.workloads.link_changed("ab")
    await until(lambda: "KMRolling" in reasons(new, "a"), "the KM of a rolling")
    await new.runtime.host.poll()  # a answers, still as the instance it was
    for name in ("a", "b", "c"):
        await new.operator.workloads.node_changed(name)
    await new.shown()
    assert [node for node, written in templates(new).items() if written != before[node]] == ["a"]
    assert issuer(new, "vqkd-km-a-tls") == new_ca.ca.cert_path.read_bytes()
    assert issuer(new, "vqkd-km-b-tls") == issuer(new, "vqkd-km-c-tls") == old_ca, "issued again in their turn"
    assert [key for key in c.kube.writes[writes:] if key[0] == STATEFULSETS.plural] == [
        (STATEFULSETS.plural, "vqkd-km-a")], "the syncs while a rolls wrote no StatefulSet"
    for node in ("b", "c"):
        configured = c.kube.condition("QKDNode", node, "Configured")
        assert (configured["status"], configured["reason"]) == ("False", "RollPending")
    # Emulated modules are no KMs: their pair restarts at once onto the new CA.
    assert issuer(new, "vqkd-link-ab-tls") == new_ca.ca.cert_path.read_bytes()
    module = c.kube.body(DEPLOYMENTS, "vqkd-link-ab")["spec"]["template"]["metadata"]["annotations"]
    assert module[ANNOTATION_CA_HASH] == new.runtime.ca_hash

    c.kms.restart("a")  # its new pod, with the certificates of the new CA
    await new.runtime.host.poll()
    await until(lambda: templates(new)["b"] != before["b"], "the KM of b rolled")
    assert templates(new)["c"] == before["c"] and issuer(new, "vqkd-km-c-tls") == old_ca
    c.kms.restart("b")
    await new.runtime.host.poll()
    await until(lambda: templates(new)["c"] != before["c"], "the KM of c rolled")
    c.kms.restart("c")
    await new.runtime.host.poll()
    await until(lambda: "KMRolled" in reasons(new, "c"), "the KM of c back")
    await new.shown()
    for node in ("a", "b", "c"):
        assert issuer(new, f"vqkd-km-{node}-tls") == new_ca.ca.cert_path.read_bytes()
        assert identity.from_pem(base64.b64decode(c.kube.body(SECRETS, f"vqkd-km-{node}-tls")["data"]["tls.crt"])) \
            == identity.km(node)
        assert c.kube.condition("QKDNode", node, "Configured")["status"] == "True"
        assert reasons(new, node).count("KMRolling") == reasons(new, node).count("KMRolled") == 1
        assert "KMRollTimedOut" not in reasons(new, node)
    rewritten = [name for plural, name in c.kube.writes[writes:] if plural == STATEFULSETS.plural]
    assert rewritten == ["vqkd-km-a", "vqkd-km-b", "vqkd-km-c"]


async def test_a_km_that_does_not_come_back_holds_the_next_one_back_only_so_long(cluster, restart):
    c = cluster
    await c.accept(NODES)
    await c.runtime.host.poll()
    before = templates(c)
    new = await restart(c, control_plane_address="vqkd-control-plane.elsewhere.svc:9443", km_roll_wait_s=0.3)
    for name in ("a", "b"):
        await new.operator.workloads.node_changed(name)
    await until(lambda: templates(new)["b"] != before["b"], "the KM of b rolled after the wait")
    assert km_config(new, "a").control_plane == km_config(new, "b").control_plane == \
        "vqkd-control-plane.elsewhere.svc:9443"
    await new.shown()
    (timed_out,) = [e for e in c.kube.events("a") if e["reason"] == "KMRollTimedOut"]
    assert timed_out["type"] == "Warning"
    assert timed_out["message"].startswith("the KM was not Ready again 0.3 s after its pod template changed (still the "
                                           "instance it was)")
    assert "KMRolled" not in reasons(new, "a")


async def change_node(c: Cluster, name: str, spec: dict[str, Any]) -> None:
    """Patch a QKDNode's spec and hand it to its controllers, as kopf would."""
    c.kube.patch(VQKD["QKDNode"], name, {"spec": spec})
    await c.operator.nodes.reconcile(c.body("QKDNode", name))
    await c.runtime.host.topologies.refresh()
    await c.operator.workloads.node_changed(name)


async def test_a_nodes_own_change_rolls_at_once_and_a_new_node_never_waits(cluster):
    c = cluster
    await c.accept(NODES)
    await c.runtime.host.poll()
    before = templates(c)
    await change_node(c, "b", {"km": {"resources": {"limits": {"memory": "1Gi"}}}})
    await until(lambda: templates(c)["b"] != before["b"], "the KM of b rolled")
    # While b restarts, a change of a waits for it; a new node gets its KM at once.
    await change_node(c, "a", {"km": {"resources": {"limits": {"memory": "1Gi"}}}})
    await c.accept(NODE_C)
    assert c.kube.has(STATEFULSETS, "vqkd-km-c")
    await c.shown()
    assert templates(c)["a"] == before["a"]
    assert c.kube.condition("QKDNode", "a", "Configured")["reason"] == "RollPending"
    c.kms.restart("b")
    await c.runtime.host.poll()
    await until(lambda: templates(c)["a"] != before["a"], "the KM of a rolled once b was back")
    container = c.kube.body(STATEFULSETS, "vqkd-km-a")["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"memory": "1Gi"}
    # Writing what leaves the template as it is restarts nothing and waits for nothing.
    writes = len(c.kube.writes)
    await c.operator.workloads.node_changed("a")
    assert [key for key in c.kube.writes[writes:] if key[0] == STATEFULSETS.plural] == []


# --- QKDLink ----------------------------------------------------------------------------


async def test_a_link_gets_its_module_pair_and_both_kms_are_pointed_at_it(cluster):
    c = cluster
    await c.accept(NODES + "---" + LINK)
    assert c.kube.has(DEPLOYMENTS, "vqkd-link-ab") and c.kube.has(SECRETS, "vqkd-link-ab-tls")
    assert [link.name for link in c.kms.topology("a").links] == ["ab"]
    assert c.kms.topology("a").links[0].peer_grpc == f"vqkd-km-b-0.vqkd-km-b-dns.{NAMESPACE}.svc:9443"
    await c.runtime.host.poll()
    await c.shown()
    status = c.kube.status("QKDLink", "ab")
    assert (status["state"], c.kube.condition("QKDLink", "ab", "Ready")["status"]) == ("Up", "True")
    await c.operator.links.delete(c.body("QKDLink", "ab"))
    await c.runtime.host.topologies.refresh()
    await c.operator.workloads.link_deleted("ab")
    assert not c.kube.has(DEPLOYMENTS, "vqkd-link-ab") and not c.kube.has(CONFIGMAPS, "vqkd-link-ab")
    assert c.kms.topology("b").links == []


async def test_a_link_to_unregistered_nodes_waits(cluster):
    c = cluster
    (body,) = c.create(LINK)
    with pytest.raises(kopf.TemporaryError):
        await c.operator.links.reconcile(body)
    await c.shown()
    status = c.kube.status("QKDLink", "ab")
    assert status["state"] == "Down" and c.kube.condition("QKDLink", "ab", "Ready")["reason"] == "UnresolvedReference"


# --- KeySession and the records of application sessions -----------------------------


async def test_a_session_waits_until_the_network_can_take_it(cluster):
    c = cluster
    await c.accept(NODES + "---" + USER)
    (body,) = c.create(SESSION)
    with pytest.raises(kopf.TemporaryError, match="no chain of registered QKDLinks joins a and b"):
        await c.operator.sessions.reconcile(body)
    await c.accept(LINK)
    with pytest.raises(kopf.TemporaryError, match="waiting for the first poll of the KMs of a, b"):
        await c.operator.sessions.reconcile(body)
    await c.shown()
    assert c.kube.status("KeySession", "s")["phase"] == "Pending"
    await c.runtime.host.poll()
    await c.operator.sessions.reconcile(body)
    await c.shown()
    status = c.kube.status("KeySession", "s")
    assert (status["phase"], status["path"]) == ("Active", ["a", "b"])
    assert c.kms.holders(status["sessionId"]) == {"a", "b"}
    assert {e["reason"] for e in c.kube.events("s")} >= {"Admitted", "Configured"}
    await c.operator.sessions.delete(c.body("KeySession", "s"))
    assert c.kms.holders(status["sessionId"]) == set()


async def opened(c: Cluster, sae: str, node: str, session_id: str | None = None):
    return await c.runtime.core.open_session(node, Credentials(sae_id=sae), Endpoint("a", "sae-a"),
                                             Endpoint("b", "sae-b"), session_id=session_id)


async def recorded(c: Cluster, name: str, registered: str) -> dict[str, Any]:
    for _ in range(100):
        if c.kube.has(VQKD["KeySession"], name) and \
                c.body("KeySession", name)["metadata"]["annotations"][ANNOTATION_REGISTERED] == registered:
            return c.body("KeySession", name)
        await asyncio.sleep(0.01)
    raise AssertionError(f"KeySession {name} not recorded with {ANNOTATION_REGISTERED}={registered}")


async def test_a_session_an_application_opened_is_recorded_and_its_record_kept_up_to_date(cluster):
    c = cluster
    await c.accept(NODES + "---" + LINK + "---" + USER)
    await c.runtime.host.poll()
    first = await opened(c, "sae-a", "a")
    assert first.accepted and not first.peer_registered
    name = f"app-{first.session_id}"
    record = await recorded(c, name, "source")
    assert record["metadata"]["annotations"][ANNOTATION_SESSION_ID] == first.session_id
    assert record["metadata"]["ownerReferences"][0]["kind"] == "UserProfile"
    assert c.operator.applications.resource_of(first.session_id) == name
    await c.operator.sessions.reconcile(record)  # kopf shows the operator its own record
    await opened(c, "sae-b", "b", first.session_id)
    await recorded(c, name, "source,destination")
    await c.shown()
    assert c.kube.status("KeySession", name)["phase"] == "Active"
    await c.operator.sessions.delete(c.body("KeySession", name))
    assert c.operator.applications.session_of(name) is None
    assert c.kms.holders(first.session_id) == set()


async def test_records_of_ended_sessions_are_collected_after_the_retention(cluster):
    c = cluster
    retention = c.runtime.options.admission.terminated_retention_s
    ended = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=retention + 1)
    (body,) = c.create(SESSION.replace("name: s}", "name: app-old, labels: {vqkd.io/origin: application}}"))
    c.kube.patch(VQKD["KeySession"], "app-old", {"status": {"phase": "Terminated", "conditions": [
        {"type": "Ready", "status": "False", "reason": "Closed", "message": "closed",
         "lastTransitionTime": ended.strftime("%Y-%m-%dT%H:%M:%SZ")}]}})
    await c.operator.applications.collect(c.body("KeySession", "app-old"))
    assert not c.kube.has(VQKD["KeySession"], "app-old")


# --- what the core and monitoring find, shown ------------------------------------------


async def test_transitions_become_events_and_every_round_refreshes_the_links(cluster):
    c = cluster
    await c.accept(NODES + "---" + LINK)
    await c.runtime.host.poll()
    await c.shown()
    c.kms.unreachable.add("b")
    await c.runtime.host.poll()
    await c.shown()
    (down,) = [e for e in c.kube.events("b") if e["reason"] == "KMUnreachable"]
    assert down["type"] == "Warning" and "OPERATING -> DOWN" in down["message"]
    c.kms.unreachable.discard("b")
    c.kms.drawn = {"a": 10_000}
    c.clock.now += 1
    await c.runtime.host.poll()
    await c.shown()
    assert c.kube.status("QKDLink", "ab")["keyRateBps"] == 10_000


async def test_a_link_its_kms_report_down_shows_the_devices_words_and_the_bits_they_burned(cluster):
    c = cluster
    await c.accept(NODES + "---" + LINK)
    await c.runtime.host.poll()
    failing = "QKD module at https://qkd-a:8443 answered 503: laser off"

    async def stats(node: str, replica: int, timeout: float = 2.0) -> km_pb2.Stats:
        return km_pb2.Stats(node=node, incarnation=node, links=[km_pb2.LinkStats(
            link="ab", burned_bits_total={"device_error": 1024},
            **({"state": "Down", "reason": "DeviceUnavailable", "message": failing} if node == "a" else
               {"state": "Up", "reason": "Healthy"}))])

    c.kms.stats = stats
    c.clock.now += 1
    await c.runtime.host.poll()
    await c.shown()
    status = c.kube.status("QKDLink", "ab")
    assert (status["state"], status["reason"], status["burnedBits"]) == ("Down", failing, 2048)
    link_up = c.kube.condition("QKDLink", "ab", "LinkUp")
    assert (link_up["status"], link_up["reason"]) == ("False", "DeviceUnavailable")


async def test_a_km_certificate_without_its_replicas_names_is_issued_again_and_rolls_its_pod(cluster):
    """What a cluster from before KM replicas holds: a KM certificate naming the Service only."""
    c = cluster
    await c.accept(NODES)
    old = c.runtime.ca.issue(identity.km("a"), "before-replicas", server_names=service_hosts("vqkd-km-a", NAMESPACE))
    c.kube.patch(SECRETS, "vqkd-km-a-tls", {"data": {"tls.crt": base64.b64encode(old.cert.read_bytes()).decode()}})
    template = templates(c)["a"]
    await c.operator.workloads.node_changed("a")
    names = x509.load_pem_x509_certificate(base64.b64decode(c.kube.body(SECRETS, "vqkd-km-a-tls")["data"]["tls.crt"]))
    dns = names.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert set(km_server_names("a", NAMESPACE)) <= set(dns)
    assert templates(c)["a"] == template, "the names it is issued for were in the template already"
    other = build_km_statefulset(c.runtime.resources.nodes["a"], "0", "ca", server_names=("vqkd-km-a",))
    assert template_hash(other) != template_hash(
        build_km_statefulset(c.runtime.resources.nodes["a"], "0", "ca", server_names=km_server_names("a", NAMESPACE))
    ), "other names, another pod template: the pod restarts onto the certificate issued for them"


async def test_a_replica_of_several_that_stops_answering_gets_only_its_own_pod_replaced(cluster):
    c = cluster
    await c.accept(NODES.replace("spec: {saeIds: [sae-a]}", "spec: {saeIds: [sae-a], km: {replicas: 2}}"))
    assert c.kube.body(STATEFULSETS, "vqkd-km-a")["spec"]["replicas"] == 2
    for replica in (0, 1):
        c.kube.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"vqkd-km-a-{replica}"}})
    await c.operator.km_health.replace("a", 1)
    assert c.kube.has(PODS, "vqkd-km-a-0") and not c.kube.has(PODS, "vqkd-km-a-1")
    # Restamping the template would restart the healthy replica too.
    template = c.kube.body(STATEFULSETS, "vqkd-km-a")["spec"]["template"]["metadata"]
    assert ANNOTATION_RESTARTED_AT not in template["annotations"]


AUTOSCALED = NODES.replace("spec: {saeIds: [sae-a]}", """spec:
  saeIds: [sae-a]
  km: {autoscaling: {minReplicas: 2, maxReplicas: 5, target: {cpuUtilization: 70}}}""")


async def change(c: Cluster, name: str, spec: dict[str, Any]) -> None:
    """A change to a node's spec, handled as kopf's update handler does."""
    body = c.kube.patch(VQKD["QKDNode"], name, {"spec": spec})
    await c.operator.nodes.reconcile(body)
    await c.runtime.host.topologies.refresh()
    await c.operator.workloads.node_changed(name)
    await c.operator.replicas.node_changed(name)


async def test_autoscaling_gets_the_node_a_horizontal_pod_autoscaler_it_owns_until_it_goes(cluster):
    c = cluster
    await c.accept(AUTOSCALED)
    hpa = c.kube.body(HORIZONTALPODAUTOSCALERS, "vqkd-km-a")
    assert (hpa["apiVersion"], hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == ("autoscaling/v2", 2, 5)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "vqkd.io/v1alpha1", "kind": "QKDNode", "name": "a"}
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
    owner = hpa["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("QKDNode", c.body("QKDNode", "a")["metadata"]["uid"],
                                                                 True)
    assert not c.kube.has(HORIZONTALPODAUTOSCALERS, "vqkd-km-b")
    # The target changed: the autoscaler follows, on requests per second through the adapter's metric.
    await change(c, "a", {"km": {"autoscaling": {"maxReplicas": 3, "target": {"cpuUtilization": None,
                                                                             "requestsPerSecond": 200}}}})
    hpa = c.kube.body(HORIZONTALPODAUTOSCALERS, "vqkd-km-a")
    assert hpa["spec"]["maxReplicas"] == 3
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "vqkd_km_responses_per_second"}, "target": {"type": "AverageValue", "averageValue": "200"}}}]
    # What the autoscaler does, through the scale subresource: the StatefulSet follows spec.km.replicas.
    await change(c, "a", {"km": {"replicas": 3}})
    assert c.kube.body(STATEFULSETS, "vqkd-km-a")["spec"]["replicas"] == 3
    await change(c, "a", {"km": {"autoscaling": None}})
    assert not c.kube.has(HORIZONTALPODAUTOSCALERS, "vqkd-km-a")
    assert c.kube.body(STATEFULSETS, "vqkd-km-a")["spec"]["replicas"] == 3, "replicas stay as the autoscaler left them"


async def test_a_deleted_node_takes_its_autoscaler_along(cluster):
    c = cluster
    await c.accept(AUTOSCALED)
    await c.operator.nodes.delete(c.body("QKDNode", "a"))
    await c.operator.workloads.node_deleted("a")
    await c.operator.replicas.node_deleted("a")
    assert not c.kube.has(HORIZONTALPODAUTOSCALERS, "vqkd-km-a")


async def test_an_autoscaler_that_cannot_be_applied_is_retried_and_counted(cluster):
    c = cluster
    c.kube.refused.add(HORIZONTALPODAUTOSCALERS.plural)
    with pytest.raises(kopf.TemporaryError, match="applying its HorizontalPodAutoscaler failed"):
        await c.accept(AUTOSCALED)
    assert c.runtime.metrics.registry.get_sample_value("vqkd_operator_errors_total", {"kind": "QKDNode"}) == 1


async def test_the_node_shows_the_replicas_its_statefulset_reports_and_their_selector(cluster):
    c = cluster
    await c.accept(NODES)
    await change(c, "a", {"km": {"replicas": 3}})
    await c.shown()
    status = c.kube.status("QKDNode", "a")
    assert (status["replicas"], status["readyReplicas"]) == (0, 0)
    assert status["selector"] == "app.kubernetes.io/instance=a,app.kubernetes.io/name=vqkd-km"
    statefulset = c.kube.patch(STATEFULSETS, "vqkd-km-a", {"status": {"replicas": 3, "readyReplicas": 2}})
    c.operator.replicas.statefulset_seen("MODIFIED", statefulset)
    await c.shown()
    status = c.kube.status("QKDNode", "a")
    assert (status["replicas"], status["readyReplicas"]) == (3, 2)
    assert c.kube.status("QKDNode", "b")["replicas"] == 0
    c.operator.replicas.statefulset_seen("DELETED", statefulset)
    await c.shown()
    assert (c.kube.status("QKDNode", "a")["replicas"], c.kube.status("QKDNode", "a")["readyReplicas"]) == (0, 0)
