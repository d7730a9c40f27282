"""What the operator creates for each resource, as plain manifests (dicts), built by pure functions.

A QKDNode becomes its KM: a ConfigMap with the KM's configuration (``KMConfig`` JSON, the
same file ``python -m vqkd.km --config`` reads in the local runtime), a Secret with its TLS
identity, a StatefulSet of ``spec.km.replicas`` pods, the Service its SAEs reach (any
replica answers), a headless Service giving each replica a DNS name of its own (its peers and
siblings reach one replica), and, with ``spec.km.autoscaling``, a HorizontalPodAutoscaler
scaling the QKDNode. A QKDLink with an emulated key source becomes the emulated QKD module
pair: a ConfigMap (``EmulatedLinkConfig``), a Secret with both ends' identities, a Service
and a one-replica Deployment. Names derive from the
resource names only, so a child is found again after any restart.

The configurations themselves come from the network plan (``vqkd.operator.plan``), the same
one the local runtime uses; ``ClusterAddressing`` tells it where things are in a cluster,
from the ports, Service names and mount paths the manifests below declare.

Nothing here talks to Kubernetes or reads the clock; the handlers add owner references and
apply the result, and the tests check these functions without a cluster.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from vqkd.km.config import EmulatedLinkConfig, KMConfig, TLSPaths
from vqkd.operator.plan import End, KMAddress, ModuleAddress
from vqkd.operator.resources.models import API_VERSION, DEFAULT_KM_IMAGE, QKDNode

# --- names, labels, ports -----------------------------------------------------------

KM_PREFIX = "vqkd-km-"
LINK_PREFIX = "vqkd-link-"
MAX_NAME = 63  # Service names are DNS-1035 labels

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NODE = "vqkd.io/node"
LABEL_LINK = "vqkd.io/link"
LABEL_ORIGIN = "vqkd.io/origin"
MANAGED_BY = "vqkd-operator"
ORIGIN_APPLICATION = "application"

# Changing a child's desired manifest changes this hash; the operator patches only then.
ANNOTATION_SPEC_HASH = "vqkd.io/spec-hash"
# On a pod template: the configuration the pod runs, so a new configuration rolls it out.
ANNOTATION_CONFIG_HASH = "vqkd.io/config-hash"
# On a pod template: the CA its TLS Secret is issued from, so a new CA rolls the pod onto
# certificates the new CA issued.
ANNOTATION_CA_HASH = "vqkd.io/ca-hash"
# On a KM's pod template: the names its certificate is issued for, so a certificate issued
# again for new names (a KM from before replicas lacks the replicas' names) rolls the pod onto it.
ANNOTATION_SERVER_NAMES_HASH = "vqkd.io/server-names-hash"
# On a KM's StatefulSet: the hash of the pod template as the operator wrote it (the API
# server adds defaults to what it returns), so a write that would restart the KM is told
# apart from one that would not.
ANNOTATION_TEMPLATE_HASH = "vqkd.io/template-hash"
# On a pod template: set when the operator replaces an unhealthy KM (as `kubectl rollout restart`).
ANNOTATION_RESTARTED_AT = "vqkd.io/restartedAt"
# Set by the StatefulSet controller on each pod: the pod's ordinal, which is the KM's replica.
LABEL_POD_INDEX = "apps.kubernetes.io/pod-index"
REPLICA_ENV = "VQKD_KM_REPLICA"
# On a KeySession the operator created for a session an application opened at a KM.
ANNOTATION_SESSION_ID = "vqkd.io/session-id"
# On the same KeySession: the ends whose applications have opened it ("source", "destination"
# or both, comma-separated), so a restarted operator restores a session still waiting for its
# peer as waiting.
ANNOTATION_REGISTERED = "vqkd.io/registered"

# The Pods metric a custom-metrics adapter serves from the KMs' vqkd_km_responses_total (helm/vqkd/README.md).
KM_REQUESTS_METRIC = "vqkd_km_responses_per_second"

KM_ETSI014_PORT = 8443
KM_GRPC_PORT = 9443
KM_METRICS_PORT = 9090
MODULE_PORTS = {"a": 8443, "b": 8444}
MODULE_ADMIN_PORT = 9100
CONTROL_PLANE_PORT = 9443
CONTROL_PLANE_SERVICE = "vqkd-control-plane"

CONFIG_DIR = PurePosixPath("/etc/vqkd/config")
TLS_DIR = PurePosixPath("/etc/vqkd/tls")
MODULE_CREDENTIALS_DIR = PurePosixPath("/etc/vqkd/modules")
KM_CONFIG_FILE = "km.json"
MODULE_CONFIG_FILE = "emulator.json"
RUN_AS_USER = 10001


def km_name(node: str) -> str:
    """StatefulSet, Service and ConfigMap of a node's KM."""
    return f"{KM_PREFIX}{node}"


