"""UserProfile: the user-profile database of access and admission control.

A profile that authenticates with a bearer token has the token read from its Secret here,
in a worker thread, and kept in ``Tokens``, because access control asks for it on the event
loop and must not wait for the API server there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from typing import Any

from vqkd.operator.control.errors import ControlError
from vqkd.operator.kopf.handlers.common import Problems, validated
from vqkd.operator.kopf.kube import SECRETS, KubeError
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.resources.models import ConditionType, TokenSecretRef, UserProfile, UserProfileStatus

KIND = "UserProfile"


class Tokens:
    """The bearer tokens of the profiles that use one, by (namespace, Secret, key)."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], str] = {}

    def lookup(self, namespace: str, ref: TokenSecretRef) -> str | None:
        """Access control's ``TokenLookup``."""
        return self._tokens.get((namespace, ref.name, ref.key))

    def put(self, key: tuple[str, str, str], token: str) -> None:
        self._tokens[key] = token

    def drop(self, key: tuple[str, str, str]) -> None:
        self._tokens.pop(key, None)


class UserHandler:
    """UserProfile into the control core; owns the profile's status."""

    def __init__(self, runtime: Runtime, tokens: Tokens):
        self.runtime = runtime
        self.tokens = tokens
        self.problems = Problems(KIND, runtime.status, runtime.options.retry_delay_s)

    async def reconcile(self, body: Mapping[str, Any]) -> None:
        runtime = self.runtime
        user = validated(runtime.status, self.problems, body)
        token_problem = await self._read_token(user)
        try:
            await runtime.core.apply(user)
        except ControlError as e:
            self.problems.refuse(user.name, "Conflict", str(e))
        runtime.resources.users[user.name] = user
        if token_problem is not None:
            # The profile is in effect; its sessions are refused until the token can be read.
            self.problems.note(user.name, "TokenSecretUnavailable", token_problem, permanent=False)
        else:
            self.problems.solved(user.name)

    async def delete(self, body: Mapping[str, Any]) -> None:
        runtime = self.runtime
        name = body["metadata"]["name"]
        await runtime.core.delete(KIND, name)
        runtime.status.forget(KIND, name)
        self.problems.forget(name)
        runtime.resources.users.pop(name, None)

    async def refresh_token(self, body: Mapping[str, Any]) -> None:
        """Pick up a rotated token; the profile itself is unchanged."""
        user = self.runtime.resources.users.get(body["metadata"]["name"])
        if user is None or user.spec.authentication.token_secret_ref is None:
            return
        problem = await self._read_token(user)
        if problem is not None:
            self.problems.note(user.name, "TokenSecretUnavailable", problem, permanent=False)
        else:
            self.problems.solved(user.name)

    async def _read_token(self, user: UserProfile) -> str | None:
        """Cache the profile's bearer token; a message when it cannot be read."""
        ref = user.spec.authentication.token_secret_ref
        if ref is None:
            return None
        runtime = self.runtime
        key = (runtime.namespace, ref.name, ref.key)
        where = f"UserProfile {user.name}: spec.authentication.tokenSecretRef"
        try:
            secret = await asyncio.to_thread(runtime.kube.get, SECRETS, ref.name)
        except (KubeError, OSError) as e:
            runtime.metrics.errors(KIND).inc()
            return f"{where}: reading Secret {ref.name} failed: {e}"
        encoded = (secret or {}).get("data", {}).get(ref.key)
        if encoded is None:
            self.tokens.drop(key)
            what = f"Secret {ref.name} does not exist" if secret is None \
                else f"Secret {ref.name} has no key {ref.key!r}"
            return f"{where}: {what}"
        try:
            self.tokens.put(key, base64.b64decode(encoded, validate=True).decode().strip())
        except (binascii.Error, UnicodeDecodeError):
            self.tokens.drop(key)
            return f"{where}: key {ref.key!r} of Secret {ref.name} is not base64-encoded UTF-8 text"
        return None

    def show(self, name: str, status: UserProfileStatus, generation: int | None) -> bool:
        usage = self.runtime.core.user_usage(name)
        status.active_sessions = usage["sessions"]
        status.usage.reserved_bps = usage["reservedBps"]
        status.usage.delivered_keys = usage["keysDelivered"]
        status.usage.delivered_bits = usage["bitsDelivered"]
        problem = self.problems.get(name)
        if problem is not None:
            status.set_condition(ConditionType.READY, "False", problem.reason, problem.message,
                                 observed_generation=generation)
            return True
        user = self.runtime.resources.users.get(name)
        enabled = user is None or user.spec.enabled
        status.set_condition(ConditionType.READY, "True" if enabled else "False",
                             "Registered" if enabled else "Disabled",
                             f"{usage['sessions']} active sessions reserving {usage['reservedBps']} bit/s"
                             if enabled else "spec.enabled is false: new sessions are refused",
                             observed_generation=generation)
        return True
