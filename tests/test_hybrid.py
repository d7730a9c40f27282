"""Hybrid ML-KEM-768 + X25519 fallback: same keys at both ends, or a clear failure."""

import pytest

from vqkd.km.domain import hybrid
from vqkd.km.domain.hybrid import (
    MAX_KEY_BITS,
    OFFER_BYTES,
    REPLY_BYTES,
    HybridFailure,
    HybridInitiator,
    derive_keys,
    respond,
    session_context,
)

pytestmark = pytest.mark.skipif(not hybrid.available(), reason="cryptography built without ML-KEM")

KEY_IDS = ["6f1c0a52-0001", "6f1c0a52-0002", "6f1c0a52-0003"]
CONTEXT = session_context("8f14e45f-ceea-467a-9af2-1f0b6e3c2a11", KEY_IDS, 256)


def flip(message: bytes, index: int) -> bytes:
    return message[:index] + bytes([message[index] ^ 1]) + message[index + 1:]


def test_both_ends_derive_identical_keys_of_the_requested_size():
    initiator = HybridInitiator()
    assert len(initiator.offer) == OFFER_BYTES
    reply, responder_secret = respond(initiator.offer, CONTEXT)
    assert len(reply) == REPLY_BYTES
    initiator_secret = initiator.finish(reply, CONTEXT)
    assert initiator_secret == responder_secret and len(initiator_secret) == 32
    keys = derive_keys(initiator_secret, KEY_IDS, 256)
    assert keys == derive_keys(responder_secret, KEY_IDS, 256)
    assert [len(k) for k in keys] == [32, 32, 32] and len(set(keys)) == 3


def test_every_exchange_yields_a_fresh_secret():
    secrets = set()
    for _ in range(3):
        initiator = HybridInitiator()
        reply, secret = respond(initiator.offer, CONTEXT)
        assert initiator.finish(reply, CONTEXT) == secret
        secrets.add(secret)
    assert len(secrets) == 3


def test_different_contexts_fail_confirmation_instead_of_yielding_different_keys():
    other_contexts = [
        session_context("another-session", KEY_IDS, 256),
        session_context("8f14e45f-ceea-467a-9af2-1f0b6e3c2a11", KEY_IDS[:2], 256),
        session_context("8f14e45f-ceea-467a-9af2-1f0b6e3c2a11", KEY_IDS, 128),
    ]
    assert len({CONTEXT, *other_contexts}) == 4
    for context in other_contexts:
        initiator = HybridInitiator()
        reply, _ = respond(initiator.offer, context)
        with pytest.raises(HybridFailure, match="different session contexts"):
            initiator.finish(reply, CONTEXT)


@pytest.mark.parametrize("where", [
    0,  # ML-KEM ciphertext
    1087,
    1088,  # responder's X25519 public key
    1119,
    1120,  # key confirmation
    REPLY_BYTES - 1,
])
def test_tampered_reply_fails(where):
    initiator = HybridInitiator()
    reply, _ = respond(initiator.offer, CONTEXT)
    with pytest.raises(HybridFailure, match="does not confirm"):
        initiator.finish(flip(reply, where), CONTEXT)


def clear_a_bit(message: bytes, start: int) -> bytes:
    """Clears one set bit at or after ``start``: lowering an ML-KEM coefficient keeps it valid."""
    index = next(i for i in range(start, len(message)) if message[i])
    value = message[index]
    return message[:index] + bytes([value & (value - 1)]) + message[index + 1:]


@pytest.mark.parametrize("where", [
    0,  # ML-KEM encapsulation key: the polynomial vector
    1183,  # ... and its seed
    1184 + 5,  # X25519 public key
])
def test_reply_to_a_tampered_offer_fails(where):
    initiator = HybridInitiator()
    reply, _ = respond(clear_a_bit(initiator.offer, where), CONTEXT)
    with pytest.raises(HybridFailure):
        initiator.finish(reply, CONTEXT)


def test_an_initiator_finishes_once():
    initiator = HybridInitiator()
    reply, _ = respond(initiator.offer, CONTEXT)
    initiator.finish(reply, CONTEXT)
    with pytest.raises(RuntimeError, match="start a new HybridInitiator"):
        initiator.finish(reply, CONTEXT)


def test_wrong_lengths_are_reported_with_the_expected_layout():
    with pytest.raises(ValueError, match=r"hybrid offer is 1216 bytes \(ML-KEM-768 encapsulation key 1184 "
                                         r"\+ X25519 public key 32\), got 1215"):
        respond(HybridInitiator().offer[:-1], CONTEXT)
    with pytest.raises(ValueError, match=r"hybrid reply is 1152 bytes .*got 1153"):
        HybridInitiator().finish(bytes(1153), CONTEXT)


def test_malformed_public_values_are_refused():
    offer = HybridInitiator().offer
    with pytest.raises(ValueError, match="X25519 public key is a low-order point"):
        respond(offer[:1184] + bytes(32), CONTEXT)
    with pytest.raises(ValueError, match="ML-KEM-768 encapsulation key is malformed"):
        respond(b"\xff" * 1184 + offer[1184:], CONTEXT)
    initiator = HybridInitiator()
    reply, _ = respond(initiator.offer, CONTEXT)
    with pytest.raises(ValueError, match="hybrid reply: the X25519 public key is a low-order point"):
        initiator.finish(reply[:1088] + bytes(32) + reply[1120:], CONTEXT)


def test_keys_depend_on_id_and_size_not_on_order():
    secret = bytes(range(32))
    a, b = derive_keys(secret, ["a", "b"], 128)
    assert derive_keys(secret, ["b", "a"], 128) == [b, a]
    assert derive_keys(secret, ["a"], 128) == [a]  # the other IDs requested alongside do not matter
    longer = derive_keys(secret, ["a"], 256)[0]
    assert len(longer) == 32 and longer[:16] != a  # no key is a prefix of another size's key
    assert len(derive_keys(secret, ["a"], MAX_KEY_BITS)[0]) == MAX_KEY_BITS // 8


@pytest.mark.parametrize("size_bits", [0, 12, -8, MAX_KEY_BITS + 8])
def test_unservable_key_sizes_are_refused(size_bits):
    with pytest.raises(ValueError, match="positive multiple of 8 bits"):
        derive_keys(bytes(32), ["a"], size_bits)


def test_derive_keys_checks_its_inputs():
    with pytest.raises(ValueError, match="secret is 32 bytes, got 31"):
        derive_keys(bytes(31), ["a"], 128)
    with pytest.raises(ValueError, match="distinct"):
        derive_keys(bytes(32), ["a", "a"], 128)
    with pytest.raises(ValueError, match="between 1 and"):
        session_context("s", ["a"], 0)


def test_context_encoding_separates_its_parts():
    assert session_context("s", ["ab", "c"], 8) != session_context("s", ["a", "bc"], 8)
    assert session_context("s1", ["a"], 8) != session_context("s", ["1a"], 8)
