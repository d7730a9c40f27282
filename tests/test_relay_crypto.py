"""Relay hop crypto: OTP re-encryption along a path, a one-time MAC over every field, replays."""

import dataclasses
import hashlib
import os
import random

import pytest

from vqkd.km.domain.keypool import IncomingPool, OutgoingPool, Span
from vqkd.km.domain.relay_crypto import (
    MAC_KEY_BYTES,
    RelayFields,
    ReplayGuard,
    authenticated_bytes,
    decrypt_hop,
    encrypt_hop,
    reencrypt_hop,
    split_keys,
    tag,
    tag_fields,
    verify,
    verify_fields,
    xor,
)


def fields(**changes) -> RelayFields:
    base = RelayFields(
        link="n1-n2",
        sender_incarnation="inc-a",
        receiver_incarnation="inc-b",
        session_id="8f14e45f-ceea-467a-9af2-1f0b6e3c2a11",
        relay_id="r-1",
        index=42,
        master_sae_id="sae-a",
        slave_sae_ids=("sae-b", "sae-c"),
        key_ids=("k1", "k2", "k3"),
        key_size_bits=16,
        direct=False,
        ciphertext=bytes(range(6)),
        pad=(("b1", 0, 6),),
        mac_key=(("b1", 6, 32),),
        key_extension='{"x":1}',
    )
    return dataclasses.replace(base, **changes)


# --- one-time pad -----------------------------------------------------------------------


def test_xor():
    assert xor(b"\x0f\xf0\x00", b"\xff\xff\x00") == b"\xf0\x0f\x00"
    assert xor(b"\x00\x00\x01", b"\x00\x00\x00") == b"\x00\x00\x01"  # leading zeros survive
    assert xor(b"", b"") == b""
    with pytest.raises(ValueError, match="equally long inputs, got 2 and 3 bytes"):
        xor(b"ab", b"abc")


def test_pads_must_match_the_key_length_exactly():
    with pytest.raises(ValueError, match="exactly as long as the plaintext: 4 bytes, got 5"):
        encrypt_hop(b"1234", b"12345")
    with pytest.raises(ValueError, match="ciphertext"):
        decrypt_hop(b"1234", b"123")
    with pytest.raises(ValueError, match="ciphertext"):
        reencrypt_hop(b"1234", b"1234", b"123")


def new_link(name: str) -> tuple[OutgoingPool, IncomingPool]:
    """Both ends of a link: the sender's outgoing pool and the receiver's copy of it."""
    blocks = [(f"{name}/{i}", os.urandom(64)) for i in range(8)]
    sender, receiver = OutgoingPool(), IncomingPool()
    sender.add(blocks)
    receiver.add(blocks)
    return sender, receiver


def wire(spans: list[Span]) -> tuple:
    return tuple((s.block_id, s.offset, s.length) for s in spans)


def send(link_end: OutgoingPool, message: RelayFields, key_part: bytes, pad_in: bytes | None):
    """A sender's side of one hop: fresh pad and MAC key from the link, tag over the result."""
    pad, pad_spans = link_end.take(len(key_part) if pad_in is None else len(message.ciphertext))
    mac_key, mac_spans = link_end.take(MAC_KEY_BYTES)
    ciphertext = encrypt_hop(key_part, pad) if pad_in is None else reencrypt_hop(message.ciphertext, pad_in, pad)
    out = dataclasses.replace(message, ciphertext=ciphertext, pad=wire(pad_spans), mac_key=wire(mac_spans))
    return out, tag_fields(mac_key, out)


def receive(link_end: IncomingPool, message: RelayFields, received_tag: bytes) -> bytes:
    """A receiver's side: check the tag with the named MAC key, return the named pad."""
    assert verify_fields(link_end.consume([Span(*s) for s in message.mac_key]), message, received_tag)
    return link_end.consume([Span(*s) for s in message.pad])


@pytest.mark.parametrize("hops", [1, 2, 5])
def test_key_survives_reencryption_at_every_hop(hops):
    links = [new_link(f"l{i}") for i in range(hops)]
    key = os.urandom(48)
    message, mac = send(links[0][0], fields(), key, pad_in=None)
    seen_on_the_wire = [message.ciphertext]
    for hop in range(hops):
        pad_in = receive(links[hop][1], message, mac)
        if hop + 1 < hops:
            message, mac = send(links[hop + 1][0], message, key, pad_in=pad_in)
            seen_on_the_wire.append(message.ciphertext)
    assert decrypt_hop(message.ciphertext, pad_in) == key
    assert key not in seen_on_the_wire and len(set(seen_on_the_wire)) == hops
    assert split_keys(key, 3, 128) == [key[:16], key[16:32], key[32:]]


