"""Configuration of the processes in ``km/``: a key manager and an emulated QKD module pair.

Whoever starts these processes (the local runner, the operator's pod spec, a test) writes
one of these as JSON and passes its path; the process validates it at start and refuses to
run with a message naming the field.

A KM's file holds its identity and process settings (``KMConfig``). What changes with the
network — its SAE directory, its links, its key limits (``KMTopology``) — the control plane
pushes to the running KM; a file may carry an initial topology for a KM that runs on its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vqkd.km.tls import TLSFiles

HostPort = Annotated[str, Field(pattern=r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")]


def split_host_port(address: str) -> tuple[str, int]:
    """A listen address's host (IPv6 without its brackets) and port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSPaths(_Strict):
    ca: Path
    cert: Path
    key: Path

    def files(self) -> TLSFiles:
        return TLSFiles(self.ca, self.cert, self.key)


class KeyLimits(_Strict):
    """What the KM announces in ETSI 014 status and enforces on every request."""

    key_size: int = Field(256, gt=0, multiple_of=8, description="default key size, bits")
    min_key_size: int = Field(64, gt=0, multiple_of=8)
    max_key_size: int = Field(8192, gt=0, multiple_of=8)
    max_key_per_request: int = Field(1024, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> KeyLimits:
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError(
                f"need min_key_size <= key_size <= max_key_size, got "
                f"{self.min_key_size} <= {self.key_size} <= {self.max_key_size}"
            )
        return self


class LinkEndConfig(_Strict):
    """This KM's side of one QKD link."""

    name: str = Field(min_length=1)
    peer_node: str = Field(min_length=1)
    peer_kme_id: str = Field(min_length=1)
    peer_grpc: HostPort
    module_url: str = Field(min_length=1, description="https URL of this node's end of the QKD module (ETSI 014)")
    module_sae_id: str = Field(min_length=1, description="the SAE ID this KM has at its module end")
    peer_module_sae_id: str = Field(min_length=1, description="the SAE ID the peer KM has at its module end")
    module_tls: TLSPaths | None = Field(
        None, description="credentials for the module's ETSI 014 interface (a real device's CA and this KM's "
                          "certificate there); default: the KM's own")
    block_bits: int = Field(
        8192, gt=0, multiple_of=8,
        description="largest key drawn from the module; the KM draws the largest size both module ends accept")
    pool_target_bits: int = Field(64 * 1024 * 1024, gt=0, description="keep this much outgoing key in the pool")
    sync_timeout_s: float = Field(
        20.0, gt=0,
        description="how long a key drawn as master waits for the peer's module end to hand it over (a slave "
                    "end may synchronise late) before it is given up and counted as burned")
    peer_replica: int = Field(
        0, ge=0, description="the replica of the peer node's KM this end pairs with: a peer node with n KM "
                             "replicas has n ends of the link here, one per replica")

    @property
    def end(self) -> tuple[str, int]:
        """What names this end among a KM's link ends: the link and the peer replica."""
        return self.name, self.peer_replica


class InvalidTopology(ValueError):
    """A topology a KM cannot hold; the message names the field."""


class KMTopology(_Strict):
    """Everything of a KM that changes with the network; the KM applies a new one live."""

    version: int = Field(0, ge=0, description="monotonic per KM; pushes carry versions >= 1")
    saes: dict[str, str] = Field(default_factory=dict, description="SAE ID -> node it is attached to")
    links: list[LinkEndConfig] = Field(default_factory=list)
    limits: KeyLimits = KeyLimits()
    replicas: dict[int, HostPort] = Field(
        default_factory=dict,
        description="replica ordinal -> gRPC address of every KM replica of this node, this one included; empty "
                    "or one entry: the node has one KM")

    @field_validator("links")
    @classmethod
    def _one_link_per_peer_node(cls, links: list[LinkEndConfig]) -> list[LinkEndConfig]:
        for what, other in (("name", "peer_node"), ("peer_node", "name")):
            seen: dict[str, str] = {}
            for link in links:
                key, value = getattr(link, what), getattr(link, other)
                if seen.setdefault(key, value) != value:
                    raise ValueError(f"more than one link with {what} {key}: its ends name {other} {seen[key]} "
                                     f"and {value}")
        ends = [link.end for link in links]
        twice = sorted({f"{link.name} to replica {link.peer_replica} of node {link.peer_node}"
                        for link in links if ends.count(link.end) > 1})
        if twice:
            raise ValueError(f"more than one link with name {', '.join(twice)}")
        return links

    @field_validator("replicas")
    @classmethod
    def _ordinals(cls, replicas: dict[int, str]) -> dict[int, str]:
        negative = sorted(r for r in replicas if r < 0)
        if negative:
            raise ValueError(f"replica ordinals are >= 0, got {negative}")
        return replicas

    def check_at(self, node: str, replica: int = 0) -> None:
        """Raise ``InvalidTopology`` unless this topology can be that of ``node``'s KM replica ``replica``."""
        for i, link in enumerate(self.links):
            if link.peer_node == node:
                raise InvalidTopology(f"links.{i}.peer_node: link {link.name} joins node {node} to itself")
        if self.replicas and replica not in self.replicas:
            raise InvalidTopology(f"replicas: names replicas {sorted(self.replicas)} of node {node}, not this KM's "
                                  f"replica {replica}")


def parse_topology(data: dict, node: str, replica: int = 0) -> KMTopology:
    """``data`` as the topology of ``node``'s KM replica ``replica``; ``InvalidTopology`` naming every bad field."""
    try:
        topology = KMTopology.model_validate(data)
    except ValidationError as e:
        raise InvalidTopology(_problems(e)) from None
    topology.check_at(node, replica)
    return topology


class KMConfig(_Strict):
    """A KM's identity and process settings: what needs a new process to change."""

    node: str
    kme_id: str
    replica: int = Field(
        0, ge=0, description="this KM's ordinal among its node's KM replicas (the StatefulSet pod index); the "
                             "environment variable VQKD_KM_REPLICA overrides it")
    etsi014_listen: HostPort
    grpc_listen: HostPort
    metrics_listen: HostPort
    etsi014_reuse_port: bool = Field(
        False, description="bind the ETSI 014 listener with SO_REUSEPORT, so the replicas of a node on one host "
                           "share its port (the local runtime's stand-in for a Service)")
    tls: TLSPaths
    control_plane: HostPort | None = Field(
        None, description="ControlPlane gRPC address; without one the KM serves adjacent SAE pairs on its own")
    topology: KMTopology | None = Field(
        None, description="the topology to start with, for a KM running on its own; with a control plane, "
                          "leave it out: the control plane pushes it")
    delivered_key_ttl_s: float = Field(3600.0, gt=0, description="how long a key waits for its slave SAE")
    delivered_store_max_bits: int = Field(2 * 1024**3, gt=0, description="bound on keys waiting for slave SAEs")

    @model_validator(mode="after")
    def _topology_of_this_node(self) -> KMConfig:
        if self.topology is not None:
            try:
                self.topology.check_at(self.node, self.replica)
            except InvalidTopology as e:
                raise ValueError(f"topology.{e}") from None
        return self


class ModuleEndConfig(_Strict):
    """One end of an emulated QKD module pair, serving ETSI 014 to the KM of its node."""

    listen: HostPort
    sae_id: str = Field(description="the SAE ID of the KM attached to this end")
    client: str = Field(description="identity URI allowed to call this end, e.g. vqkd://km/<node>")
    kme_id: str
    tls: TLSPaths


class DeviceProfile(_Strict):
    """How the emulated module pair behaves, so it can stand in for a particular QKD device.

    The defaults are vqkd's own twin: large keys and batches, and a slave end that hands
    over keys at once.
    """

    key_size: int = Field(256, gt=0, multiple_of=8, description="default key size announced in status, bits")
    max_key_size: int = Field(65536, gt=0, multiple_of=8, description="largest key one request may ask for, bits")
    max_keys_per_request: int = Field(4096, gt=0, description="most keys in one enc_keys or dec_keys request")
    slave_latency_ms_per_key: float = Field(
        0.0, ge=0, le=10_000, description="time an end takes per key to answer dec_keys; an end answers one at a time")
    sync_lag_ms: float = Field(
        0.0, ge=0, le=600_000,
        description="keys taken at one end reach the other end this much later; dec_keys before then: not found")
    error_rate: float = Field(
        0.0, ge=0, lt=1, description="share of ETSI 014 requests refused with 503 and nothing consumed")
    tls12_only: bool = Field(False, description="both ends speak TLS 1.2 and no later version")

    @model_validator(mode="after")
    def _default_size_allowed(self) -> DeviceProfile:
        if self.key_size > self.max_key_size:
            raise ValueError(f"key_size {self.key_size} must not exceed max_key_size {self.max_key_size}")
        return self


class EmulatedLinkConfig(_Strict):
    link: str
    key_rate_bps: float = Field(gt=0, description="secret key rate at zero QBER, bit/s")
    qber: float = Field(0.01, ge=0, le=0.5)
    buffer_bits: int = Field(256 * 1024 * 1024, gt=0, description="bound on produced key not yet drawn")
    device: DeviceProfile = DeviceProfile()
    admin_listen: HostPort = Field(description="plain HTTP on loopback: /metrics and the twin's control")
    ends: dict[Literal["a", "b"], ModuleEndConfig]

    @model_validator(mode="after")
    def _two_ends(self) -> EmulatedLinkConfig:
        if set(self.ends) != {"a", "b"}:
            raise ValueError(f"link {self.link}: ends must be exactly 'a' and 'b', got {sorted(self.ends)}")
        return self


def load(model: type[_Strict], path: Path) -> _Strict:
    """Read a JSON config file; exit with a message naming the file and the bad field."""
    try:
        return model.model_validate(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not JSON: {e}") from None
    except ValidationError as e:
        raise SystemExit(f"{path}: invalid {model.__name__}: {_problems(e)}") from None


def _problems(error: ValidationError) -> str:
    """Every problem of a validation error, each with the path of its field."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in error.errors()
    )
