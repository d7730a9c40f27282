"""Access control (paper §3.1): who is behind an open request, and may they open it.

A KM asks on behalf of an SAE it authenticated by the SAE's client certificate
(``vqkd://sae/<saeId>``). Access control finds the UserProfile owning that SAE and applies
the profile's own authentication on top, when it sets one: the certificate subject its
SAEs must carry, or a bearer token kept in a Secret. Then it checks that the SAE is one of
the session's two ends and is attached to the node that asks, that the user is enabled,
and that the user may use both nodes (``sla.allowedNodes``, empty = all).

Every answer is a ``Decision``; a refusal carries a CamelCase reason and a message saying
what was wrong and what was expected, and never reveals a secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

from vqkd.operator.control.errors import ControlError
from vqkd.km.domain.vocabulary import Endpoint
from vqkd.operator.control.topology import Topology
from vqkd.operator.resources.models import TokenSecretRef, UserProfile


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the KM learnt about the caller."""

    sae_id: str  # from the client certificate, verified by the KM's TLS
    certificate_subject: str | None = None  # the certificate's subject, RFC 4514
    token: str | None = None  # a bearer token the application presented


# (namespace, secret reference) -> the token stored there, or None when the Secret or key is missing.
TokenLookup = Callable[[str, TokenSecretRef], str | None]


def no_tokens(namespace: str, ref: TokenSecretRef) -> None:
    """The lookup of a runtime that holds no Secrets: every token check fails closed."""
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    ok: bool
    reason: str  # CamelCase; "Authorized" when ok
    message: str
    user: UserProfile | None = None

    @classmethod
    def allow(cls, user: UserProfile) -> Decision:
        return cls(True, "Authorized", f"SAE authenticated as UserProfile {user.name}", user)

    @classmethod
    def refuse(cls, reason: str, message: str, user: UserProfile | None = None) -> Decision:
        return cls(False, reason, message, user)


class AccessControl:
    """The user-profile database and the checks made on it."""

    def __init__(self, topology: Topology, token_lookup: TokenLookup = no_tokens, namespace: str = "default"):
        self.topology = topology
        self.token_lookup = token_lookup
        self.namespace = namespace
        self.users: dict[str, UserProfile] = {}
        self._owner_of_sae: dict[str, str] = {}

    def put_user(self, user: UserProfile) -> None:
        for sae in user.spec.sae_ids:
            owner = self._owner_of_sae.get(sae, user.name)
            if owner != user.name:
                raise ControlError(
                    f"UserProfile {user.name}: SAE {sae!r} is already owned by UserProfile {owner}; "
                    "an SAE belongs to exactly one user"
                )
        self.remove_user(user.name)
        self.users[user.name] = user
        self._owner_of_sae.update(dict.fromkeys(user.spec.sae_ids, user.name))

    def remove_user(self, name: str) -> UserProfile | None:
        user = self.users.pop(name, None)
        if user is not None:
            for sae in user.spec.sae_ids:
                del self._owner_of_sae[sae]
        return user

    def owner_of(self, sae_id: str) -> UserProfile | None:
        name = self._owner_of_sae.get(sae_id)
        return self.users[name] if name is not None else None

    def authorize(self, credentials: Credentials, node: str, source: Endpoint, destination: Endpoint) -> Decision:
        """May the KM of ``node`` open a session from ``source`` to ``destination`` for this caller?"""
        caller = credentials.sae_id
        if source.sae_id == destination.sae_id or source.node == destination.node:
            return Decision.refuse(
                "InvalidEndpoints",
                f"a session joins two SAEs at two different nodes, got {source} and {destination}",
            )
        if caller not in (source.sae_id, destination.sae_id):
            return Decision.refuse(
                "NotAnEndpoint",
                f"SAE {caller} asked for a session between {source} and {destination}; "
                "an SAE may open only sessions it is an end of",
            )
        own_end = source if caller == source.sae_id else destination
        if own_end.node != node:
            return Decision.refuse(
                "WrongNode", f"SAE {caller} gave its node as {own_end.node}, but the KM of node {node} asked",
            )
        user = self.owner_of(caller)
        if user is None:
            return Decision.refuse(
                "UnknownSAE", f"SAE {caller} is not owned by any UserProfile; list it in a UserProfile's spec.saeIds",
            )
        refusal = self._authenticate(credentials, user)
        if refusal is not None:
            return refusal
        return self.permit(user, source, destination)

    def permit(self, user: UserProfile, source: Endpoint, destination: Endpoint) -> Decision:
        """May ``user`` hold a session between these ends? Also the check for declared KeySessions,
        whose user the resource names instead of an authenticated caller."""
        for end in (source, destination):
            attached = self.topology.node_of_sae(end.sae_id)
            if attached != end.node:
                where = f"is attached to node {attached}" if attached else "is not attached to any QKDNode"
                return Decision.refuse("UnknownEndpoint", f"SAE {end.sae_id} {where}, not to node {end.node}", user)
        if not user.spec.enabled:
            return Decision.refuse("UserDisabled", f"UserProfile {user.name} is disabled (spec.enabled: false)", user)
        allowed = user.spec.sla.allowed_nodes
        for end in (source, destination):
            if allowed and end.node not in allowed:
                return Decision.refuse(
                    "NodeNotAllowed",
                    f"UserProfile {user.name} may use nodes {', '.join(allowed)} (spec.sla.allowedNodes), "
                    f"not {end.node}",
                    user,
                )
        return Decision.allow(user)

    def _authenticate(self, credentials: Credentials, user: UserProfile) -> Decision | None:
        method = user.spec.authentication
        if method.certificate_subject is not None and credentials.certificate_subject != method.certificate_subject:
            presented = credentials.certificate_subject or "no subject"
            return Decision.refuse(
                "CertificateSubjectMismatch",
                f"SAE {credentials.sae_id} presented a certificate with {presented!r}; UserProfile {user.name} "
                "requires the subject set in its spec.authentication.certificateSubject",
            )
        ref = method.token_secret_ref
        if ref is None:
            return None
        if not credentials.token:
            return Decision.refuse(
                "TokenMissing", f"UserProfile {user.name} authenticates with a bearer token and SAE "
                                f"{credentials.sae_id} presented none",
            )
        expected = self.token_lookup(self.namespace, ref)
        if expected is None:
            return Decision.refuse(
                "TokenSecretUnavailable",
                f"UserProfile {user.name}: key {ref.key!r} of Secret {ref.name} could not be read; "
                "create the Secret or fix spec.authentication.tokenSecretRef",
            )
        if not hmac.compare_digest(credentials.token.encode(), expected.encode()):
            return Decision.refuse(
                "TokenInvalid", f"SAE {credentials.sae_id} presented a token that does not match UserProfile "
                                f"{user.name}'s Secret {ref.name}",
            )
        return None
