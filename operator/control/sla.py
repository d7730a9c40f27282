"""A session's QoS against its user's SLA: the first step of admission control (paper Fig. 2b).

The QoS applied is the one asked for, with unset fields taken from the user's default QoS,
then from vqkd's (``resources.DEFAULT_QOS``); an unset priority is the user's priority class.
It must fit the SLA:

- priority at most the user's priority class;
- ``maxBps`` at most ``sla.maxKeyRateBps``, and the user's reserved key rate (the
  ``minBps`` of every live session) plus this ``minBps`` at most ``sla.maxKeyRateBps``;
- one key chunk (``keyChunkSize`` bytes) fits in ``sla.maxBurstBits``, or no key request
  could ever pass the token bucket;
- fewer live sessions than ``sla.maxSessions``.

The token bucket then gets the tightest rate the QoS and SLA set; when neither sets one the
path bounds it. Its size is one second of that rate, at least one chunk, at most the SLA's
burst: a steadily paced application never waits for tokens, a bursty one is held to the SLA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vqkd.operator.resources.models import DEFAULT_QOS, QoS, UserProfile

BUCKET_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Usage:
    """What a user's live sessions hold now."""

    sessions: int = 0
    reserved_bps: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    qos: QoS  # the QoS applied, every field set
    priority: int
    min_rate_bps: int  # reserved on every link of the path
    max_rate_bps: int | None  # None: no QoS or SLA bound, the path decides
    max_burst_bits: int | None

    @property
    def chunk_bits(self) -> int:
        return (self.qos.key_chunk_size or 0) * 8

    def token_bucket(self, path_spare_bps: float) -> tuple[float, int]:
        """Rate (bit/s) and size (bits) of the session's token bucket on a path with that much spare rate.

        Never zero: a KM refuses a bucket that could never fill.
        """
        if self.max_rate_bps is not None:
            rate = float(self.max_rate_bps)
        else:
            rate = max(float(path_spare_bps), float(self.min_rate_bps), float(self.chunk_bits))
        size = max(self.chunk_bits, math.ceil(rate * BUCKET_SECONDS))
        if self.max_burst_bits is not None:
            size = min(size, self.max_burst_bits)
        return rate, max(size, 1)


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # CamelCase
    message: str


def check(user: UserProfile, requested: QoS, usage: Usage) -> Grant | Refusal:
    defaults = user.spec.default_qos.over(DEFAULT_QOS.model_copy(update={"priority": user.spec.priority}))
    qos = requested.over(defaults)
    sla = user.spec.sla
    priority = int(qos.priority)  # always set: the defaults carry the user's priority class
    min_rate = qos.min_bps or 0
    chunk_bits = (qos.key_chunk_size or 0) * 8
    who = f"UserProfile {user.name}"
    if priority > user.spec.priority:
        return Refusal("PriorityAboveClass", f"QoS priority {priority} exceeds the priority class "
                                             f"{user.spec.priority} of {who}; ask for at most {user.spec.priority}")
    if sla.max_key_rate_bps is not None:
        if qos.max_bps is not None and qos.max_bps > sla.max_key_rate_bps:
            return Refusal("KeyRateAboveSLA", f"QoS maxBps {qos.max_bps} exceeds the SLA maxKeyRateBps "
                                              f"{sla.max_key_rate_bps} of {who}")
        if usage.reserved_bps + min_rate > sla.max_key_rate_bps:
            return Refusal(
                "KeyRateAboveSLA",
                f"QoS minBps {min_rate} on top of the {usage.reserved_bps} bit/s already reserved by {who} exceeds "
                f"its SLA maxKeyRateBps {sla.max_key_rate_bps}; ask for at most "
                f"{max(sla.max_key_rate_bps - usage.reserved_bps, 0)} or close a session",
            )
    if sla.max_burst_bits is not None and chunk_bits > sla.max_burst_bits:
        return Refusal("BurstAboveSLA", f"QoS keyChunkSize {qos.key_chunk_size} bytes ({chunk_bits} bits) exceeds "
                                        f"the SLA maxBurstBits {sla.max_burst_bits} of {who}; ask for chunks of at "
                                        f"most {sla.max_burst_bits // 8} bytes")
    if sla.max_sessions is not None and usage.sessions >= sla.max_sessions:
        return Refusal("SessionsAboveSLA", f"{who} already has {usage.sessions} live sessions, its SLA maxSessions; "
                                           "close one first")
    bounds = [rate for rate in (qos.max_bps, sla.max_key_rate_bps) if rate is not None]
    return Grant(qos.model_copy(update={"priority": priority}), priority, min_rate,
                 min(bounds) if bounds else None, sla.max_burst_bits)
