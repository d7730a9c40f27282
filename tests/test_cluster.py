"""The operator on a real cluster (opt-in): skipped unless VQKD_KUBECONFIG names a kubeconfig.

The test installs the Helm chart (helm/vqkd) into VQKD_NAMESPACE (default ``vqkd``) as
release ``vqkd-test`` and uninstalls it afterwards; set VQKD_SKIP_HELM=1 when the cluster
already runs the operator there. The cluster must be able to pull the images. The test
applies a two-node network with a declared session, waits for the KMs and the session,
then deletes everything and checks that finalizers are released and the children are gone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from vqkd.operator.kopf.kube import DEPLOYMENTS, SERVICES, STATEFULSETS, VQKD, Kube, KubeError

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not os.environ.get("VQKD_KUBECONFIG"), reason="set VQKD_KUBECONFIG to run against a cluster"),
    pytest.mark.timeout(900),
]

READY_TIMEOUT_S = 600.0  # image pulls on a fresh cluster
GONE_TIMEOUT_S = 120.0


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(2)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s; last seen: {last!r}")


CHART = Path(__file__).resolve().parent.parent / "helm" / "vqkd"


def helm(*args: str) -> None:
    binary = shutil.which("helm") or str(Path(sys.executable).parent / "helm")  # `make tools` puts it in .venv/bin
    subprocess.run([binary, "--kubeconfig", os.environ["VQKD_KUBECONFIG"], *args], check=True, timeout=900)


@pytest.fixture(scope="module")
def chart():
    """The operator as users install it: the Helm chart, waited for until it is ready."""
    if os.environ.get("VQKD_SKIP_HELM"):
        yield
        return
    namespace = os.environ.get("VQKD_NAMESPACE", "vqkd")
    helm("upgrade", "--install", "vqkd-test", str(CHART), "--namespace", namespace, "--create-namespace",
         "--wait", "--timeout", "10m")
    try:
        yield
    finally:
        helm("uninstall", "vqkd-test", "--namespace", namespace, "--wait")


@pytest.fixture
def kube(chart):
    client = Kube.connect(os.environ["VQKD_KUBECONFIG"], os.environ.get("VQKD_NAMESPACE", "vqkd"))
    try:
        client.list(VQKD["QKDNode"])
    except KubeError as e:
        pytest.fail(f"the vqkd CRDs are not usable in namespace {client.namespace} ({e}); install crds/ and the "
                    "operator first")
    yield client
    client.close()


def network(suffix: str) -> list[dict]:
    a, b, link, user, session = (f"{name}-{suffix}" for name in ("alice", "bob", "ab", "demo", "s"))
    meta = lambda name: {"name": name}  # noqa: E731
    return [
        {"apiVersion": "vqkd.io/v1alpha1", "kind": "QKDNode", "metadata": meta(a), "spec": {"saeIds": [f"sae-{a}"]}},
        {"apiVersion": "vqkd.io/v1alpha1", "kind": "QKDNode", "metadata": meta(b), "spec": {"saeIds": [f"sae-{b}"]}},
        {"apiVersion": "vqkd.io/v1alpha1", "kind": "QKDLink", "metadata": meta(link),
         "spec": {"nodes": [a, b], "emulated": {"keyRateBps": 1000000, "qber": 0.02}}},
        {"apiVersion": "vqkd.io/v1alpha1", "kind": "UserProfile", "metadata": meta(user),
         "spec": {"saeIds": [f"sae-{a}", f"sae-{b}"]}},
        {"apiVersion": "vqkd.io/v1alpha1", "kind": "KeySession", "metadata": meta(session),
         "spec": {"user": user, "source": {"node": a, "saeId": f"sae-{a}"},
                  "destination": {"node": b, "saeId": f"sae-{b}"}, "qos": {"minBps": 1024}}},
    ]


def test_a_two_node_network_runs_and_is_removed_cleanly(kube):
    suffix = uuid.uuid4().hex[:6]
    resources = network(suffix)
    for resource in resources:
        kube.create(VQKD[resource["kind"]], resource)
    try:
        nodes = [r["metadata"]["name"] for r in resources if r["kind"] == "QKDNode"]
        for node in nodes:
            wait_for(lambda: (kube.get(VQKD["QKDNode"], node) or {}).get("status", {}).get("phase") == "Running",
                     READY_TIMEOUT_S, f"QKDNode {node} Running")
        session = f"s-{suffix}"
        status = wait_for(lambda: (s := (kube.get(VQKD["KeySession"], session) or {}).get("status", {}))
                          .get("phase") == "Active" and s, READY_TIMEOUT_S, f"KeySession {session} Active")
        assert status["path"] == nodes and uuid.UUID(status["sessionId"])
        link = wait_for(lambda: (kube.get(VQKD["QKDLink"], f"ab-{suffix}") or {}).get("status", {})
                        .get("keyRateBps"), READY_TIMEOUT_S, "the link's key rate measured")
        assert link > 0
    finally:
        for resource in reversed(resources):
            kube.delete(VQKD[resource["kind"]], resource["metadata"]["name"])
    for resource in resources:
        kind, name = resource["kind"], resource["metadata"]["name"]
        wait_for(lambda: kube.get(VQKD[kind], name) is None, GONE_TIMEOUT_S, f"{kind} {name} deleted")
    for kind, name in [(STATEFULSETS, f"vqkd-km-{n}") for n in nodes] + [(SERVICES, f"vqkd-km-{nodes[0]}"),
                                                                       (DEPLOYMENTS, f"vqkd-link-ab-{suffix}")]:
        wait_for(lambda: kube.get(kind, name) is None, GONE_TIMEOUT_S, f"{kind.kind} {name} removed")
