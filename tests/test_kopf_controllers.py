"""The operator's controllers one by one, without kopf, the emulator or KM processes.

Each controller runs as the operator assembles it (``lifecycle.assemble``), against the
Kubernetes API kept in memory (``MemoryKube``) and KMs kept in memory (``FakeKMs``), with
the real control core; statuses are written by the real status writer.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import logging
import uuid
from typing import Any

import kopf
import pytest
import yaml

from test_control_core import Clock
from test_host import FakeKMs
from vqkd.km import identity
from vqkd.km.config import KMConfig
from vqkd.km.domain.vocabulary import Endpoint
from vqkd.km.v1 import km_pb2
from vqkd.operator.control.access import Credentials
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.kopf.endpoints import LocalEndpoints
from vqkd.operator.kopf.handlers.lifecycle import Operator, assemble
from vqkd.operator.kopf.kube import (
    CONFIGMAPS, DEPLOYMENTS, EVENTS, PODS, SECRETS, SERVICES, STATEFULSETS, VQKD, Kind, Kube, KubeError,
)
from vqkd.operator.kopf.manifests import (
    ANNOTATION_REGISTERED, ANNOTATION_RESTARTED_AT, ANNOTATION_SESSION_ID, ClusterAddressing,
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
            return copy.deepcopy(body)
        if key not in self.objects:
            raise KubeError(404, "NotFound", f"{name} not found", what)
        if method == "GET":
            return copy.deepcopy(self.objects[key])
        if method == "PATCH":
            self.objects[key] = merged(self.objects[key], body)
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


# --- QKDLink ----------------------------------------------------------------------------


async def test_a_link_gets_its_module_pair_and_both_kms_are_pointed_at_it(cluster):
    c = cluster
    await c.accept(NODES + "---" + LINK)
    assert c.kube.has(DEPLOYMENTS, "vqkd-link-ab") and c.kube.has(SECRETS, "vqkd-link-ab-tls")
    assert [link.name for link in c.kms.topology("a").links] == ["ab"]
    assert c.kms.topology("a").links[0].peer_grpc == f"vqkd-km-b.{NAMESPACE}.svc:9443"
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
