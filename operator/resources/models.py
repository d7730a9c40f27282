"""The vqkd custom resources (API group ``vqkd.io``, version ``v1alpha1``) as pydantic models.

These models are the one description of QKDNode, QKDLink, UserProfile and KeySession: the
operator and the local runtime validate with them, ``crdgen`` derives the CRD schemas from
them, and the example manifests are checked against them. Python attributes are snake_case;
the wire (YAML, the Kubernetes API) uses camelCase, as every Kubernetes API does.

Cross-field rules live twice on purpose: as pydantic validators (the local runtime and the
operator, which must refuse invalid input even when no API server validated it) and as CEL
rules in ``json_schema_extra`` (the API server rejects the object before it is stored). Both
sit next to each other so they change together.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from vqkd.km.config import DeviceProfile, EmulatedLinkConfig, KeyLimits
from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.resources.admission_cycle import AdmissionState

API_GROUP = "vqkd.io"
API_VERSION_NAME = "v1alpha1"
API_VERSION = f"{API_GROUP}/{API_VERSION_NAME}"
CATEGORY = "vqkd"
DEFAULT_KM_IMAGE = "ghcr.io/vqkd/km:0.1.0"

# Names of other vqkd resources become parts of child object names, labels and identity
# URIs (vqkd://km/<node>), so they follow the strictest Kubernetes name rule.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# SAE IDs appear in ETSI 014 URL paths and as the CN of dev certificates (at most 64
# characters): URL-safe, no slash.
SAE_ID = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
# Kubernetes resource quantities, e.g. 100m, 0.5, 128Mi, 1G.
QUANTITY = r"^[+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
CONDITION_TYPE = r"^[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?$"
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

# What a pattern means, for error messages: a regular expression is no help to a user.
PATTERN_HELP = {
    DNS_LABEL: "a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit",
    SAE_ID: "an SAE ID: letters, digits, '.', '_' and '-', starting and ending with a letter or digit",
    QUANTITY: "a Kubernetes quantity such as 100m, 0.5, 128Mi or 1G",
    CONDITION_TYPE: "a condition type in CamelCase, e.g. Ready",
    CONDITION_REASON: "a reason in CamelCase, e.g. KMUnreachable",
}

Name = Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=63)]
SaeId = Annotated[str, StringConstraints(pattern=SAE_ID, max_length=64)]
Quantity = Annotated[str, StringConstraints(pattern=QUANTITY, max_length=64)]
# ETSI 004 leaves the meaning of Priority to the provider; vqkd: higher is served first.
Priority = Annotated[int, Field(ge=0, le=255)]

_KM_LIMITS = KeyLimits()
_EMULATOR = EmulatedLinkConfig.model_fields


def _cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """JSON-schema extras carrying CEL rules that the API server evaluates on this object."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


_IMMUTABLE = _cel(("self == oldSelf", "is immutable; delete and re-create the resource instead"))
# Lists whose items must be unique: the API server checks this itself for list-type set.
_SET = {"x-kubernetes-list-type": "set"}


def _nested_defaults(model: type[BaseModel]) -> Any:
    """An optional sub-object that, when omitted, takes the defaults of its own fields.

    ``default: {}`` in the CRD makes the API server apply the nested defaults, instead of
    repeating every default of the sub-object at this level.
    """
    return Field(default_factory=model, json_schema_extra={"default": {}})


def _invalid(loc: tuple[str | int, ...], kind: str, message: str) -> ValidationError:
    """An error that points at the offending field (``loc``, wire names) below the model
    raising it, so a cross-field rule reports e.g. ``spec.nodes`` rather than ``spec``."""
    error = PydanticCustomError(f"vqkd_{kind}", message)
    return ValidationError.from_exception_data("vqkd", [InitErrorDetails(type=error, loc=loc, input=None)])