def km_tls_secret(node: str) -> str:
    return f"{km_name(node)}-tls"


def km_replicas_service(node: str) -> str:
    """The headless Service governing the KM's StatefulSet: a DNS name per replica."""
    return f"{km_name(node)}-dns"


def km_autoscaler(node: str) -> str:
    """The HorizontalPodAutoscaler of a node with ``spec.km.autoscaling``."""
    return km_name(node)


def module_name(link: str) -> str:
    """Deployment, Service and ConfigMap of a link's emulated module pair."""
    return f"{LINK_PREFIX}{link}"


def module_tls_secret(link: str) -> str:
    return f"{module_name(link)}-tls"


def km_pod(node: str, replica: int = 0) -> str:
    """The pod of one KM replica: its StatefulSet's pod of that ordinal."""
    return f"{km_name(node)}-{replica}"


def name_problem(kind: str, name: str) -> str | None:
    """Why ``name`` cannot name a vqkd resource whose children carry a prefix, or None."""
    prefix = KM_PREFIX if kind == "QKDNode" else LINK_PREFIX
    longest = MAX_NAME - len(prefix) - len("-tls")  # as long as "-dns", and longer than a pod's "-15"
    if len(name) > longest:
        return (f"{kind} {name}: metadata.name must be at most {longest} characters (its children are named "
                f"{prefix}{name}-…, and Kubernetes names are at most {MAX_NAME}), got {len(name)}")
    return None


def service_hosts(service: str, namespace: str, cluster_domain: str = "cluster.local") -> tuple[str, ...]:
    """Every DNS name a Service answers to inside the cluster, shortest first."""
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.{cluster_domain}")


