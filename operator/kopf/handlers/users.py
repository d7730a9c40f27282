"""UserProfile: the user-profile database of access and admission control.

A profile that authenticates with a bearer token has the token read from its Secret here,
in a worker thread, because access control asks for it on the event loop and must not
wait for the API server there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from typing import Any

from vqkd.operator.control.errors import ControlError
from vqkd.operator.kopf.handlers.common import dump, refuse, validated
from vqkd.operator.kopf.kube import SECRETS, KubeError
from vqkd.operator.kopf.runtime import Runtime
from vqkd.operator.resources.models import ConditionType, UserProfile, UserProfileStatus

KIND = "UserProfile"


async def reconcile(runtime: Runtime, body: Mapping[str, Any]) -> None:
    with runtime.metrics.reconcile(KIND):
        user = validated(runtime, KIND, body)
        token_problem = await _read_token(runtime, user)
        try:
            await runtime.core.apply(user)
        except ControlError as e:
            refuse(runtime, KIND, user.name, "Conflict", str(e))
        runtime.resources.users[user.name] = user
        if token_problem is not None:
            # The profile is in effect; its sessions are refused until the token can be read.
            runtime.problem(KIND, user.name, "TokenSecretUnavailable", token_problem, permanent=False)
        else:
            runtime.solved(KIND, user.name)


async def delete(runtime: Runtime, body: Mapping[str, Any]) -> None:
    name = body["metadata"]["name"]
    with runtime.metrics.reconcile(KIND):
        await runtime.core.delete(KIND, name)
        runtime.forget(KIND, name)


async def _read_token(runtime: Runtime, user: UserProfile) -> str | None:
    """Cache the profile's bearer token; a message when it cannot be read."""
    ref = user.spec.authentication.token_secret_ref
    if ref is None:
        return None
    key = (runtime.namespace, ref.name, ref.key)
    where = f"UserProfile {user.name}: spec.authentication.tokenSecretRef"
    try:
        secret = await asyncio.to_thread(runtime.kube.get, SECRETS, ref.name)
    except (KubeError, OSError) as e:
        runtime.metrics.errors(KIND).inc()
        return f"{where}: reading Secret {ref.name} failed: {e}"
    encoded = (secret or {}).get("data", {}).get(ref.key)
    if encoded is None:
        runtime.tokens.pop(key, None)
        what = f"Secret {ref.name} does not exist" if secret is None else f"Secret {ref.name} has no key {ref.key!r}"
        return f"{where}: {what}"
    try:
        runtime.tokens[key] = base64.b64decode(encoded, validate=True).decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        runtime.tokens.pop(key, None)
        return f"{where}: key {ref.key!r} of Secret {ref.name} is not base64-encoded UTF-8 text"
    return None


def status_of(runtime: Runtime, name: str, previous: dict[str, Any]) -> dict[str, Any]:
    status = UserProfileStatus.model_validate(previous)
    generation = runtime.generation(KIND, name)
    problem = runtime.problems.get((KIND, name))
    usage = runtime.core.user_usage(name)
    status.active_sessions = usage["sessions"]
    status.usage.reserved_bps = usage["reservedBps"]
    status.usage.delivered_keys = usage["keysDelivered"]
    status.usage.delivered_bits = usage["bitsDelivered"]
    if problem is not None:
        status.set_condition(ConditionType.READY, "False", problem.reason, problem.message,
                             observed_generation=generation)
    else:
        user = runtime.resources.users.get(name)
        enabled = user is None or user.spec.enabled
        status.set_condition(ConditionType.READY, "True" if enabled else "False",
                             "Registered" if enabled else "Disabled",
                             f"{usage['sessions']} active sessions reserving {usage['reservedBps']} bit/s"
                             if enabled else "spec.enabled is false: new sessions are refused",
                             observed_generation=generation)
    status.observed_generation = generation
    return dump(status)


async def refresh_token(runtime: Runtime, body: Mapping[str, Any]) -> None:
    """Pick up a rotated token; the profile itself is unchanged."""
    user = runtime.resources.users.get(body["metadata"]["name"])
    if user is None or user.spec.authentication.token_secret_ref is None:
        return
    problem = await _read_token(runtime, user)
    if problem is not None:
        runtime.problem(KIND, user.name, "TokenSecretUnavailable", problem, permanent=False)
    else:
        runtime.solved(KIND, user.name)