class _Wire(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are typos, so refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class _Observed(_Wire):
    # Status and metadata are written by the operator and the API server; a newer writer
    # may add fields, which an older reader must tolerate.
    model_config = ConfigDict(extra="ignore")


# --- metadata ------------------------------------------------------------------------


class OwnerReference(_Observed):
    api_version: str
    kind: str
    name: str
    uid: str
    controller: bool | None = None
    block_owner_deletion: bool | None = None


class ObjectMeta(_Observed):
    """The part of Kubernetes ObjectMeta that vqkd reads and writes."""

    name: Name
    namespace: Name = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Filled by the API server; absent in local manifests.
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None
    finalizers: list[str] = Field(default_factory=list)
    owner_references: list[OwnerReference] = Field(default_factory=list)


# --- conditions ----------------------------------------------------------------------

ConditionStatus = Literal["True", "False", "Unknown"]


class ConditionType(StrEnum):
    """The condition types vqkd writes; ``Ready`` is the summary every kind carries."""

    READY = "Ready"
    CONFIGURED = "Configured"  # the KMs hold the configuration (node: its links; session: its path)
    ROUTED = "Routed"  # a session has a path with enough spare key rate
    LINK_UP = "LinkUp"  # a link produces key below the QBER threshold
    ADMITTED = "Admitted"  # a session's QoS fits its user's SLA


class Condition(_Observed):
    type: str = Field(pattern=CONDITION_TYPE, max_length=316)
    status: ConditionStatus
    reason: str = Field(pattern=CONDITION_REASON, max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: datetime
    observed_generation: int | None = Field(None, ge=0)


def now() -> datetime:
    # metav1.Time has second precision; finer timestamps would change on every re-read.
    return datetime.now(timezone.utc).replace(microsecond=0)


def find_condition(conditions: Sequence[Condition], type: str) -> Condition | None:
    return next((c for c in conditions if c.type == type), None)


def set_condition(conditions: Sequence[Condition], condition: Condition) -> list[Condition]:
    """A new list with ``condition`` replacing the one of the same type (or appended).

    ``lastTransitionTime`` records when the status last changed, so it is kept from the
    old condition when only reason, message or generation differ.
    """
    old = find_condition(conditions, condition.type)
    if old is not None and old.status == condition.status:
        condition = condition.model_copy(update={"last_transition_time": old.last_transition_time})
    result = [c for c in conditions if c.type != condition.type]
    position = conditions.index(old) if old is not None else len(result)
    result.insert(position, condition)
    return result


class _Status(_Observed):
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, ge=0, description="the metadata.generation this status describes")

    def condition(self, type: str) -> Condition | None:
        return find_condition(self.conditions, type)

    def set_condition(
        self,
        type: str,
        status: ConditionStatus,
        reason: str,
        message: str = "",
        *,
        observed_generation: int | None = None,
        at: datetime | None = None,
    ) -> bool:
        """Set one condition; True when its status changed (a transition worth an Event)."""
        old = self.condition(type)
        new = Condition(
            type=type,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=at or now(),
            observed_generation=observed_generation,
        )
        self.conditions = set_condition(self.conditions, new)
        return old is None or old.status != status


# --- QKDNode -------------------------------------------------------------------------


class ComputeResources(_Wire):
    cpu: Quantity | None = None
    memory: Quantity | None = None


class KMResources(_Wire):
    requests: ComputeResources = ComputeResources(cpu="100m", memory="128Mi")
    limits: ComputeResources = ComputeResources(memory="512Mi")


MAX_KM_REPLICAS = 16


class AutoscalingTarget(_Wire):
    """What the HorizontalPodAutoscaler holds each KM replica to: exactly one of the two."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("has(self.cpuUtilization) != has(self.requestsPerSecond)",
             "set exactly one of cpuUtilization and requestsPerSecond"),
        )
    )

    cpu_utilization: int | None = Field(
        None, ge=1, le=1000,
        description="average CPU use of the KM replicas, percent of their CPU request (spec.km.resources.requests.cpu)")
    requests_per_second: int | None = Field(
        None, ge=1,
        description="average ETSI 014 and 004 requests each KM replica answers per second (the Pods metric "
                    "vqkd_km_responses_per_second, served by a Prometheus custom-metrics adapter rule; see the chart)")

    @model_validator(mode="after")
    def _exactly_one(self) -> AutoscalingTarget:
        if (self.cpu_utilization is None) == (self.requests_per_second is None):
            raise _invalid((), "autoscaling_target",
                           "set exactly one of cpuUtilization and requestsPerSecond, got "
                           + ("both" if self.cpu_utilization is not None else "neither"))
        return self


class KMAutoscaling(_Wire):
    """An autoscaling/v2 HorizontalPodAutoscaler the operator creates for this node, scaling
    spec.km.replicas through the QKDNode's scale subresource."""

    model_config = ConfigDict(
        json_schema_extra=_cel(("self.minReplicas <= self.maxReplicas", "need minReplicas <= maxReplicas"))
    )

    min_replicas: int = Field(1, ge=1, le=MAX_KM_REPLICAS)
    max_replicas: int = Field(ge=1, le=MAX_KM_REPLICAS)
    target: AutoscalingTarget

    @model_validator(mode="after")
    def _ordered(self) -> KMAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise _invalid(("minReplicas",), "replica_range",
                           f"must not exceed maxReplicas, got {self.min_replicas} > {self.max_replicas}")
        return self


class KMSpec(_Wire):
    """The key manager run for this node and the key sizes it offers over ETSI 014."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("self.minKeySize <= self.keySize && self.keySize <= self.maxKeySize",
             "need minKeySize <= keySize <= maxKeySize"),
        )
    )

    image: str = Field(DEFAULT_KM_IMAGE, min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: KMResources = _nested_defaults(KMResources)
    replicas: int = Field(
        1, ge=1, le=MAX_KM_REPLICAS,
        description="KM instances serving this node as one KME (the CRD's scale subresource sets it); each has its "
                    "own link pools and draws from the node's QKD module ends")
    autoscaling: KMAutoscaling | None = Field(
        None, description="scale replicas with demand: the operator creates and owns a HorizontalPodAutoscaler "
                          "targeting this QKDNode; without it, replicas stays as set")
    key_size: int = Field(_KM_LIMITS.key_size, gt=0, multiple_of=8, description="default key size, bits")
    min_key_size: int = Field(_KM_LIMITS.min_key_size, gt=0, multiple_of=8, description="bits")
    max_key_size: int = Field(_KM_LIMITS.max_key_size, gt=0, multiple_of=8, description="bits")
    max_key_per_request: int = Field(_KM_LIMITS.max_key_per_request, gt=0)

    @model_validator(mode="after")
    def _ordered_sizes(self) -> KMSpec:
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise _invalid(
                ("keySize",), "key_size_range",
                f"must lie between minKeySize and maxKeySize, got "
                f"{self.min_key_size} <= {self.key_size} <= {self.max_key_size}",
            )
        return self

    def key_limits(self) -> KeyLimits:
        """These limits in the form the KM process reads from its configuration."""
        return KeyLimits(
            key_size=self.key_size,
            min_key_size=self.min_key_size,
            max_key_size=self.max_key_size,
            max_key_per_request=self.max_key_per_request,
        )


class QKDNodeSpec(_Wire):
    sae_ids: list[SaeId] = Field(
        default_factory=list, max_length=1024, json_schema_extra=_SET,
        description="SAE IDs of the applications attached to this node's KM; empty for a relay-only node",
    )
    km: KMSpec = _nested_defaults(KMSpec)
    kme_id: str | None = Field(
        None, min_length=1, max_length=128, description="KME ID announced over ETSI 014; the node name when unset",
    )

    @model_validator(mode="after")
    def _unique_saes(self) -> QKDNodeSpec:
        for index, sae in enumerate(self.sae_ids):
            if sae in self.sae_ids[:index]:
                raise _invalid(("saeIds", index), "duplicate_sae", f"SAE {sae!r} is listed twice")
        return self


class NodePhase(StrEnum):
    PENDING = "Pending"  # the KM is not serving yet
    RUNNING = "Running"  # the KM is serving and holds its configuration
    DEGRADED = "Degraded"  # the KM is serving but some of its links are down
    FAILED = "Failed"  # the spec cannot be realised; conditions say why


class NodeEndpoints(_Observed):
    etsi014: str | None = Field(None, description="ETSI 014 base URL for the node's SAEs")
    grpc: str | None = Field(None, description="host:port of the KM's gRPC service")
    metrics: str | None = Field(None, description="Prometheus metrics URL")


class QKDNodeStatus(_Status):
    phase: NodePhase | None = None
    ready: bool = False
    endpoints: NodeEndpoints = Field(default_factory=NodeEndpoints)
    # The scale subresource reads these two: what the KM's StatefulSet reports.
    replicas: int = Field(0, ge=0, description="KM pods of the node's StatefulSet")
    ready_replicas: int = Field(0, ge=0, description="KM pods ready")
    selector: str | None = Field(None, description="label selector of the KM pods, for the scale subresource")


# --- QKDLink -------------------------------------------------------------------------


class LinkType(StrEnum):
    """Link type as in ETSI GS QKD 015 (qkdl_type PHYS or VIRT)."""

    PHYSICAL = "physical"  # a QKD module pair joins the two nodes (PHYS)
    VIRTUAL = "virtual"  # key comes from a relay the nodes do not run themselves (VIRT)


_DEVICE = DeviceProfile.model_fields


class EmulatedDevice(_Wire):
    """The device the emulated pair behaves like; the defaults are vqkd's own twin."""

    max_key_size: int = Field(_DEVICE["max_key_size"].default, gt=0, multiple_of=8,
                              description="largest key one request may ask for, bits")
    max_keys_per_request: int = Field(_DEVICE["max_keys_per_request"].default, gt=0,
                                      description="most keys in one enc_keys or dec_keys request")
    slave_latency_ms_per_key: float = Field(
        _DEVICE["slave_latency_ms_per_key"].default, ge=0, le=10_000,
        description="time an end takes per key to answer dec_keys; an end answers one request at a time")
    sync_lag_ms: float = Field(
        _DEVICE["sync_lag_ms"].default, ge=0, le=600_000,
        description="keys taken at one end reach the other end this much later; asked for earlier: not found")
    error_rate: float = Field(_DEVICE["error_rate"].default, ge=0, lt=1,
                              description="share of ETSI 014 requests refused with 503, nothing consumed")
    tls12_only: bool = Field(_DEVICE["tls12_only"].default,
                             description="the ends speak TLS 1.2 and no later version")

    def profile(self) -> DeviceProfile:
        """The emulated module's configuration of this device."""
        return DeviceProfile(
            key_size=min(_DEVICE["key_size"].default, self.max_key_size), max_key_size=self.max_key_size,
            max_keys_per_request=self.max_keys_per_request, slave_latency_ms_per_key=self.slave_latency_ms_per_key,
            sync_lag_ms=self.sync_lag_ms, error_rate=self.error_rate, tls12_only=self.tls12_only,
        )


class EmulatedKeySource(_Wire):
    """An emulated QKD module pair (the digital twin) producing key for this link."""

    key_rate_bps: float = Field(gt=0, description="secret key rate at zero QBER, bit/s")
    qber: float = Field(_EMULATOR["qber"].default, ge=0, le=0.5, description="quantum bit error rate")
    buffer_bits: int = Field(
        _EMULATOR["buffer_bits"].default, gt=0, description="bound on produced key not yet drawn by the KMs",
    )
    device: EmulatedDevice | None = Field(
        None, description="make the pair behave like a particular QKD device; omitted: vqkd's own twin")

    def device_profile(self) -> DeviceProfile:
        """What the emulated module pair is configured with (``EmulatedLinkConfig.device``)."""
        return (self.device or EmulatedDevice()).profile()


class SecretRef(_Wire):
    name: Name


class Etsi014Endpoint(_Wire):
    """One node's end of a real QKD module pair, reached over ETSI GS QKD 014."""

    url: str = Field(pattern=r"^https://[^\s/]+(/\S*)?$", max_length=2048, description="base URL of the module's KME")
    sae_id: SaeId = Field(description="SAE ID this node's KM uses at the module")
    peer_sae_id: SaeId = Field(description="SAE ID of the other node's KM at its module")
    secret_ref: SecretRef = Field(description="Secret with ca.crt, tls.crt and tls.key for mutual TLS to the module")


class Etsi014KeySource(_Wire):
    endpoints: dict[str, Etsi014Endpoint] = Field(
        min_length=2, max_length=2, description="one entry per linked node, keyed by node name",
    )


class QKDLinkSpec(_Wire):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("size(self.nodes) != 2 || self.nodes[0] != self.nodes[1]", "nodes must name two distinct QKDNodes"),
            ("has(self.emulated) != has(self.etsi014)", "set exactly one key source: emulated or etsi014"),
            ("!has(self.etsi014) || self.nodes.all(n, n in self.etsi014.endpoints)",
             "etsi014.endpoints must have one entry per linked node, keyed by node name"),
        )
    )

    nodes: list[Name] = Field(
        min_length=2, max_length=2, json_schema_extra=_IMMUTABLE, description="the two QKDNodes the link joins",
    )
    type: LinkType = LinkType.PHYSICAL
    emulated: EmulatedKeySource | None = None
    etsi014: Etsi014KeySource | None = None
    qber_threshold: float = Field(
        0.11, gt=0, le=0.5, description="above this QBER the link yields no secure key and is Down (BB84: ~0.11)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> QKDLinkSpec:
        if self.nodes[0] == self.nodes[1]:
            raise _invalid(("nodes",), "distinct_nodes", f"must name two distinct QKDNodes, got {self.nodes}")
        if (self.emulated is None) == (self.etsi014 is None):
            got = "both" if self.emulated else "neither"
            raise _invalid((), "key_source", f"set exactly one key source, emulated or etsi014; got {got}")
        if self.etsi014 is not None and sorted(self.etsi014.endpoints) != sorted(self.nodes):
            raise _invalid(
                ("etsi014", "endpoints"), "endpoints",
                f"must have one entry per linked node {sorted(self.nodes)}, got {sorted(self.etsi014.endpoints)}",
            )
        return self


class QKDLinkStatus(_Status):
    state: LinkState | None = None
    key_rate_bps: float | None = Field(None, ge=0, description="measured secret key rate, bit/s")
    qber: float | None = Field(None, ge=0, le=1)
    stored_key_bits: int | None = Field(None, ge=0, description="key held in the module buffers, bits")
    burned_bits: int | None = Field(
        None, ge=0, description="key the KMs drew from the QKD modules and gave up (never shared), bits")
    reserved_bps: int = Field(0, ge=0, description="key rate reserved by active sessions, bit/s")
    sessions: int = Field(0, ge=0, description="active sessions routed over this link")
    reason: str | None = None


# --- UserProfile ---------------------------------------------------------------------


class TokenSecretRef(_Wire):
    name: Name
    key: str = Field("token", pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)


class Authentication(_Wire):
    """How the user's applications prove who they are, beyond the mutual-TLS identity
    (vqkd://sae/<saeId>) every SAE presents to its KM; at most one method."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("!(has(self.certificateSubject) && has(self.tokenSecretRef))",
             "set at most one of certificateSubject and tokenSecretRef"),
        )
    )

    certificate_subject: str | None = Field(
        None, min_length=1, max_length=1024,
        description="subject (RFC 4514) the client certificates of the user's SAEs must carry",
    )
    token_secret_ref: TokenSecretRef | None = Field(
        None, description="Secret key holding a bearer token the user's applications present",
    )

    @model_validator(mode="after")
    def _one_method(self) -> Authentication:
        if self.certificate_subject is not None and self.token_secret_ref is not None:
            raise _invalid((), "auth_method", "set at most one of certificateSubject and tokenSecretRef, got both")
        return self


class SLA(_Wire):
    """Limits admission control enforces across all of the user's sessions; unset = no limit."""

    max_key_rate_bps: int | None = Field(None, gt=0, description="sum of reserved key rate, bit/s")
    max_burst_bits: int | None = Field(None, gt=0, description="token bucket size per session, bits")
    max_sessions: int | None = Field(None, ge=0, description="concurrent sessions")
    allowed_nodes: list[Name] = Field(
        default_factory=list, max_length=1024, json_schema_extra=_SET,
        description="nodes the user's sessions may start or end at; empty means all",
    )


class Fallback(StrEnum):
    """What a session does when the QKD path cannot serve it (vqkd extension to ETSI 004)."""

    NONE = "none"  # fail the key request
    PQC = "pqc"  # deliver a post-quantum key exchanged between the endpoint KMs instead


class QoS(_Wire):
    """ETSI GS QKD 004 QoS; an unset field takes the user's default QoS, then vqkd's default."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("!has(self.minBps) || !has(self.maxBps) || self.minBps <= self.maxBps", "need minBps <= maxBps"),
        )
    )

    key_chunk_size: int | None = Field(None, gt=0, le=65536, description="bytes delivered per GET_KEY")
    max_bps: int | None = Field(None, gt=0, description="bit/s")
    min_bps: int | None = Field(None, ge=0, description="bit/s the path must guarantee")
    jitter: int | None = Field(None, ge=0, description="bit/s")
    priority: Priority | None = Field(None, description="higher is served first")
    timeout: int | None = Field(None, gt=0, description="bound on one call, ms")
    ttl: int | None = Field(None, gt=0, description="how long a delivered key is kept, s")
    fallback: Fallback | None = None

    @model_validator(mode="after")
    def _ordered_rates(self) -> QoS:
        if self.min_bps is not None and self.max_bps is not None and self.min_bps > self.max_bps:
            raise _invalid(("minBps",), "rate_order", f"must not exceed maxBps, got {self.min_bps} > {self.max_bps}")
        return self

    def over(self, defaults: QoS) -> QoS:
        """This QoS with its unset fields taken from ``defaults``."""
        mine = self.model_dump(exclude_none=True)
        return QoS.model_validate({**defaults.model_dump(exclude_none=True), **mine})


# maxBps stays unset: then only the user's SLA and the path's spare rate bound a session.
DEFAULT_QOS = QoS(
    key_chunk_size=_KM_LIMITS.key_size // 8,
    min_bps=0,
    jitter=0,
    priority=0,
    timeout=10_000,
    ttl=3600,
    fallback=Fallback.NONE,
)


class UserProfileSpec(_Wire):
    sae_ids: list[SaeId] = Field(
        min_length=1, max_length=1024, json_schema_extra=_SET, description="SAE IDs of the user's applications",
    )
    authentication: Authentication = _nested_defaults(Authentication)
    priority: Priority = Field(0, description="priority class of the user's sessions; higher is served first")
    sla: SLA = _nested_defaults(SLA)
    default_qos: QoS = _nested_defaults(QoS)
    enabled: bool = Field(True, description="false refuses new sessions and ends the active ones")

    @model_validator(mode="after")
    def _unique_saes(self) -> UserProfileSpec:
        for index, sae in enumerate(self.sae_ids):
            if sae in self.sae_ids[:index]:
                raise _invalid(("saeIds", index), "duplicate_sae", f"SAE {sae!r} is listed twice")
        return self


class Usage(_Observed):
    reserved_bps: int = Field(0, ge=0, description="key rate reserved by the user's active sessions, bit/s")
    delivered_keys: int = Field(0, ge=0, description="keys delivered by the user's active sessions, as counted "
                                                      "by their endpoint KMs")
    delivered_bits: int = Field(0, ge=0, description="bits of those keys")


class UserProfileStatus(_Status):
    active_sessions: int = Field(0, ge=0)
    usage: Usage = Field(default_factory=Usage)


# --- KeySession ----------------------------------------------------------------------


class SessionEndpoint(_Wire):
    node: Name
    sae_id: SaeId


class KeySessionSpec(_Wire):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("self.source.saeId != self.destination.saeId", "source and destination must be different SAEs"),
        )
    )

    user: Name = Field(json_schema_extra=_IMMUTABLE, description="the UserProfile owning the source SAE")
    source: SessionEndpoint = Field(json_schema_extra=_IMMUTABLE)
    destination: SessionEndpoint = Field(json_schema_extra=_IMMUTABLE)
    qos: QoS = _nested_defaults(QoS)

    @model_validator(mode="after")
    def _two_saes(self) -> KeySessionSpec:
        if self.source.sae_id == self.destination.sae_id:
            raise _invalid(("destination", "saeId"), "same_sae",
                           f"must differ from source.saeId, got {self.source.sae_id!r} for both")
        return self


# A KeySession's phase is its session's AdmissionState, or one of the two phases the cycle
# has no state for: not taken in yet, refused. ``of`` is the one mapping.
class SessionPhase(StrEnum):
    """The admission-control cycle of the paper (§3.2, Fig. 2b), plus the refusal."""

    PENDING = "Pending"  # not yet checked against the user's SLA
    ACCEPTED = AdmissionState.ACCEPTED.value  # within the SLA; waiting for both SAEs to register
    ACTIVE = AdmissionState.ACTIVE.value  # path configured on every KM; keys flow
    HELD = AdmissionState.HELD.value  # its path broke and no other is usable yet; retried
    TERMINATED = AdmissionState.TERMINATED.value  # closed, expired or deleted; resources freed
    REJECTED = "Rejected"  # refused (SLA, no path, invalid); reason says why

    @classmethod
    def of(cls, state: AdmissionState, *, rejected: bool) -> SessionPhase:
        """The phase shown for a session in ``state``; ``rejected``: it ended without ever carrying key."""
        if state is AdmissionState.TERMINATED and rejected:
            return cls.REJECTED
        return cls(state.value)


class KeySessionStatus(_Status):
    phase: SessionPhase | None = None
    session_id: UUID | None = Field(None, description="ETSI 004 Key_stream_ID")
    path: list[Name] = Field(default_factory=list, description="nodes from source to destination")
    peers_registered: list[SaeId] = Field(
        default_factory=list, max_length=2, json_schema_extra=_SET, description="SAEs that have opened the session",
    )
    reserved_bps: int = Field(0, ge=0, description="key rate reserved on every link of the path, bit/s")
    keys_delivered: int = Field(0, ge=0, description="keys handed to the applications, counted once per key by "
                                                     "the endpoint KM that issued it; refreshed every 30 s by default")
    reason: str | None = None


# --- the resources -------------------------------------------------------------------


class _Resource(_Wire):
    api_version: Literal["vqkd.io/v1alpha1"] = API_VERSION
    kind: str
    metadata: ObjectMeta

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase, JSON types, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class QKDNode(_Resource):
    """A trusted node site and its key manager."""

    kind: Literal["QKDNode"] = "QKDNode"
    spec: QKDNodeSpec = Field(default_factory=QKDNodeSpec)
    status: QKDNodeStatus = Field(default_factory=QKDNodeStatus)

    @property
    def kme_id(self) -> str:
        return self.spec.kme_id or self.metadata.name


class QKDLink(_Resource):
    """A QKD link between two nodes and where its key comes from."""

    kind: Literal["QKDLink"] = "QKDLink"
    spec: QKDLinkSpec
    status: QKDLinkStatus = Field(default_factory=QKDLinkStatus)


class UserProfile(_Resource):
    """A network user, the SAEs it owns and its service-level agreement."""

    kind: Literal["UserProfile"] = "UserProfile"
    spec: UserProfileSpec
    status: UserProfileStatus = Field(default_factory=UserProfileStatus)


class KeySession(_Resource):
    """A period in which two SAEs may draw symmetric key (paper §3.2)."""

    kind: Literal["KeySession"] = "KeySession"
    spec: KeySessionSpec
    status: KeySessionStatus = Field(default_factory=KeySessionStatus)

    def effective_qos(self, user: UserProfile | None) -> QoS:
        """The QoS admission control applies: the session's, then the user's default, then vqkd's."""
        defaults = user.spec.default_qos.over(DEFAULT_QOS) if user is not None else DEFAULT_QOS
        return self.spec.qos.over(defaults)


Resource = QKDNode | QKDLink | UserProfile | KeySession


# --- the registry --------------------------------------------------------------------


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    json_path: str
    description: str = ""
    priority: int = 0  # 0: always shown; 1: only with `kubectl get -o wide`


AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp")
READY = PrinterColumn("Ready", "string", '.status.conditions[?(@.type=="Ready")].status')


@dataclass(frozen=True)
class ScaleSubresource:
    """Where the CRD's ``scale`` subresource (``kubectl scale``, a HorizontalPodAutoscaler) reads and writes."""

    spec_replicas_path: str
    status_replicas_path: str
    label_selector_path: str


@dataclass(frozen=True)
class ResourceKind:
    model: type[_Resource]
    plural: str
    singular: str
    short_names: tuple[str, ...]
    printer_columns: tuple[PrinterColumn, ...]
    categories: tuple[str, ...] = (CATEGORY,)
    scale: ScaleSubresource | None = None
    group: ClassVar[str] = API_GROUP
    version: ClassVar[str] = API_VERSION_NAME

    @property
    def kind(self) -> str:
        return self.model.model_fields["kind"].default

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"


KINDS: dict[str, ResourceKind] = {
    info.kind: info
    for info in (
        ResourceKind(
            QKDNode, "qkdnodes", "qkdnode", ("qn",),
            (
                PrinterColumn("Phase", "string", ".status.phase"),
                PrinterColumn("Ready", "boolean", ".status.ready"),
                PrinterColumn("Replicas", "integer", ".spec.km.replicas", "KM replicas wanted"),
                PrinterColumn("Ready-Replicas", "integer", ".status.readyReplicas", "KM replicas ready"),
                PrinterColumn("SAEs", "string", ".spec.saeIds", "SAE IDs attached to the node"),
                PrinterColumn("ETSI014", "string", ".status.endpoints.etsi014", priority=1),
                PrinterColumn("Image", "string", ".spec.km.image", priority=1),
                AGE,
            ),
            scale=ScaleSubresource(".spec.km.replicas", ".status.replicas", ".status.selector"),
        ),
        ResourceKind(
            QKDLink, "qkdlinks", "qkdlink", ("ql",),
            (
                PrinterColumn("Nodes", "string", ".spec.nodes"),
                PrinterColumn("State", "string", ".status.state"),
                PrinterColumn("Rate", "number", ".status.keyRateBps", "measured secret key rate, bit/s"),
                PrinterColumn("QBER", "number", ".status.qber"),
                PrinterColumn("Reserved", "integer", ".status.reservedBps", "reserved key rate, bit/s"),
                PrinterColumn("Sessions", "integer", ".status.sessions"),
                PrinterColumn("Type", "string", ".spec.type", priority=1),
                PrinterColumn("Stored", "integer", ".status.storedKeyBits", "stored key, bits", priority=1),
                AGE,
            ),
        ),
        ResourceKind(
            UserProfile, "userprofiles", "userprofile", ("up",),
            (
                PrinterColumn("Enabled", "boolean", ".spec.enabled"),
                PrinterColumn("Priority", "integer", ".spec.priority"),
                PrinterColumn("Sessions", "integer", ".status.activeSessions"),
                PrinterColumn("Reserved", "integer", ".status.usage.reservedBps", "reserved key rate, bit/s"),
                PrinterColumn("MaxRate", "integer", ".spec.sla.maxKeyRateBps", "SLA key rate limit, bit/s"),
                READY,
                AGE,
            ),
        ),
        ResourceKind(
            KeySession, "keysessions", "keysession", ("ks",),
            (
                PrinterColumn("User", "string", ".spec.user"),
                PrinterColumn("Source", "string", ".spec.source.saeId"),
                PrinterColumn("Destination", "string", ".spec.destination.saeId"),
                PrinterColumn("Phase", "string", ".status.phase"),
                PrinterColumn("Path", "string", ".status.path"),
                PrinterColumn("Reserved", "integer", ".status.reservedBps", "reserved key rate, bit/s"),
                PrinterColumn("Keys", "integer", ".status.keysDelivered", "keys delivered", priority=1),
                PrinterColumn("Session-ID", "string", ".status.sessionId", priority=1),
                READY,
                AGE,
            ),
        ),
    )
}


# --- parsing with messages people can act on -----------------------------------------


class InvalidResource(ValueError):
    """A document that is not a valid vqkd resource; ``problems`` are "field: what is wrong"."""

    def __init__(self, kind: str | None, name: str | None, problems: list[str]):
        self.kind = kind
        self.name = name
        self.problems = problems
        super().__init__(str(self))

    @property
    def label(self) -> str:
        """``QKDLink star-4-5``, or as much of it as the document told."""
        return " ".join(part for part in (self.kind, self.name) if part)

    def __str__(self) -> str:
        problems = "; ".join(self.problems)
        return f"{self.label}: {problems}" if self.label else problems


def parse(document: Any) -> Resource:
    """Validate one decoded document (a local manifest, or an object from the API server)."""
    if not isinstance(document, Mapping):
        raise InvalidResource(None, None, [
            f"expected a resource (a mapping with apiVersion, kind, metadata and spec), got {_type_name(document)}"
        ])
    kind = document.get("kind")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    name = name if isinstance(name, str) else None
    if not isinstance(kind, str) or kind not in KINDS:
        expected = ", ".join(sorted(KINDS))
        problem = f"unknown kind {kind!r}" if kind is not None else "kind is missing"
        raise InvalidResource(kind if isinstance(kind, str) else None, name, [f"{problem}; expected one of {expected}"])
    if document.get("apiVersion") != API_VERSION:
        got = document.get("apiVersion")
        raise InvalidResource(kind, name, [f"apiVersion: expected {API_VERSION!r}, got {got!r}"])
    model = KINDS[kind].model
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise InvalidResource(kind, name, explain(error, model)) from None


# Errors whose input is not the offending value (a missing field's input is its parent).
_NO_INPUT = {"missing", "extra_forbidden"}


def explain(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """One ``field.path: what is wrong (got value)`` line per error, in wire names."""
    lines = []
    for detail in error.errors(include_url=False):
        loc = detail["loc"]
        where = _format_path(loc) or "<document>"
        message = detail["msg"]
        kind = detail["type"]
        if kind == "string_pattern_mismatch" and detail["ctx"]["pattern"] in PATTERN_HELP:
            message = f"should be {PATTERN_HELP[detail['ctx']['pattern']]}"
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            message = "should be a mapping"
        if kind == "extra_forbidden":
            known = _fields_at(model, loc[:-1])
            message = f"unknown field; expected one of {', '.join(known)}" if known else "unknown field"
        if kind not in _NO_INPUT and not kind.startswith("vqkd_"):
            message += f" (got {_show(detail['input'])})"
        lines.append(f"{where}: {message}")
    return lines


def _format_path(loc: Sequence[str | int]) -> str:
    """``('spec', 'saeIds', 1)`` -> ``spec.saeIds[1]``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _fields_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The wire names of the fields the model expects at ``loc``, for "did you mean"."""
    current: Any = model
    for part in loc:
        current = _strip_optional(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
            if field is None:
                return []
            current = field.annotation
        elif typing.get_origin(current) in (list, dict):
            current = typing.get_args(current)[-1]
        else:
            return []
    current = _strip_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(f.alias or n for n, f in current.model_fields.items())
    return []


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, type(int | None)) and len(arguments) == 1:
        return arguments[0]
    return annotation


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{_type_name(value)} {text[:60]}…"


def _type_name(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "a boolean", type(None): "nothing"}
    return names.get(type(value), type(value).__name__)
