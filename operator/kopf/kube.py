"""The operator's own calls to the Kubernetes API, on plain dicts, with the official client.

kopf watches and patches the vqkd resources itself; this client creates and updates the
children (StatefulSets, Services, ConfigMaps, Secrets, Deployments, HorizontalPodAutoscalers),
writes status and Events, and lists resources at startup. The official client is synchronous: every method
here blocks, so the operator calls them from worker threads (``asyncio.to_thread``), never
on the event loop.

Bodies stay dicts end to end (no generated models): the manifests come from ``manifests`` as
dicts and the tests compare dicts, and a merge patch is a dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import kubernetes
from kubernetes.client import ApiClient, Configuration

from vqkd.operator.kopf.manifests import ANNOTATION_SPEC_HASH
from vqkd.operator.resources.models import API_GROUP, API_VERSION_NAME, KINDS

MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


CONFIGMAPS = Kind("", "v1", "configmaps", "ConfigMap")
SECRETS = Kind("", "v1", "secrets", "Secret")
SERVICES = Kind("", "v1", "services", "Service")
PODS = Kind("", "v1", "pods", "Pod")
EVENTS = Kind("", "v1", "events", "Event")
STATEFULSETS = Kind("apps", "v1", "statefulsets", "StatefulSet")
DEPLOYMENTS = Kind("apps", "v1", "deployments", "Deployment")
HORIZONTALPODAUTOSCALERS = Kind("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler")
VQKD = {kind: Kind(API_GROUP, API_VERSION_NAME, info.plural, kind) for kind, info in KINDS.items()}


class KubeError(Exception):
    """A refused API call: the HTTP status, the API server's reason and its message."""

    def __init__(self, status: int, reason: str, message: str, what: str):
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{what}: HTTP {status} {reason}: {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


class Kube:
    """One namespace of one cluster."""

    def __init__(self, api: ApiClient, namespace: str):
        self.api = api
        self.namespace = namespace

    @classmethod
    def connect(cls, kubeconfig: str | None, namespace: str) -> Kube:
        """From a kubeconfig file, or (None) from the pod's service account."""
        configuration = Configuration()
        if kubeconfig:
            if not Path(kubeconfig).is_file():
                raise kubernetes.config.ConfigException(f"{kubeconfig}: no such kubeconfig file")
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            try:
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            except kubernetes.config.ConfigException as e:
                raise kubernetes.config.ConfigException(
                    f"not running in a pod ({e}); pass --kubeconfig to reach a cluster from outside") from None
        # Handlers, the status writer and the node guards call from several threads at once.
        configuration.connection_pool_maxsize = 16
        return cls(ApiClient(configuration), namespace)

    def connection_info(self) -> kopf.ConnectionInfo:
        """The same credentials for kopf's own client (its watches and patches)."""
        config = self.api.configuration
        header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
        scheme, token = (None, None)
        if header:
            parts = header.split(" ", 1)
            scheme, token = (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        return kopf.ConnectionInfo(
            server=config.host, ca_path=config.ssl_ca_cert, insecure=not config.verify_ssl,
            username=config.username or None, password=config.password or None, scheme=scheme, token=token,
            certificate_path=config.cert_file, private_key_path=config.key_file, default_namespace=self.namespace,
        )

    def close(self) -> None:
        self.api.close()

    # --- calls ---------------------------------------------------------------------

    def _call(self, method: str, path: str, what: str, body: Any = None, content_type: str | None = None,
              query: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        request = self.api.param_serialize(method=method, resource_path=path, query_params=query or None,
                                           header_params=headers, body=body, auth_settings=["BearerToken"])
        response = self.api.call_api(*request[:4], _request_timeout=REQUEST_TIMEOUT_S)
        raw = response.read()
        data = json.loads(raw) if raw else {}
        if not 200 <= response.status < 300:
            reason = data.get("reason", response.reason) if isinstance(data, dict) else response.reason
            message = data.get("message", raw.decode(errors="replace")) if isinstance(data, dict) else str(raw)
            raise KubeError(response.status, str(reason), str(message).splitlines()[0] if message else "", what)
        return data

    def get(self, kind: Kind, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", kind.path(self.namespace, name), f"get {kind.kind} {name}")
        except KubeError as e:
            if e.not_found:
                return None
            raise

    def list(self, kind: Kind) -> list[dict[str, Any]]:
        return self._call("GET", kind.path(self.namespace), f"list {kind.plural}").get("items", [])

    def create(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("metadata", {}).get("name") or body.get("metadata", {}).get("generateName", "")
        return self._call("POST", kind.path(self.namespace), f"create {kind.kind} {name}", body)

    def patch(self, kind: Kind, name: str, patch: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        what = f"patch {kind.kind} {name}" + (f" {subresource}" if subresource else "")
        return self._call("PATCH", kind.path(self.namespace, name, subresource), what, patch, MERGE_PATCH)

    def delete(self, kind: Kind, name: str, grace_period_s: int | None = None) -> bool:
        """True when it was there; deleting what is gone is not an error."""
        query = [("gracePeriodSeconds", str(grace_period_s))] if grace_period_s is not None else None
        try:
            self._call("DELETE", kind.path(self.namespace, name), f"delete {kind.kind} {name}", query=query)
            return True
        except KubeError as e:
            if e.not_found:
                return False
            raise

    # --- desired state -------------------------------------------------------------

    def ensure(self, kind: Kind, desired: dict[str, Any], *, create_only: bool = False) -> str:
        """Make the object match ``desired``: "created", "updated" or "unchanged".

        Whether it matches is decided by the spec hash annotation ``manifests`` puts on every
        manifest, not by comparing with what the API server returns (which adds defaults).
        ``create_only`` objects (TLS Secrets) are never rewritten once they exist.
        """
        name = desired["metadata"]["name"]
        actual = self.get(kind, name)
        if actual is not None and actual.get("metadata", {}).get("deletionTimestamp"):
            raise KubeError(409, "Terminating", f"{kind.kind} {name} is being deleted; it is created again after",
                            f"ensure {kind.kind} {name}")
        if actual is None:
            try:
                self.create(kind, desired)
                return "created"
            except KubeError as e:
                if not e.conflict:
                    raise
                actual = self.get(kind, name) or {}
        if create_only:
            return "unchanged"
        wanted = desired["metadata"].get("annotations", {}).get(ANNOTATION_SPEC_HASH)
        if wanted is not None and actual.get("metadata", {}).get("annotations", {}).get(ANNOTATION_SPEC_HASH) == wanted:
            return "unchanged"
        self.patch(kind, name, desired)
        return "updated"