def service_host(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.svc"


def km_replica_host(node: str, replica: int, namespace: str) -> str:
    """The DNS name of one KM replica's pod, from the headless Service."""
    return f"{km_pod(node, replica)}.{service_host(km_replicas_service(node), namespace)}"


def km_server_names(node: str, namespace: str, cluster_domain: str = "cluster.local") -> tuple[str, ...]:
    """Every name a node's KM is reached by, for its certificate: its Service's names and any replica's."""
    replicas = km_replicas_service(node)
    return service_hosts(km_name(node), namespace, cluster_domain) + (
        f"*.{service_host(replicas, namespace)}", f"*.{service_host(replicas, namespace)}.{cluster_domain}")


def km_selector(node: str) -> str:
    """The label selector of a node's KM pods in its string form (the scale subresource's)."""
    return ",".join(f"{key}={value}" for key, value in sorted(_selector(node_labels(node)).items()))


def control_plane_address(namespace: str) -> str:
    """Where the KMs of a namespace reach the operator's ControlPlane service."""
    return f"{service_host(CONTROL_PLANE_SERVICE, namespace)}:{CONTROL_PLANE_PORT}"


def node_labels(node: str) -> dict[str, str]:
    return {LABEL_NAME: "vqkd-km", LABEL_INSTANCE: node, LABEL_COMPONENT: "key-manager",
            LABEL_MANAGED_BY: MANAGED_BY, LABEL_NODE: node}


def link_labels(link: str) -> dict[str, str]:
    return {LABEL_NAME: "vqkd-qkd-module", LABEL_INSTANCE: link, LABEL_COMPONENT: "emulated-qkd-module",
            LABEL_MANAGED_BY: MANAGED_BY, LABEL_LINK: link}


def _selector(labels: Mapping[str, str]) -> dict[str, str]:
    # Only the labels that never change: a workload's selector is immutable.
    return {key: labels[key] for key in (LABEL_NAME, LABEL_INSTANCE)}


def content_hash(value: Any) -> str:
    """A short stable digest of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_spec_hash(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest annotated with the hash of itself (without that annotation)."""
    annotations = manifest["metadata"].setdefault("annotations", {})
    annotations.pop(ANNOTATION_SPEC_HASH, None)
    annotations[ANNOTATION_SPEC_HASH] = content_hash(manifest)
    return manifest


# --- where the processes are ------------------------------------------------------


def _listen(port: int) -> str:
    return f"0.0.0.0:{port}"


def _tls_paths(ca: str, cert: str, key: str) -> TLSPaths:
    """Files of the TLS Secret as mounted in the pod."""
    return TLSPaths(ca=str(TLS_DIR / ca), cert=str(TLS_DIR / cert), key=str(TLS_DIR / key))


@dataclass(frozen=True)
class ClusterAddressing:
    """The network plan's addressing in a cluster: each process behind its Service's DNS name at the
    fixed ports of the manifests below, with the TLS files of the Secrets its pod mounts. A node's
    SAEs reach its KMs through the node's Service (any replica answers); the control plane, the
    peers and the siblings reach one replica at its pod's own DNS name."""

    namespace: str
    control_plane: str | None = None

    def km(self, node: str, replica: int = 0) -> KMAddress:
        service = service_host(km_name(node), self.namespace)
        pod = km_replica_host(node, replica, self.namespace)
        return KMAddress(
            etsi014_listen=_listen(KM_ETSI014_PORT), grpc_listen=_listen(KM_GRPC_PORT),
            metrics_listen=_listen(KM_METRICS_PORT), etsi014_url=f"https://{service}:{KM_ETSI014_PORT}",
            grpc=f"{pod}:{KM_GRPC_PORT}", metrics_url=f"http://{pod}:{KM_METRICS_PORT}/metrics",
        )

    def module(self, link: str) -> ModuleAddress:
        host = service_host(module_name(link), self.namespace)
        return ModuleAddress(
            end_listen={end: _listen(port) for end, port in MODULE_PORTS.items()},
            end_urls={end: f"https://{host}:{port}" for end, port in MODULE_PORTS.items()},
            admin_listen=_listen(MODULE_ADMIN_PORT), control_url=f"http://{host}:{MODULE_ADMIN_PORT}/control",
            metrics_url=f"http://{host}:{MODULE_ADMIN_PORT}/metrics",
        )

    def km_tls(self, node: str) -> TLSPaths:
        return _tls_paths("ca.crt", "tls.crt", "tls.key")

    def module_tls(self, link: str, end: End) -> TLSPaths:
        return _tls_paths("ca.crt", f"{end}.crt", f"{end}.key")

    def device_tls(self, link: str, node: str) -> TLSPaths:
        credentials = MODULE_CREDENTIALS_DIR / link  # the link's Secret, mounted by build_km_statefulset
        return TLSPaths(ca=str(credentials / "ca.crt"), cert=str(credentials / "tls.crt"),
                        key=str(credentials / "tls.key"))


def config_json(config: KMConfig | EmulatedLinkConfig) -> str:
    return config.model_dump_json(indent=2)


# --- manifests ----------------------------------------------------------------------


def _meta(name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {"name": name, "labels": dict(labels)}


def build_configmap(name: str, labels: Mapping[str, str], files: Mapping[str, str]) -> dict[str, Any]:
    return with_spec_hash({"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, labels),
                           "data": dict(files)})


def build_tls_secret(name: str, labels: Mapping[str, str], files: Mapping[str, bytes]) -> dict[str, Any]:
    """A Secret holding PEM files (``ca.crt``, ``tls.crt``, ``tls.key``, or one pair per module end)."""
    data = {key: base64.b64encode(value).decode() for key, value in sorted(files.items())}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(name, labels), "type": "Opaque", "data": data}


def build_km_configmap(node: str, config: KMConfig) -> dict[str, Any]:
    return build_configmap(km_name(node), node_labels(node), {KM_CONFIG_FILE: config_json(config)})


_KM_PORTS = [
    {"name": "etsi014", "port": KM_ETSI014_PORT, "targetPort": "etsi014", "protocol": "TCP"},
    {"name": "grpc", "port": KM_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
    {"name": "metrics", "port": KM_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
]


def build_km_service(node: str) -> dict[str, Any]:
    """The node's one KME address: its SAEs' ETSI 014 calls spread over every ready replica."""
    labels = node_labels(node)
    return with_spec_hash({
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(km_name(node), labels),
        "spec": {"type": "ClusterIP", "selector": _selector(labels), "ports": [dict(p) for p in _KM_PORTS]},
    })


def build_km_replicas_service(node: str) -> dict[str, Any]:
    """The headless Service of the KM's StatefulSet: ``<pod>.<service>.<namespace>.svc`` per replica.

    Not-ready pods are published too: the control plane reaches a starting replica to push it
    its topology, and a replica whose readiness probe fails for a moment stays reachable by
    its peers and siblings, which hold its ends and key copies.
    """
    labels = node_labels(node)
    return with_spec_hash({
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(km_replicas_service(node), labels),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": _selector(labels),
                 "ports": [dict(p) for p in _KM_PORTS if p["name"] != "etsi014"]},
    })


_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
_POD_SECURITY = {
    "runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _resources(node: QKDNode) -> dict[str, Any]:
    wanted = node.spec.km.resources.model_dump(exclude_none=True)
    return {kind: values for kind, values in wanted.items() if values}


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": 2,
            "failureThreshold": failures}


def build_km_statefulset(node: QKDNode, config_hash: str, ca_hash: str,
                         module_secrets: Mapping[str, str] = {}, server_names: Iterable[str] = ()) -> dict[str, Any]:
    """The KM's StatefulSet, ``spec.km.replicas`` pods; ``module_secrets`` maps link -> Secret with that
    link's device credentials, ``server_names`` are those its certificate is issued for."""
    name = node.name
    labels = node_labels(name)
    mounts = [
        {"name": "config", "mountPath": str(CONFIG_DIR), "readOnly": True},
        {"name": "tls", "mountPath": str(TLS_DIR), "readOnly": True},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": km_name(name)}},
        {"name": "tls", "secret": {"secretName": km_tls_secret(name), "defaultMode": 0o440}},
    ]
    for index, (link, secret) in enumerate(sorted(module_secrets.items())):
        volume = f"module-{index}"
        mounts.append({"name": volume, "mountPath": str(MODULE_CREDENTIALS_DIR / link), "readOnly": True})
        volumes.append({"name": volume, "secret": {"secretName": secret, "defaultMode": 0o440}})
    container = {
        "name": "km",
        "image": node.spec.km.image,
        "imagePullPolicy": node.spec.km.image_pull_policy,
        "command": ["python", "-P", "-m", "vqkd.km", "--config", str(CONFIG_DIR / KM_CONFIG_FILE)],
        # Every replica runs the same configuration; its ordinal is its pod's.
        "env": [{"name": REPLICA_ENV,
                 "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{LABEL_POD_INDEX}']"}}}],
        "ports": [
            {"name": "etsi014", "containerPort": KM_ETSI014_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": KM_GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": KM_METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(node),
        "startupProbe": _probe("/healthz", "metrics", 1, 60),
        "readinessProbe": _probe("/healthz", "metrics", 5, 2),
        "livenessProbe": _probe("/healthz", "metrics", 10, 3),
        "securityContext": _CONTAINER_SECURITY,
        "volumeMounts": mounts,
    }
    template = {
        "metadata": {"labels": labels,
                     "annotations": {ANNOTATION_CONFIG_HASH: config_hash, ANNOTATION_CA_HASH: ca_hash,
                                     ANNOTATION_SERVER_NAMES_HASH: content_hash(sorted(server_names))}},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 10,
            "securityContext": _POD_SECURITY,
            "containers": [container],
            "volumes": volumes,
        },
    }
    metadata = _meta(km_name(name), labels)
    metadata["annotations"] = {ANNOTATION_TEMPLATE_HASH: content_hash(template)}
    return with_spec_hash({
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": metadata,
        "spec": {
            "replicas": node.spec.km.replicas,
            "serviceName": km_replicas_service(name),
            "selector": {"matchLabels": _selector(labels)},
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "template": template,
        },
    })


def template_hash(statefulset: Mapping[str, Any]) -> str | None:
    """The pod template a KM's StatefulSet was written with, as ``build_km_statefulset`` hashed
    it; None for one written without (by an operator before the annotation)."""
    return statefulset.get("metadata", {}).get("annotations", {}).get(ANNOTATION_TEMPLATE_HASH)


def build_km_autoscaler(node: QKDNode) -> dict[str, Any] | None:
    """The HorizontalPodAutoscaler of ``spec.km.autoscaling``, or None without it.

    It targets the QKDNode, not the StatefulSet: it scales through the QKDNode's scale
    subresource (``spec.km.replicas``), so the node's spec stays the one source of its replicas
    and the operator renders the StatefulSet from it as from any other change.
    """
    autoscaling = node.spec.km.autoscaling
    if autoscaling is None:
        return None
    target = autoscaling.target
    if target.cpu_utilization is not None:
        metric = {"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": target.cpu_utilization}}}
    else:
        metric = {"type": "Pods", "pods": {
            "metric": {"name": KM_REQUESTS_METRIC},
            "target": {"type": "AverageValue", "averageValue": str(target.requests_per_second)}}}
    return with_spec_hash({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(km_autoscaler(node.name), node_labels(node.name)),
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": "QKDNode", "name": node.name},
            "minReplicas": autoscaling.min_replicas,
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [metric],
        },
    })


