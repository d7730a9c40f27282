"""The resource models: wire names, defaults, validation messages, conditions, registry."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from uuid import UUID

import pytest
from pydantic import ValidationError

from vqkd.km.config import KeyLimits
from vqkd.operator.resources import models as r


def doc(kind: str, name: str, spec: dict | None, **extra) -> dict:
    document = {"apiVersion": r.API_VERSION, "kind": kind, "metadata": {"name": name}, **extra}
    if spec is not None:
        document["spec"] = spec
    return document


LINK = {"nodes": ["n4", "n5"], "emulated": {"keyRateBps": 1000}}
SESSION = {
    "user": "u",
    "source": {"node": "n4", "saeId": "sae-4"},
    "destination": {"node": "n5", "saeId": "sae-5"},
}


def problems(document: dict) -> str:
    with pytest.raises(r.InvalidResource) as caught:
        r.parse(document)
    return str(caught.value)


# --- wire form -------------------------------------------------------------------------


def test_wire_names_are_camel_case_and_python_names_snake_case():
    link = r.parse(doc("QKDLink", "star-4-5", {**LINK, "qberThreshold": 0.1}))
    assert isinstance(link, r.QKDLink)
    assert link.spec.emulated.key_rate_bps == 1000
    assert link.spec.qber_threshold == 0.1
    wire = link.to_dict()
    assert wire["apiVersion"] == "vqkd.io/v1alpha1"
    assert wire["spec"]["emulated"] == {"keyRateBps": 1000.0, "qber": 0.01, "bufferBits": 256 * 1024 * 1024}
    assert wire["spec"]["qberThreshold"] == 0.1
    assert "etsi014" not in wire["spec"]  # unset optionals are left out, not written as null


def test_round_trip_through_the_wire_form_is_lossless():
    session = r.parse(doc("KeySession", "s1", {**SESSION, "qos": {"maxBps": 4096, "fallback": "pqc"}}))
    session.status.phase = r.SessionPhase.ACTIVE
    session.status.session_id = UUID("5f0c7f4e-3c2a-4f55-9a4c-6fd6f7a6b0de")
    session.status.path = ["n4", "n5"]
    session.status.set_condition("Ready", "True", "PathConfigured", "keys flow")
    wire = session.to_dict()
    assert wire["status"]["sessionId"] == "5f0c7f4e-3c2a-4f55-9a4c-6fd6f7a6b0de"
    assert wire["status"]["conditions"][0]["lastTransitionTime"].endswith("Z")
    assert r.parse(copy.deepcopy(wire)) == session


def test_python_names_are_accepted_too():
    user = r.UserProfile(metadata=r.ObjectMeta(name="u"), spec=r.UserProfileSpec(sae_ids=["a"], default_qos={"max_bps": 8}))
    assert user.to_dict()["spec"]["defaultQos"] == {"maxBps": 8}


def test_server_filled_metadata_is_read_and_unknown_metadata_ignored():
    node = r.parse(doc("QKDNode", "alice", None, metadata={
        "name": "alice", "namespace": "qkd", "uid": "u-1", "resourceVersion": "7", "generation": 3,
        "creationTimestamp": "2025-01-02T03:04:05Z", "finalizers": ["vqkd.io/km"],
        "ownerReferences": [{"apiVersion": "v1", "kind": "Namespace", "name": "qkd", "uid": "ns-1"}],
        "managedFields": [{"manager": "kubectl"}],
    }))
    assert node.namespace == "qkd"
    assert node.metadata.generation == 3
    assert node.metadata.creation_timestamp == datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert node.metadata.owner_references[0].uid == "ns-1"


def test_status_tolerates_fields_from_a_newer_writer_but_spec_refuses_unknown_fields():
    link = r.parse(doc("QKDLink", "l", LINK, status={"state": "Up", "futureField": 1}))
    assert link.status.state is r.LinkState.UP
    assert problems(doc("QKDLink", "l", {**LINK, "qberTreshold": 0.1})) == (
        "QKDLink l: spec.qberTreshold: unknown field; expected one of emulated, etsi014, nodes, qberThreshold, type"
    )


# --- defaults --------------------------------------------------------------------------


def test_node_defaults_come_from_the_km_configuration():
    node = r.parse(doc("QKDNode", "relay", None))
    assert node.spec.sae_ids == []
    assert node.spec.km.image == r.DEFAULT_KM_IMAGE
    assert node.spec.km.resources.requests.memory == "128Mi"
    assert node.spec.km.key_limits() == KeyLimits()
    assert node.kme_id == "relay"
    assert r.parse(doc("QKDNode", "relay", {"kmeId": "KME-7"})).kme_id == "KME-7"


def test_link_defaults():
    spec = r.parse(doc("QKDLink", "l", LINK)).spec
    assert spec.type is r.LinkType.PHYSICAL
    assert spec.emulated.qber == 0.01
    assert spec.qber_threshold == 0.11


def test_effective_qos_takes_session_then_user_then_vqkd_defaults():
    user = r.parse(doc("UserProfile", "u", {"saeIds": ["sae-4"], "defaultQos": {"maxBps": 2048, "ttl": 60}}))
    session = r.parse(doc("KeySession", "s", {**SESSION, "qos": {"ttl": 5}}))
    qos = session.effective_qos(user)
    assert (qos.max_bps, qos.ttl) == (2048, 5)
    assert qos.key_chunk_size == KeyLimits().key_size // 8
    assert qos.fallback is r.Fallback.NONE
    assert session.effective_qos(None).max_bps is None  # only the SLA and the path bound it then


# --- validation messages ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            doc("QKDLink", "star-4-5", {**LINK, "nodes": ["n4", "n4"]}),
            "QKDLink star-4-5: spec.nodes: must name two distinct QKDNodes, got ['n4', 'n4']",
        ),
        (
            doc("QKDLink", "star-4-5", {**LINK, "nodes": ["n4"]}),
            "QKDLink star-4-5: spec.nodes: List should have at least 2 items after validation, not 1 (got ['n4'])",
        ),
        (
            doc("QKDLink", "l", {"nodes": ["a", "b"]}),
            "QKDLink l: spec: set exactly one key source, emulated or etsi014; got neither",
        ),
        (
            doc("QKDLink", "l", {**LINK, "etsi014": {"endpoints": {}}}),
            "QKDLink l: spec.etsi014.endpoints: Dictionary should have at least 2 items after validation, not 0 (got {})",
        ),
        (
            doc("QKDLink", "l", {"nodes": ["a", "b"], "emulated": {"keyRateBps": 1}, "etsi014": {"endpoints": {
                n: {"url": "https://m", "saeId": "x", "peerSaeId": "y", "secretRef": {"name": "s"}} for n in "ab"
            }}}),
            "QKDLink l: spec: set exactly one key source, emulated or etsi014; got both",
        ),
        (
            doc("QKDLink", "l", {"nodes": ["a", "b"], "etsi014": {"endpoints": {
                n: {"url": "https://m", "saeId": "x", "peerSaeId": "y", "secretRef": {"name": "s"}} for n in "ac"
            }}}),
            "QKDLink l: spec.etsi014.endpoints: must have one entry per linked node ['a', 'b'], got ['a', 'c']",
        ),
        (
            doc("QKDLink", "l", {**LINK, "emulated": {"keyRateBps": 0, "qber": 0.7}}),
            "QKDLink l: spec.emulated.keyRateBps: Input should be greater than 0 (got 0); "
            "spec.emulated.qber: Input should be less than or equal to 0.5 (got 0.7)",
        ),
        (
            doc("QKDLink", "l", {**LINK, "type": "fizzical"}),
            "QKDLink l: spec.type: Input should be 'physical' or 'virtual' (got 'fizzical')",
        ),
        (
            doc("QKDNode", "Alice_1", {}),
            "QKDNode Alice_1: metadata.name: should be a DNS-1123 label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit (got 'Alice_1')",
        ),
        (
            doc("QKDNode", "a", {"saeIds": ["s1", "s2", "s1"]}),
            "QKDNode a: spec.saeIds[2]: SAE 's1' is listed twice",
        ),
        (
            doc("QKDNode", "a", {"saeIds": ["sae/1"]}),
            "QKDNode a: spec.saeIds[0]: should be an SAE ID: letters, digits, '.', '_' and '-', "
            "starting and ending with a letter or digit (got 'sae/1')",
        ),
        (
            doc("QKDNode", "a", {"km": {"keySize": 16384}}),
            "QKDNode a: spec.km.keySize: must lie between minKeySize and maxKeySize, got 64 <= 16384 <= 8192",
        ),
        (
            doc("QKDNode", "a", {"km": {"resources": {"limits": {"cpu": "lots"}}}}),
            "QKDNode a: spec.km.resources.limits.cpu: should be a Kubernetes quantity such as 100m, 0.5, 128Mi "
            "or 1G (got 'lots')",
        ),
        (
            doc("QKDNode", "a", {"km": {"autoscaling": {"minReplicas": 4, "maxReplicas": 2,
                                                        "target": {"cpuUtilization": 70}}}}),
            "QKDNode a: spec.km.autoscaling.minReplicas: must not exceed maxReplicas, got 4 > 2",
        ),
        (
            doc("QKDNode", "a", {"km": {"autoscaling": {"maxReplicas": 3, "target": {
                "cpuUtilization": 70, "requestsPerSecond": 100}}}}),
            "QKDNode a: spec.km.autoscaling.target: set exactly one of cpuUtilization and requestsPerSecond, got both",
        ),
        (
            doc("QKDNode", "a", {"km": {"autoscaling": {"maxReplicas": 3, "target": {}}}}),
            "QKDNode a: spec.km.autoscaling.target: set exactly one of cpuUtilization and requestsPerSecond, "
            "got neither",
        ),
        (
            doc("QKDNode", "a", {"km": {"replicas": 17}}),
            "QKDNode a: spec.km.replicas: Input should be less than or equal to 16 (got 17)",
        ),
        (
            doc("UserProfile", "u", {"saeIds": []}),
            "UserProfile u: spec.saeIds: List should have at least 1 item after validation, not 0 (got [])",
        ),
        (
            doc("UserProfile", "u", {"saeIds": ["a"], "authentication": {
                "certificateSubject": "CN=u", "tokenSecretRef": {"name": "t"}}}),
            "UserProfile u: spec.authentication: set at most one of certificateSubject and tokenSecretRef, got both",
        ),
        (
            doc("UserProfile", "u", {"saeIds": ["a"], "defaultQos": {"minBps": 10, "maxBps": 5}}),
            "UserProfile u: spec.defaultQos.minBps: must not exceed maxBps, got 10 > 5",
        ),
        (
            doc("KeySession", "s", {**SESSION, "destination": {"node": "n5", "saeId": "sae-4"}}),
            "KeySession s: spec.destination.saeId: must differ from source.saeId, got 'sae-4' for both",
        ),
        (
            doc("KeySession", "s", {**SESSION, "qos": {"priority": 300, "fallback": "quantum"}}),
            "KeySession s: spec.qos.priority: Input should be less than or equal to 255 (got 300); "
            "spec.qos.fallback: Input should be 'none' or 'pqc' (got 'quantum')",
        ),
        (
            doc("UserProfile", "u", {"saeIds": ["a"], "sla": "gold"}),
            "UserProfile u: spec.sla: should be a mapping (got 'gold')",
        ),
        (
            doc("KeySession", "s", {"user": "u", "source": {"node": "n4", "saeId": "sae-4"}}),
            "KeySession s: spec.destination: Field required",
        ),
    ],
)
def test_invalid_resources_name_the_field_and_what_is_expected(document, message):
    assert problems(document) == message


def test_models_enforce_their_rules_when_built_in_python():
    with pytest.raises(ValidationError) as caught:
        r.QKDLinkSpec(nodes=["a", "a"], emulated=r.EmulatedKeySource(key_rate_bps=1))
    assert caught.value.errors()[0]["loc"] == ("nodes",)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([{"kind": "QKDNode"}], "expected a resource (a mapping with apiVersion, kind, metadata and spec), got a list"),
        ({"apiVersion": r.API_VERSION, "metadata": {"name": "x"}},
         "x: kind is missing; expected one of KeySession, QKDLink, QKDNode, UserProfile"),
        (doc("QKDSwitch", "x", {}), "QKDSwitch x: unknown kind 'QKDSwitch'; expected one of KeySession, QKDLink, QKDNode, UserProfile"),
        ({**doc("QKDNode", "x", {}), "apiVersion": "vqkd.io/v1"},
         "QKDNode x: apiVersion: expected 'vqkd.io/v1alpha1', got 'vqkd.io/v1'"),
        ({"apiVersion": r.API_VERSION, "kind": "QKDLink", "spec": LINK}, "QKDLink: metadata: Field required"),
    ],
)
def test_documents_that_are_no_vqkd_resource(document, message):
    assert problems(document) == message


def test_invalid_resource_keeps_kind_name_and_each_problem():
    with pytest.raises(r.InvalidResource) as caught:
        r.parse(doc("QKDLink", "l", {**LINK, "emulated": {"keyRateBps": -1, "qber": 2}}))
    assert (caught.value.kind, caught.value.name, len(caught.value.problems)) == ("QKDLink", "l", 2)


# --- conditions ------------------------------------------------------------------------

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def test_set_condition_adds_then_replaces_by_type():
    status = r.QKDNodeStatus()
    assert status.set_condition(r.ConditionType.READY, "False", "KMStarting", at=T0) is True
    assert status.set_condition("Configured", "True", "Pushed", at=T0) is True
    assert status.set_condition("Ready", "True", "KMServing", "all links up", observed_generation=2,
                                at=T0 + timedelta(seconds=5)) is True
    assert [c.type for c in status.conditions] == ["Ready", "Configured"]  # order kept
    ready = status.condition("Ready")
    assert (ready.status, ready.reason, ready.message, ready.observed_generation) == ("True", "KMServing", "all links up", 2)
    assert ready.last_transition_time == T0 + timedelta(seconds=5)


def test_set_condition_keeps_transition_time_when_status_is_unchanged():
    status = r.QKDLinkStatus()
    status.set_condition("LinkUp", "False", "QBERAboveThreshold", at=T0)
    changed = status.set_condition("LinkUp", "False", "NoKey", "module unreachable", at=T0 + timedelta(minutes=1))
    assert changed is False  # no transition, so no Event
    condition = status.condition("LinkUp")
    assert (condition.reason, condition.message) == ("NoKey", "module unreachable")
    assert condition.last_transition_time == T0


def test_set_condition_function_returns_a_new_list():
    first = r.Condition(type="Ready", status="True", reason="Up", last_transition_time=T0)
    conditions = [first]
    updated = r.set_condition(conditions, first.model_copy(update={"status": "False", "reason": "Down",
                                                                   "last_transition_time": T0 + timedelta(1)}))
    assert conditions == [first]
    assert r.find_condition(updated, "Ready").status == "False"
    assert r.find_condition(updated, "Routed") is None


def test_condition_reason_must_be_camel_case():
    with pytest.raises(ValidationError, match="reason"):
        r.QKDNodeStatus().set_condition("Ready", "True", "all good")


def test_now_has_second_precision():
    assert r.now().microsecond == 0


# --- registry --------------------------------------------------------------------------


def test_registry_describes_every_kind():
    assert set(r.KINDS) == {"QKDNode", "QKDLink", "UserProfile", "KeySession"}
    assert {k: i.short_names for k, i in r.KINDS.items()} == {
        "QKDNode": ("qn",), "QKDLink": ("ql",), "UserProfile": ("up",), "KeySession": ("ks",),
    }
    for kind, info in r.KINDS.items():
        assert info.model.model_fields["kind"].default == kind
        assert info.crd_name == f"{info.plural}.vqkd.io"
        assert info.list_kind == f"{kind}List"
        assert info.categories == ("vqkd",)
        assert info.printer_columns[-1].name == "Age"
