"""The vqkd operator: every kopf decorator, each handing its event to the controllers of its concern.

A resource event goes to the resource handler of its kind (into the control core). For
QKDNodes and QKDLinks the host then pushes every KM whose topology the change altered
(after the core rerouted the sessions off a deleted one), and the workloads controller
applies or removes their workloads (and, for a QKDNode, the replicas controller its
autoscaler). The KM StatefulSets are watched for the replicas they report. The operator is
assembled in ``handlers.lifecycle`` and reached through ``memo.operator``.

Run it with ``vqkd operator`` (see ``operate``) or ``kopf run -m vqkd.operator.kopf.main
--namespace NS --standalone`` (settings then come from VQKD_* variables).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import kopf

from vqkd.operator.kopf.handlers import lifecycle
from vqkd.operator.kopf.handlers.lifecycle import Operator
from vqkd.operator.kopf.manifests import LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_ORIGIN, MANAGED_BY, ORIGIN_APPLICATION
from vqkd.operator.kopf.runtime import OperatorOptions
from vqkd.operator.resources.models import API_GROUP, API_VERSION_NAME

QKDNODES = (API_GROUP, API_VERSION_NAME, "qkdnodes")
QKDLINKS = (API_GROUP, API_VERSION_NAME, "qkdlinks")
KM_STATEFULSETS = ("apps", "v1", "statefulsets")
USERPROFILES = (API_GROUP, API_VERSION_NAME, "userprofiles")
KEYSESSIONS = (API_GROUP, API_VERSION_NAME, "keysessions")
APPLICATION_SESSION_GC_S = 60.0
TOKEN_REFRESH_S = 60.0


async def operate(options: OperatorOptions, *, stop_flag: threading.Event | None = None,
                  ready_flag: threading.Event | None = None) -> None:
    """Run the operator in this event loop until ``stop_flag`` is set (or SIGINT/SIGTERM)."""
    await kopf.operator(
        namespaces=[options.namespace], standalone=True, liveness_endpoint=options.liveness_endpoint,
        memo=kopf.Memo(options=options), stop_flag=stop_flag, ready_flag=ready_flag,
    )


# --- operator lifecycle ---------------------------------------------------------------

@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    await lifecycle.startup(settings, memo, logger)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await lifecycle.cleanup(memo)


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return lifecycle.login(memo)


@kopf.on.probe(id="kms")
def kms_probe(memo: kopf.Memo, **_: Any) -> dict[str, int]:
    return memo.operator.km_health.probe()


# --- QKDNode --------------------------------------------------------------------------

@kopf.on.resume(*QKDNODES)
@kopf.on.create(*QKDNODES)
@kopf.on.update(*QKDNODES)
async def node_changed(body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo.operator
    with operator.reconciling("QKDNode"):
        await operator.nodes.reconcile(body)
        await operator.runtime.host.topologies.refresh()
        await operator.workloads.node_changed(name)
        await operator.replicas.node_changed(name)


@kopf.on.delete(*QKDNODES)
async def node_deleted(body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo.operator
    with operator.reconciling("QKDNode"):
        await operator.nodes.delete(body)
        await operator.runtime.host.topologies.refresh()
        await operator.workloads.node_deleted(name)
        await operator.replicas.node_deleted(name)


@kopf.daemon(*QKDNODES, cancellation_timeout=5.0)
async def node_guard(name: str, stopped: kopf.DaemonStopped, memo: kopf.Memo, logger: logging.Logger,
                     **_: Any) -> None:
    await memo.operator.workloads.guard(name, stopped, logger)


@kopf.on.event(*KM_STATEFULSETS, labels={LABEL_COMPONENT: "key-manager", LABEL_MANAGED_BY: MANAGED_BY})
async def km_statefulset_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.operator.replicas.statefulset_seen(event.get("type"), event["object"])


# --- QKDLink --------------------------------------------------------------------------

@kopf.on.resume(*QKDLINKS)
@kopf.on.create(*QKDLINKS)
@kopf.on.update(*QKDLINKS)
async def link_changed(body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo.operator
    with operator.reconciling("QKDLink"):
        await operator.links.reconcile(body)
        await operator.runtime.host.topologies.refresh()
        await operator.workloads.link_changed(name)


@kopf.on.delete(*QKDLINKS)
async def link_deleted(body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo.operator
    with operator.reconciling("QKDLink"):
        await operator.links.delete(body)
        await operator.runtime.host.topologies.refresh()
        await operator.workloads.link_deleted(name)


# --- UserProfile ----------------------------------------------------------------------

@kopf.on.resume(*USERPROFILES)
@kopf.on.create(*USERPROFILES)
@kopf.on.update(*USERPROFILES)
async def user_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo.operator
    with operator.reconciling("UserProfile"):
        await operator.users.reconcile(body)


@kopf.on.delete(*USERPROFILES)
async def user_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo.operator
    with operator.reconciling("UserProfile"):
        await operator.users.delete(body)


@kopf.timer(*USERPROFILES, interval=TOKEN_REFRESH_S, initial_delay=TOKEN_REFRESH_S)
async def user_token_refresh(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.operator.users.refresh_token(body)


# --- KeySession -----------------------------------------------------------------------

@kopf.on.resume(*KEYSESSIONS)
@kopf.on.create(*KEYSESSIONS)
@kopf.on.update(*KEYSESSIONS)
async def session_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo.operator
    with operator.reconciling("KeySession"):
        await operator.sessions.reconcile(body)


@kopf.on.delete(*KEYSESSIONS)
async def session_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo.operator
    with operator.reconciling("KeySession"):
        await operator.sessions.delete(body)


@kopf.timer(*KEYSESSIONS, labels={LABEL_ORIGIN: ORIGIN_APPLICATION}, interval=APPLICATION_SESSION_GC_S)
async def application_session_gc(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.operator.applications.collect(body)