def build_module_configmap(link: str, config: EmulatedLinkConfig) -> dict[str, Any]:
    return build_configmap(module_name(link), link_labels(link), {MODULE_CONFIG_FILE: config_json(config)})


def build_module_service(link: str) -> dict[str, Any]:
    labels = link_labels(link)
    return with_spec_hash({
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(module_name(link), labels),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(labels),
            "ports": [
                {"name": "end-a", "port": MODULE_PORTS["a"], "targetPort": "end-a", "protocol": "TCP"},
                {"name": "end-b", "port": MODULE_PORTS["b"], "targetPort": "end-b", "protocol": "TCP"},
                {"name": "admin", "port": MODULE_ADMIN_PORT, "targetPort": "admin", "protocol": "TCP"},
            ],
        },
    })


def build_module_deployment(link: str, image: str, config_hash: str, ca_hash: str) -> dict[str, Any]:
    """The emulated module pair: one replica only (two would produce different keys), replaced
    by Recreate so that old and new never run side by side."""
    labels = link_labels(link)
    container = {
        "name": "module",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-P", "-m", "vqkd.km.emulator", "--config", str(CONFIG_DIR / MODULE_CONFIG_FILE)],
        "ports": [
            {"name": "end-a", "containerPort": MODULE_PORTS["a"], "protocol": "TCP"},
            {"name": "end-b", "containerPort": MODULE_PORTS["b"], "protocol": "TCP"},
            {"name": "admin", "containerPort": MODULE_ADMIN_PORT, "protocol": "TCP"},
        ],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        "readinessProbe": _probe("/metrics", "admin", 5, 2),
        "livenessProbe": _probe("/metrics", "admin", 10, 3),
        "securityContext": _CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "config", "mountPath": str(CONFIG_DIR), "readOnly": True},
            {"name": "tls", "mountPath": str(TLS_DIR), "readOnly": True},
        ],
    }
    return with_spec_hash({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(module_name(link), labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": _selector(labels)},
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": labels,
                             "annotations": {ANNOTATION_CONFIG_HASH: config_hash, ANNOTATION_CA_HASH: ca_hash}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _POD_SECURITY,
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": module_name(link)}},
                        {"name": "tls", "secret": {"secretName": module_tls_secret(link), "defaultMode": 0o440}},
                    ],
                },
            },
        },
    })


def build_application_session(
    session_id: str, user: str, source: tuple[str, str], destination: tuple[str, str], qos: Mapping[str, Any],
    registered: str,
) -> dict[str, Any]:
    """The KeySession recording a session an application opened at its KM (ETSI 004, or an
    implicit ETSI 014 session), so that the session outlives any operator process.
    ``registered`` is the ``vqkd.io/registered`` value: the ends that have opened it."""
    return {
        "apiVersion": "vqkd.io/v1alpha1", "kind": "KeySession",
        "metadata": {
            "name": f"app-{session_id}",
            "labels": {LABEL_ORIGIN: ORIGIN_APPLICATION, LABEL_MANAGED_BY: MANAGED_BY},
            "annotations": {ANNOTATION_SESSION_ID: session_id, ANNOTATION_REGISTERED: registered},
        },
        "spec": {
            "user": user,
            "source": {"node": source[0], "saeId": source[1]},
            "destination": {"node": destination[0], "saeId": destination[1]},
            "qos": dict(qos),
        },
    }


DEFAULT_MODULE_IMAGE = DEFAULT_KM_IMAGE  # one image holds the KM and the emulated module
