"""Access control: who is behind an open request, and whether they may open it."""

from __future__ import annotations

import pytest

from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control.access import AccessControl, Credentials
from vqkd.operator.control.errors import ControlError
from vqkd.operator.control.events import EventLog
from vqkd.operator.control.topology import Topology

from builders import node, user

SECRETS = {("default", "alice-token", "token"): "s3cret"}
A, B, C = Endpoint("a", "sae-a"), Endpoint("b", "sae-b"), Endpoint("c", "sae-c")


@pytest.fixture
def access() -> AccessControl:
    topology = Topology(EventLog())
    for name in "abc":
        topology.apply_node(node(name, f"sae-{name}"), 0.0)
    control = AccessControl(topology, lambda ns, ref: SECRETS.get((ns, ref.name, ref.key)))
    control.put_user(user("plain", ["sae-a", "sae-b"]))
    return control


def test_an_sae_of_an_enabled_user_is_authorized(access):
    decision = access.authorize(Credentials("sae-a"), "a", A, B)
    assert decision.ok and decision.user.name == "plain" and decision.reason == "Authorized"
    assert access.authorize(Credentials("sae-b"), "b", A, B).ok, "the destination may open too"


@pytest.mark.parametrize(("credentials", "node", "ends", "reason"), [
    (Credentials("sae-c"), "c", (A, B), "NotAnEndpoint"),
    (Credentials("sae-a"), "b", (A, B), "WrongNode"),
    (Credentials("sae-a"), "a", (A, Endpoint("b", "sae-x")), "UnknownEndpoint"),
    (Credentials("sae-a"), "a", (A, Endpoint("c", "sae-b")), "UnknownEndpoint"),
    (Credentials("sae-c"), "c", (C, A), "UnknownSAE"),
    (Credentials("sae-a"), "a", (A, Endpoint("a", "sae-b")), "InvalidEndpoints"),
])
def test_refusals(access, credentials, node, ends, reason):
    decision = access.authorize(credentials, node, *ends)
    assert not decision.ok and decision.reason == reason and decision.message


def test_certificate_subject(access):
    access.put_user(user("plain", ["sae-a", "sae-b"], authentication={"certificateSubject": "CN=alice,O=bank"}))
    refused = access.authorize(Credentials("sae-a", certificate_subject="CN=mallory"), "a", A, B)
    assert refused.reason == "CertificateSubjectMismatch" and "CN=mallory" in refused.message
    assert access.authorize(Credentials("sae-a", certificate_subject="CN=alice,O=bank"), "a", A, B).ok


@pytest.mark.parametrize(("secret", "token", "reason"), [
    ("alice-token", None, "TokenMissing"),
    ("missing", "s3cret", "TokenSecretUnavailable"),
    ("alice-token", "guess", "TokenInvalid"),
    ("alice-token", "s3cret", "Authorized"),
])
def test_token(access, secret, token, reason):
    access.put_user(user("plain", ["sae-a", "sae-b"], authentication={"tokenSecretRef": {"name": secret}}))
    decision = access.authorize(Credentials("sae-a", token=token), "a", A, B)
    assert decision.reason == reason
    assert "s3cret" not in decision.message, "a refusal never shows the secret"


def test_disabled_user_and_allowed_nodes(access):
    access.put_user(user("plain", ["sae-a", "sae-b"], enabled=False))
    assert access.authorize(Credentials("sae-a"), "a", A, B).reason == "UserDisabled"
    access.put_user(user("plain", ["sae-a", "sae-b"], sla={"allowedNodes": ["a"]}))
    refused = access.authorize(Credentials("sae-a"), "a", A, B)
    assert refused.reason == "NodeNotAllowed" and "not b" in refused.message
    access.put_user(user("plain", ["sae-a", "sae-b"], sla={"allowedNodes": ["a", "b"]}))
    assert access.authorize(Credentials("sae-a"), "a", A, B).ok


def test_users_own_their_saes(access):
    with pytest.raises(ControlError, match="SAE 'sae-a' is already owned by UserProfile plain"):
        access.put_user(user("other", ["sae-a"]))
    access.remove_user("plain")
    access.put_user(user("other", ["sae-a"]))
    assert access.owner_of("sae-a").name == "other" and access.owner_of("sae-b") is None
