"""QoS against the SLA and the token bucket that follows from it."""

from __future__ import annotations

from vqkd.operator.control.sla import Grant, Refusal, Usage, check
from vqkd.operator.resources.models import QoS, UserProfile

from builders import user


def profile(**spec) -> UserProfile:
    return user("u", ["s"], **spec)


def test_unset_fields_come_from_the_user_then_vqkd_and_priority_from_the_class():
    grant = check(profile(priority=5, defaultQos={"ttl": 60}), QoS(max_bps=1000), Usage())
    assert isinstance(grant, Grant)
    assert (grant.priority, grant.qos.ttl, grant.qos.key_chunk_size, grant.min_rate_bps) == (5, 60, 32, 0)
    assert grant.max_rate_bps == 1000 and grant.max_burst_bits is None


def test_token_bucket():
    bounded = check(profile(sla={"maxKeyRateBps": 5000, "maxBurstBits": 2048}), QoS(max_bps=3000), Usage())
    assert bounded.token_bucket(path_spare_bps=1e6) == (3000.0, 2048), "a burst above the SLA is cut"
    sla_only = check(profile(sla={"maxKeyRateBps": 5000}), QoS(), Usage())
    assert sla_only.token_bucket(path_spare_bps=1e6) == (5000.0, 5000)
    unbounded = check(profile(), QoS(min_bps=100), Usage())
    assert unbounded.token_bucket(path_spare_bps=20_000) == (20_000.0, 20_000), "the path bounds it"
    assert unbounded.token_bucket(path_spare_bps=0) == (256.0, 256), "never zero: at least a chunk a second"


def test_refusals_name_the_limit():
    refusal = check(profile(sla={"maxKeyRateBps": 5000}), QoS(min_bps=2000), Usage(sessions=2, reserved_bps=4000))
    assert isinstance(refusal, Refusal) and refusal.reason == "KeyRateAboveSLA"
    assert "at most 1000" in refusal.message
    assert check(profile(sla={"maxSessions": 2}), QoS(), Usage(sessions=2)).reason == "SessionsAboveSLA"
    assert check(profile(priority=1), QoS(priority=2), Usage()).reason == "PriorityAboveClass"
    burst = check(profile(sla={"maxBurstBits": 128}), QoS(key_chunk_size=32), Usage())
    assert burst.reason == "BurstAboveSLA" and "at most 16 bytes" in burst.message
