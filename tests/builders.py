"""Builders the tests share: a clock they drive by hand and the vqkd resources in few words.

Import them as ``from builders import Clock, link, node, user`` (pytest puts tests/ on the path).
"""

from __future__ import annotations

from typing import Any

from vqkd.operator.resources.models import QKDLink, QKDNode, UserProfile


class Clock:
    """A clock that moves only when a test moves it: pass it where code takes ``clock=``."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def node(name: str, *saes: str, **spec: Any) -> QKDNode:
    """A QKDNode with these SAEs attached (and any other spec fields, by their YAML names)."""
    return QKDNode.model_validate({"metadata": {"name": name}, "spec": {"saeIds": list(saes)} | spec})


def link(a: str, b: str, name: str | None = None, rate: float = 10_000, qber: float = 0.01, **spec: Any) -> QKDLink:
    """An emulated QKDLink between nodes ``a`` and ``b``, named ``a-b`` unless told otherwise."""
    emulated = {"keyRateBps": rate, "qber": qber}
    return QKDLink.model_validate({
        "metadata": {"name": name or f"{a}-{b}"},
        "spec": {"nodes": [a, b], "emulated": emulated} | spec,
    })


def user(name: str, saes: list[str], **spec: Any) -> UserProfile:
    """A UserProfile owning these SAEs (any other spec fields by their YAML names, e.g. ``sla={...}``)."""
    return UserProfile.model_validate({"metadata": {"name": name}, "spec": {"saeIds": saes} | spec})
