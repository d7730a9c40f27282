"""QKDLink: the link in the control core's topology, its key source, and its module workload.

``LinkHandler`` registers each QKDLink with the control core. A link to real devices
(``etsi014``) gets no workload: its two KMs are pointed at the devices' ETSI 014 endpoints,
so the Secrets named for the device credentials must exist before it is accepted. An
emulated link gets the emulated QKD module pair as a workload of its own, rendered by
``module_children`` (the workloads controller applies it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import kopf

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.control.errors import ControlError, UnresolvedReference
from vqkd.operator.kopf.handlers import nodes
from vqkd.operator.kopf.handlers.common import Problems, validated
from vqkd.operator.kopf.kube import SECRETS, Kube
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.kopf.manifests import (
    ClusterAddressing, build_module_configmap, build_module_deployment, build_module_service, content_hash,
    with_spec_hash,
)
from vqkd.operator.plan import module_config
from vqkd.operator.resources.models import ConditionType, QKDLink, QKDLinkStatus

KIND = "QKDLink"
DEVICE_SECRET_KEYS = ("ca.crt", "tls.crt", "tls.key")


class LinkHandler:
    """QKDLink into the control core; owns the link's state, measurements and readiness in its status."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.problems = Problems(KIND, runtime.status, runtime.options.retry_delay_s)

    async def reconcile(self, body: Mapping[str, Any]) -> None:
        runtime = self.runtime
        link = validated(runtime.status, self.problems, body)
        if link.spec.etsi014 is not None:
            missing = await asyncio.to_thread(_missing_device_secrets, runtime.kube, link)
            if missing:
                self.problems.wait(link.name, "SecretMissing", f"QKDLink {link.name}: {'; '.join(missing)}")
        try:
            await runtime.core.apply(link)
        except UnresolvedReference as e:
            self.problems.wait(link.name, "UnresolvedReference", str(e))
        except ControlError as e:
            self.problems.refuse(link.name, "Conflict", str(e))
        runtime.resources.links[link.name] = link
        self.problems.solved(link.name)

    async def delete(self, body: Mapping[str, Any]) -> None:
        runtime = self.runtime
        name = body["metadata"]["name"]
        await runtime.core.delete(KIND, name)
        runtime.status.forget(KIND, name)
        self.problems.forget(name)
        runtime.resources.links.pop(name, None)

    def show_state(self, name: str, status: QKDLinkStatus, generation: int | None) -> bool:
        """The link as the control core sees it: state, measurements, reservations, ``LinkUp``.
        A link the core does not hold is Down, and nothing else applies."""
        row = next((row for row in self.runtime.core.links() if row["name"] == name), None)

        def condition(type: str, ok: bool, reason: str, message: str) -> None:
            status.set_condition(type, "True" if ok else "False", reason, message, observed_generation=generation)

        if row is None:
            problem = self.problems.get(name)
            reason, message = (problem.reason, problem.message) if problem else ("Pending", "not registered yet")
            status.state, status.reason = LinkState.DOWN, message
            for type in (ConditionType.LINK_UP, ConditionType.CONFIGURED, ConditionType.READY):
                condition(type, False, reason, message)
            return True
        state = LinkState(row["state"])
        status.state = state
        status.key_rate_bps = _significant(row["keyRateBps"]) if row["measured"] else None
        status.qber = _significant(row["qber"]) if row["measured"] else None
        status.stored_key_bits = row["storedKeyBits"]
        status.burned_bits = row["burnedBits"]
        status.reserved_bps = round(row["reservedBps"])
        status.sessions = row["sessions"]
        status.reason = row["message"] or None
        condition(ConditionType.LINK_UP, state is not LinkState.DOWN, row["reason"] or str(state),
                  row["message"] or f"link {state}")
        return False

    def show_ready(self, name: str, status: QKDLinkStatus, generation: int | None) -> bool:
        """Ready: the link is up and its workload configured (both written by the parts before)."""
        up, configured = (_holds(status, type) for type in (ConditionType.LINK_UP, ConditionType.CONFIGURED))
        ready = up and configured
        status.set_condition(ConditionType.READY, "True" if ready else "False",
                             "LinkReady" if ready else "LinkNotReady",
                             f"state {status.state}, {'configured' if configured else 'not configured'}",
                             observed_generation=generation)
        return True


def _holds(status: QKDLinkStatus, type: str) -> bool:
    condition = status.condition(type)
    return condition is not None and condition.status == "True"


def _missing_device_secrets(kube: Kube, link: QKDLink) -> list[str]:
    problems = []
    for node, endpoint in sorted(link.spec.etsi014.endpoints.items()):
        secret_name = endpoint.secret_ref.name
        secret = kube.get(SECRETS, secret_name)
        where = f"spec.etsi014.endpoints.{node}.secretRef"
        if secret is None:
            problems.append(f"{where}: Secret {secret_name} does not exist; create it with keys "
                            f"{', '.join(DEVICE_SECRET_KEYS)}")
            continue
        absent = [key for key in DEVICE_SECRET_KEYS if key not in (secret.get("data") or {})]
        if absent:
            problems.append(f"{where}: Secret {secret_name} lacks keys {', '.join(absent)}")
    return problems


def module_children(runtime: Runtime, link: QKDLink) -> tuple[dict[str, Any], ...]:
    """ConfigMap, Service and Deployment of an emulated link's module pair, owned by the link;
    none for a link to QKD devices."""
    if link.spec.emulated is None:
        children: tuple[dict[str, Any], ...] = ()
    else:
        configmap = build_module_configmap(link.name, module_config(link, ClusterAddressing(runtime.namespace)))
        children = (configmap, build_module_service(link.name),
                    build_module_deployment(link.name, runtime.options.module_image, content_hash(configmap["data"]),
                                            runtime.ca_hash))
    owner = nodes.owner_of(runtime, KIND, link.name)
    if owner is not None:
        kopf.adopt(list(children), owner=owner)
    return tuple(with_spec_hash(child) for child in children)


def _significant(value: float | None) -> float | None:
    # Three significant digits: a status rewritten for every jitter of a measurement is noise.
    return None if value is None else float(f"{value:.3g}")
