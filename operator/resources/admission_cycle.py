"""The admission-control cycle of one session (paper §3.2, Fig. 2b): its states and transitions.

A configuration request within the user's SLA begins Accepted; one over it begins, and
ends, Terminated. An Accepted session becomes Active once both SAEs registered and every
KM of its path confirmed the configuration. Close requests, timer expiry and deletions end
it: Terminated. Accepted, Active and Terminated are the paper's; Held is vqkd's: an Active
session whose path broke with no alternative, kept (without reservations) until one
exists. Active → Active is a reroute onto a new path.

The states are defined here, below the resource models, because a KeySession's
``status.phase`` shows them (``models.SessionPhase.of``); the control core runs the cycle
(``control.lifecycle``, ``control.rerouting``).
"""

from __future__ import annotations

from enum import StrEnum


class AdmissionState(StrEnum):
    ACCEPTED = "Accepted"  # within the SLA; no path until both SAEs registered
    ACTIVE = "Active"  # path configured on every KM of it; its timer restarts with each key request
    HELD = "Held"  # admitted, its path lost and no other found; retried
    TERMINATED = "Terminated"  # refused or ended: deleted from every KM, reservations freed


# Where a configuration request leads: the session begins Accepted, or Terminated when refused.
ENTRY = frozenset({AdmissionState.ACCEPTED, AdmissionState.TERMINATED})

ALLOWED: dict[AdmissionState, frozenset[AdmissionState]] = {
    AdmissionState.ACCEPTED: frozenset({AdmissionState.ACTIVE, AdmissionState.TERMINATED}),
    AdmissionState.ACTIVE: frozenset({AdmissionState.ACTIVE, AdmissionState.HELD, AdmissionState.TERMINATED}),
    AdmissionState.HELD: frozenset({AdmissionState.ACTIVE, AdmissionState.TERMINATED}),
    AdmissionState.TERMINATED: frozenset(),
}
