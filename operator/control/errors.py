"""Changes the control core refuses. Messages say what was wrong and what to do about it."""

from __future__ import annotations


class ControlError(ValueError):
    """Input the control plane cannot take as it is; retrying the same input will not help."""


class UnresolvedReference(ControlError):
    """A resource names another one that is not registered (yet); retry once it is.

    Kubernetes delivers resources in no particular order, so a runtime should treat this
    as temporary.
    """