def test_split_keys_checks_the_sizes():
    with pytest.raises(ValueError, match="1 keys of 24 bits make 3 bytes, but the plaintext has 4"):
        split_keys(b"1234", 1, 24)
    with pytest.raises(ValueError, match="size must be a positive multiple of 8 bits, got 12"):
        split_keys(b"12", 1, 12)
    with pytest.raises(ValueError, match="got 0"):
        split_keys(b"", 0, 0)


# --- MAC --------------------------------------------------------------------------------


def test_tag_is_rfc8439_poly1305():
    key = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
    expected = bytes.fromhex("a8061dc1305136c6c22b8baf0c0127a9")
    assert tag(key, b"Cryptographic Forum Research Group") == expected


def test_verify_accepts_the_tag_and_rejects_a_wrong_key_or_a_wrong_length():
    mac_key = os.urandom(32)
    t = tag_fields(mac_key, fields())
    assert verify_fields(mac_key, fields(), t)
    assert not verify_fields(os.urandom(32), fields(), t)
    assert not verify_fields(mac_key, fields(), t[:-1])
    with pytest.raises(ValueError, match="one-time key is 32 bytes, got 16"):
        tag(mac_key[:16], b"data")


def flip_bit(value, bit: int):
    """``value`` with one bit of its representation inverted (strings stay valid UTF-8)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value ^ (1 << bit)
    if isinstance(value, bytes):
        flipped = bytearray(value)
        flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped)
    if isinstance(value, str):
        i = bit // 7
        return value[:i] + chr(ord(value[i]) ^ (1 << (bit % 7))) + value[i + 1:]
    raise TypeError(value)


def bits_of(value) -> int:
    """How many single-bit variants of ``value`` to try: every bit of strings and bytes."""
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 16
    return len(value) * (8 if isinstance(value, bytes) else 7)


def single_bit_variants(message: RelayFields):
    """Every field of the message with one bit changed, list fields element by element."""
    for field in dataclasses.fields(RelayFields):
        name = field.name
        value = getattr(message, name)
        if not isinstance(value, tuple):
            for bit in range(bits_of(value)):
                yield name, dataclasses.replace(message, **{name: flip_bit(value, bit)})
            continue
        for i, item in enumerate(value):
            parts = range(len(item)) if isinstance(item, tuple) else [None]  # (key_id, size), spans
            for part in parts:
                old = item if part is None else item[part]
                for bit in range(bits_of(old)):
                    new = flip_bit(old, bit)
                    items = list(value)
                    items[i] = new if part is None else item[:part] + (new,) + item[part + 1:]
                    yield f"{name}[{i}][{part}]", dataclasses.replace(message, **{name: tuple(items)})


def test_any_single_bit_flip_in_any_field_fails_verification():
    message = fields()
    mac_key = os.urandom(32)
    t = tag_fields(mac_key, message)
    variants = list(single_bit_variants(message))
    assert {name.split("[")[0] for name, _ in variants} == {f.name for f in dataclasses.fields(RelayFields)}
    for name, tampered in variants:
        assert tampered != message
        assert not verify_fields(mac_key, tampered, t), name


def test_dropped_or_added_list_items_fail_verification():
    message = fields()
    mac_key = os.urandom(32)
    t = tag_fields(mac_key, message)
    for tampered in (
        fields(slave_sae_ids=("sae-b",)),
        fields(slave_sae_ids=("sae-b", "sae-c", "sae-d")),
        fields(key_ids=message.key_ids[:1]),
        fields(key_ids=message.key_ids + ("k4",)),
        fields(pad=()),
        fields(mac_key=message.mac_key + (("b1", 38, 1),)),
        fields(ciphertext=message.ciphertext[:-1]),
    ):
        assert not verify_fields(mac_key, tampered, t)


def test_any_single_bit_flip_in_the_tag_fails_verification():
    mac_key = os.urandom(32)
    data = authenticated_bytes(fields())
    t = tag(mac_key, data)
    for bit in range(128):
        assert not verify(mac_key, data, flip_bit(t, bit))


# --- canonical encoding -----------------------------------------------------------------


def test_encoding_separates_list_items_and_fields():
    pairs = [
        (fields(slave_sae_ids=("ab", "c")), fields(slave_sae_ids=("a", "bc"))),
        (fields(slave_sae_ids=()), fields(slave_sae_ids=("",))),
        (fields(link="n1", sender_incarnation="-n2"), fields(link="n1-", sender_incarnation="n2")),
        (fields(pad=(("b", 0, 1),), mac_key=()), fields(pad=(), mac_key=(("b", 0, 1),))),
        (fields(key_ids=("k1",)), fields(key_ids=("k",), key_extension="1")),
        (fields(key_ids=("ab", "c")), fields(key_ids=("a", "bc"))),
        (fields(key_ids=("é", "")), fields(key_ids=("", "é"))),  # lengths count characters, not bytes
        (fields(key_ids=("a",), key_size_bits=0), fields(key_ids=("a", ""), key_size_bits=0)),
        (fields(ciphertext=b"", key_extension="\x00"), fields(ciphertext=b"\x00", key_extension="")),
    ]
    for a, b in pairs:
        assert authenticated_bytes(a) != authenticated_bytes(b), (a, b)


def test_encoding_is_injective_over_many_near_collisions():
    rng = random.Random(7)
    tokens = ["", "a", "b", "ab", "é", "aé"]

    def text():
        return rng.choice(tokens)

    def span():
        return (text(), rng.randrange(2), rng.randrange(2))

    by_encoding: dict[bytes, RelayFields] = {}
    for _ in range(3000):
        message = RelayFields(
            link=text(), sender_incarnation=text(), receiver_incarnation=text(), session_id=text(),
            relay_id=text(), index=rng.randrange(3), master_sae_id=text(),
            slave_sae_ids=tuple(text() for _ in range(rng.randrange(3))),
            key_ids=tuple(text() for _ in range(rng.randrange(3))), key_size_bits=rng.randrange(2),
            direct=rng.random() < 0.5, ciphertext=text().encode(),
            pad=tuple(span() for _ in range(rng.randrange(2))),
            mac_key=tuple(span() for _ in range(rng.randrange(2))), key_extension=text(),
            stream=rng.random() < 0.5,
        )
        assert by_encoding.setdefault(authenticated_bytes(message), message) == message


def test_encoding_is_stable_across_versions():
    """Both ends of a link may run different releases: the authenticated bytes must not drift.
    A new encoding comes with a new domain string (now ``.../3``: key IDs and one key size)."""
    digest = hashlib.sha256(authenticated_bytes(fields())).hexdigest()
    assert digest == "1e11342fdfa5880513ebf808cedf13277e7cf970f939b57d160b600a0c412f3c"


def test_values_outside_the_wire_types_are_refused():
    with pytest.raises(ValueError, match="index must fit in 64 unsigned bits, got -1"):
        authenticated_bytes(fields(index=-1))
    with pytest.raises(ValueError, match="pad span offset must fit in 32 unsigned bits"):
        authenticated_bytes(fields(pad=(("b", 2**32, 1),)))


# --- replays ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_replay_is_detected_within_the_ttl():
    clock = FakeClock()
    guard = ReplayGuard(capacity=100, ttl_s=60, clock=clock)
    assert not guard.seen_before("r-1")
    assert not guard.seen_before("r-2")
    clock.now = 59
    assert guard.seen_before("r-1") and guard.seen_before("r-2")
    clock.now = 60.5
    assert not guard.seen_before("r-1")  # forgotten, then remembered afresh
    assert len(guard) == 1
    assert guard.seen_before("r-1")


def test_replay_guard_memory_is_bounded():
    clock = FakeClock()
    guard = ReplayGuard(capacity=3, ttl_s=60, clock=clock)
    for relay_id in ("a", "b", "c", "d"):
        assert not guard.seen_before(relay_id)
    assert len(guard) == 3
    assert guard.seen_before("d") and guard.seen_before("b")
    assert not guard.seen_before("a")  # the oldest was dropped to make room


def test_replay_guard_rejects_useless_settings():
    with pytest.raises(ValueError, match="at least one relay ID"):
        ReplayGuard(capacity=0, ttl_s=1)
    with pytest.raises(ValueError, match="positive ttl"):
        ReplayGuard(capacity=1, ttl_s=0)
