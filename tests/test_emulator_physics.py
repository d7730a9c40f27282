"""The emulated link's physics and key bookkeeping, with an injected clock."""

from __future__ import annotations

import math
import uuid

import pytest

from vqkd.km.emulator import physics
from vqkd.km.emulator.module import (
    BadRequest,
    EmulatedLink,
    InvalidControl,
    KeysNotFound,
    NotEnoughKey,
    RequestLimits,
)
from vqkd.km.etsi014.schema import MSG_KEYS_NOT_FOUND, MSG_SIZE_MULTIPLE_OF_8

SAES = {"a": "sae-a", "b": "sae-b"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_link(clock: Clock, *, rate: float = 1000.0, qber: float = 0.0, buffer_bits: int = 100_000,
              ttl: float = 60.0, limits: RequestLimits = RequestLimits()) -> EmulatedLink:
    return EmulatedLink("l1", SAES, key_rate_bps=rate, qber=qber, buffer_bits=buffer_bits,
                        limits=limits, pending_ttl_s=ttl, clock=clock)


# -- physics ------------------------------------------------------------------------------

def test_secret_fraction_is_one_without_errors_and_zero_from_the_threshold():
    assert physics.secret_fraction(0.0) == 1.0
    assert physics.secret_fraction(0.11) == 0.0
    assert physics.secret_fraction(0.2) == 0.0
    # Above 0.89 the bare formula would be positive again; the link still yields nothing.
    assert physics.secret_fraction(0.95) == 0.0
    assert physics.secret_fraction(0.05) == pytest.approx(1 - 2 * physics.binary_entropy(0.05))
    assert physics.binary_entropy(0.5) == pytest.approx(1.0)


def test_secret_fraction_falls_monotonically_up_to_the_threshold():
    fractions = [physics.secret_fraction(q / 1000) for q in range(0, 111)]
    assert all(a > b for a, b in zip(fractions, fractions[1:-1]))
    assert fractions[-1] == 0.0
    assert 0 < physics.secret_fraction(0.1099) < 0.01


def test_secret_key_rate_scales_the_key_rate_and_rejects_nonsense():
    assert physics.secret_key_rate(1e6, 0.0) == 1e6
    assert physics.secret_key_rate(1e6, 0.02) == pytest.approx(1e6 * (1 - 2 * physics.binary_entropy(0.02)))
    assert physics.secret_key_rate(1e6, 0.11) == 0.0
    for bad_rate, bad_qber in ((-1.0, 0.0), (1.0, -0.01), (1.0, math.nan)):
        with pytest.raises(ValueError):
            physics.secret_key_rate(bad_rate, bad_qber)


# -- production ---------------------------------------------------------------------------

def test_key_accumulates_at_the_secret_key_rate(clock):
    link = make_link(clock, rate=1000.0, qber=0.02)
    skr = physics.secret_key_rate(1000.0, 0.02)
    assert link.snapshot().buffer_bits == 0
    clock.advance(10)
    state = link.snapshot()
    assert state.buffer_bits == int(10 * skr)
    assert state.secret_key_rate_bps == pytest.approx(skr)
    assert state.generated_bits_total == pytest.approx(10 * skr)


def test_buffer_is_capped_and_pending_keys_count_against_it(clock):
    link = make_link(clock, rate=1000.0, buffer_bits=5000)
    clock.advance(100)
    assert link.snapshot().buffer_bits == 5000
    assert link.snapshot().generated_bits_total == 5000
    link.enc_keys("a", "sae-b", 2, 1024)
    state = link.snapshot()
    assert (state.buffer_bits, state.pending_bits["b"]) == (5000 - 2048, 2048)
    clock.advance(30)
    # The copy waiting at end b still occupies the buffer, so nothing is produced.
    assert link.snapshot().buffer_bits == 5000 - 2048


def test_collecting_pending_keys_frees_buffer_for_production(clock):
    link = make_link(clock, rate=1000.0, buffer_bits=5000)
    clock.advance(100)
    ids = [key_id for key_id, _ in link.enc_keys("a", "sae-b", 2, 1024)]
    link.dec_keys("b", "sae-a", ids)
    assert link.snapshot().buffer_bits == 5000 - 2048
    clock.advance(1)
    assert link.snapshot().buffer_bits == 5000 - 2048 + 1000
    clock.advance(10)
    assert link.snapshot().buffer_bits == 5000


def test_outage_and_high_qber_stop_production_and_keep_the_buffer(clock):
    link = make_link(clock, rate=1000.0)
    clock.advance(2)
    link.control(outage=True)
    clock.advance(10)
    state = link.snapshot()
    assert (state.buffer_bits, state.secret_key_rate_bps, state.outage) == (2000, 0.0, True)
    # Stored key outlives the outage of the quantum channel.
    link.enc_keys("a", "sae-b", 1, 1000)
    link.control(outage=False, qber=0.11)
    clock.advance(10)
    assert link.snapshot().buffer_bits == 1000
    link.control(qber=0.0, key_rate_bps=500)
    clock.advance(2)
    assert link.snapshot().buffer_bits == 2000


def test_control_is_validated_as_a_whole(clock):
    link = make_link(clock, rate=1000.0, qber=0.01)
    for bad in ({"key_rate_bps": -1}, {"key_rate_bps": math.inf}, {"qber": 0.51}, {"qber": -0.1},
                {"qber": math.nan}, {"key_rate_bps": 5, "qber": 0.6}):
        with pytest.raises(InvalidControl):
            link.control(**bad)
    state = link.snapshot()
    assert (state.key_rate_bps, state.qber) == (1000.0, 0.01)
    link.control(key_rate_bps=0)
    clock.advance(10)
    assert link.snapshot().buffer_bits == 0


# -- delivery -----------------------------------------------------------------------------

def test_enc_then_dec_hands_both_ends_the_same_keys_once(clock):
    link = make_link(clock)
    clock.advance(10)
    sent = link.enc_keys("a", "sae-b", 3, 256)
    assert len(sent) == 3 and all(len(key) == 32 for _, key in sent)
    assert all(uuid.UUID(key_id).version == 4 for key_id, _ in sent)
    assert len({key for _, key in sent}) == 3
    ids = [key_id for key_id, _ in sent]
    assert link.dec_keys("b", "sae-a", list(reversed(ids))) == list(reversed(sent))
    with pytest.raises(KeysNotFound) as e:
        link.dec_keys("b", "sae-a", ids[:1])
    assert e.value.message == MSG_KEYS_NOT_FOUND
    state = link.snapshot()
    assert state.delivered_bits_total == {"a": 768, "b": 768}
    assert state.pending_bits == {"a": 0, "b": 0}


def test_both_directions_are_independent_and_share_the_budget(clock):
    link = make_link(clock, rate=1000.0)
    clock.advance(3)
    to_b = link.enc_keys("a", "sae-b", 1, 1000)
    to_a = link.enc_keys("b", "sae-a", 1, 1000)
    assert link.snapshot().buffer_bits == 1000
    # Each end collects only what the other end took.
    with pytest.raises(KeysNotFound):
        link.dec_keys("a", "sae-b", [to_b[0][0]])
    with pytest.raises(KeysNotFound):
        link.dec_keys("b", "sae-a", [to_a[0][0]])
    assert link.dec_keys("a", "sae-b", [to_a[0][0]]) == to_a
    assert link.dec_keys("b", "sae-a", [to_b[0][0]]) == to_b


def test_enc_keys_is_all_or_nothing(clock):
    link = make_link(clock, rate=1000.0)
    clock.advance(1)
    with pytest.raises(NotEnoughKey) as e:
        link.enc_keys("a", "sae-b", 5, 256)
    assert "1000 bits" in e.value.message and "1280" in e.value.message
    state = link.snapshot()
    assert (state.buffer_bits, state.pending_bits["b"], state.delivered_bits_total["a"]) == (1000, 0, 0)
    assert len(link.enc_keys("a", "sae-b", 3, 256)) == 3


def test_dec_keys_is_all_or_nothing(clock):
    link = make_link(clock)
    clock.advance(10)
    ids = [key_id for key_id, _ in link.enc_keys("a", "sae-b", 2, 256)]
    with pytest.raises(KeysNotFound):
        link.dec_keys("b", "sae-a", [ids[0], str(uuid.uuid4())])
    with pytest.raises(BadRequest, match="more than once"):
        link.dec_keys("b", "sae-a", [ids[0], ids[0]])
    with pytest.raises(BadRequest, match="at least one"):
        link.dec_keys("b", "sae-a", [])
    assert [k for k, _ in link.dec_keys("b", "sae-a", ids)] == ids


def test_requests_naming_the_wrong_sae_or_breaking_limits_are_refused(clock):
    link = make_link(clock, limits=RequestLimits(key_size=256, max_key_size=1024, max_key_per_request=4))
    clock.advance(60)
    with pytest.raises(BadRequest, match="slave SAE 'sae-a'.*expected 'sae-b'"):
        link.enc_keys("a", "sae-a", 1, 256)
    with pytest.raises(BadRequest, match="master SAE 'sae-x'.*expected 'sae-a'"):
        link.dec_keys("b", "sae-x", [str(uuid.uuid4())])
    with pytest.raises(BadRequest) as e:
        link.enc_keys("a", "sae-b", 1, 12)
    assert e.value.message == MSG_SIZE_MULTIPLE_OF_8
    for number, size, text in ((0, 256, "number"), (5, 256, "max_key_per_request=4"),
                               (1, 2048, "max_key_size=1024"), (1, 0, "min_key_size=8")):
        with pytest.raises(BadRequest, match=text):
            link.enc_keys("a", "sae-b", number, size)
    assert link.snapshot().buffer_bits == 60_000


def test_uncollected_keys_expire_and_free_the_buffer(clock):
    link = make_link(clock, rate=1000.0, buffer_bits=5000, ttl=5.0)
    clock.advance(5)
    ids = [key_id for key_id, _ in link.enc_keys("a", "sae-b", 4, 1000)]
    clock.advance(3)
    link.enc_keys("b", "sae-a", 1, 1000)  # the buffer is full: 4000 bits pending, 1000 produced
    assert link.snapshot().pending_bits == {"a": 1000, "b": 4000}
    clock.advance(2.5)  # the first batch expired 0.5 s ago; production resumed from then
    state = link.snapshot()
    assert state.pending_bits == {"a": 1000, "b": 0}
    assert state.expired_bits_total == {"a": 0, "b": 4000}
    assert state.buffer_bits == 500
    with pytest.raises(KeysNotFound):
        link.dec_keys("b", "sae-a", ids[:1])
