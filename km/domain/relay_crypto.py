"""The cryptography of one relay hop (paper Fig. 3b) and of the MAC vqkd adds to it.

An end-to-end key travels one-time-pad encrypted: the source XORs it with link key shared
with the next hop; every intermediate KM removes the pad of the link it arrived on and
applies the pad of the link it leaves on; the destination removes the last pad. A pad is
fresh link key of exactly the plaintext's length, used once, so each hop's ciphertext
reveals nothing about the key (the trusted nodes themselves see it, as the paper accepts).

The one-time pad alone is malleable: flipping a ciphertext bit flips the delivered key's
bit. So each hop also draws 32 further bytes of fresh link key and sends a Poly1305 tag
over every field of the message (``authenticated_bytes``). Poly1305 with a uniformly random
key used for a single message is a one-time universal-hash MAC: a forgery succeeds with
probability about ``8 * ceil(len / 16) / 2**106`` whatever the attacker's computing power,
which keeps the relay information-theoretically secure. The guarantee is void if a MAC
key is ever used twice; drawing it from the link pool, which hands out each byte once,
is what rules that out.

Replays: ``ReplayGuard`` answers "was this relay ID seen recently?" so a replayed message
is refused with a clear reason. It is a convenience, not the safeguard: a replay names
pad and MAC spans that the receiver's incoming pool has already consumed, so it fails
there in any case.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

MAC_KEY_BYTES = 32
TAG_BYTES = 16

# Names the format, so bytes authenticated for this message can never be taken for bytes
# of another message or of a later version of this encoding.
_DOMAIN = b"vqkd.km.v1.RelayRequest/3"

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


# A byte range of a link key block, ``(block_id, offset, length)``: a ``keypool.Span``
# as the wire carries it (``km.proto`` Span).
SpanRef = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class RelayFields:
    """Every field of a ``RelayRequest`` except its tag, as plain Python values.

    The gRPC adapter converts the protobuf message into this and back, so the bytes that
    are authenticated do not depend on protobuf's serialisation, which is not canonical.
    The keys are ``key_ids``, all of ``key_size_bits`` (an ETSI 014 request or an ETSI 004
    chunk asks for one size); spans are ``(block_id, offset, length)`` tuples.
    """

    link: str
    sender_incarnation: str
    receiver_incarnation: str
    session_id: str
    relay_id: str
    index: int
    master_sae_id: str
    slave_sae_ids: tuple[str, ...]
    key_ids: tuple[str, ...]
    key_size_bits: int
    direct: bool
    ciphertext: bytes
    pad: tuple[SpanRef, ...]
    mac_key: tuple[SpanRef, ...]
    key_extension: str
    # The keys are chunks of the session's ETSI 004 key stream from ``index`` on, kept by
    # the destination for GET_KEY by index rather than for dec_keys by key ID.
    stream: bool = False


def xor(a: bytes, b: bytes) -> bytes:
    """Bytewise XOR of two equally long byte strings, done as one big-integer operation."""
    if len(a) != len(b):
        raise ValueError(f"xor needs equally long inputs, got {len(a)} and {len(b)} bytes")
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def encrypt_hop(plaintext: bytes, pad: bytes) -> bytes:
    """One-time-pad encryption for the first hop; the pad must be exactly as long as the key."""
    _check_pad(plaintext, pad, "plaintext")
    return xor(plaintext, pad)


def decrypt_hop(ciphertext: bytes, pad: bytes) -> bytes:
    """Removes the last hop's pad at the destination."""
    _check_pad(ciphertext, pad, "ciphertext")
    return xor(ciphertext, pad)


def reencrypt_hop(ciphertext: bytes, pad_in: bytes, pad_out: bytes) -> bytes:
    """At an intermediate KM: remove the incoming link's pad and apply the outgoing link's."""
    _check_pad(ciphertext, pad_in, "ciphertext")
    _check_pad(ciphertext, pad_out, "ciphertext")
    n = len(ciphertext)
    return (int.from_bytes(ciphertext, "little") ^ int.from_bytes(pad_in, "little")
            ^ int.from_bytes(pad_out, "little")).to_bytes(n, "little")


def _check_pad(data: bytes, pad: bytes, what: str) -> None:
    if len(pad) != len(data):
        raise ValueError(
            f"a one-time pad must be exactly as long as the {what}: {len(data)} bytes, got {len(pad)}"
        )


def authenticated_bytes(fields: RelayFields) -> bytes:
    """The canonical encoding of a relay message that its tag covers.

    Fields are written in a fixed order; every string, byte string and list carries its
    length first and every integer has a fixed width, so no two different messages encode
    to the same bytes (``["ab", "c"]`` and ``["a", "bc"]`` differ, as do a field's end and
    the next field's start).
    """
    out = bytearray()
    _put_bytes(out, _DOMAIN)
    for text in (fields.link, fields.sender_incarnation, fields.receiver_incarnation,
                 fields.session_id, fields.relay_id):
        _put_str(out, text)
    _put_u64(out, fields.index, "index")
    _put_str(out, fields.master_sae_id)
    _put_strs(out, fields.slave_sae_ids, "slave_sae_ids")
    _put_strs(out, fields.key_ids, "key_ids")
    _put_u32(out, fields.key_size_bits, "key_size_bits")
    out += b"\x01" if fields.direct else b"\x00"
    _put_bytes(out, fields.ciphertext)
    _put_spans(out, fields.pad, "pad")
    _put_spans(out, fields.mac_key, "mac_key")
    _put_str(out, fields.key_extension)
    out += b"\x01" if fields.stream else b"\x00"
    return bytes(out)


def _put_u32(out: bytearray, value: int, what: str) -> None:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{what} must fit in 32 unsigned bits, got {value}")
    out += struct.pack(">I", value)


def _put_u64(out: bytearray, value: int, what: str) -> None:
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{what} must fit in 64 unsigned bits, got {value}")
    out += struct.pack(">Q", value)


def _put_count(out: bytearray, items: tuple, what: str) -> None:
    _put_u32(out, len(items), f"number of {what}")


def _put_bytes(out: bytearray, data: bytes) -> None:
    _put_u32(out, len(data), "a field's length")
    out += data


def _put_str(out: bytearray, text: str) -> None:
    _put_bytes(out, text.encode("utf-8"))


def _put_strs(out: bytearray, texts: tuple[str, ...], what: str) -> None:
    """A list of strings: their number, the length of each in characters, then the UTF-8
    encoding of them all concatenated. UTF-8 decodes in one way only, so the concatenation
    gives back one text, which the lengths cut into the strings: no two lists encode alike.
    Written in three calls whatever the number of strings (a relay carries one key ID per key)."""
    _put_count(out, texts, what)
    lengths = list(map(len, texts))
    if lengths and max(lengths) > _U32_MAX:
        raise ValueError(f"a string of {what} is longer than 2**32 - 1 characters")
    out += struct.pack(f">{len(lengths)}I", *lengths)
    _put_bytes(out, "".join(texts).encode("utf-8"))


def _put_spans(out: bytearray, spans: tuple[SpanRef, ...], what: str) -> None:
    _put_count(out, spans, what)
    for block_id, offset, length in spans:
        _put_str(out, block_id)
        _put_u32(out, offset, f"{what} span offset")
        _put_u32(out, length, f"{what} span length")


def tag(mac_key: bytes, data: bytes) -> bytes:
    """The 16-byte Poly1305 tag of ``data``; ``mac_key`` is 32 bytes of never-used link key."""
    _check_mac_key(mac_key)
    return Poly1305.generate_tag(mac_key, data)


def verify(mac_key: bytes, data: bytes, received_tag: bytes) -> bool:
    """Whether ``received_tag`` is the tag of ``data``; compared in constant time."""
    _check_mac_key(mac_key)
    if len(received_tag) != TAG_BYTES:
        return False
    try:
        Poly1305.verify_tag(mac_key, data, received_tag)
    except InvalidSignature:
        return False
    return True


def _check_mac_key(mac_key: bytes) -> None:
    if len(mac_key) != MAC_KEY_BYTES:
        raise ValueError(f"a Poly1305 one-time key is {MAC_KEY_BYTES} bytes, got {len(mac_key)}")


def tag_fields(mac_key: bytes, fields: RelayFields) -> bytes:
    """The tag a sender puts in ``RelayRequest.tag``."""
    return tag(mac_key, authenticated_bytes(fields))


def verify_fields(mac_key: bytes, fields: RelayFields, received_tag: bytes) -> bool:
    """Whether a received relay message is exactly what the previous hop sent."""
    return verify(mac_key, authenticated_bytes(fields), received_tag)


def check_keys(nbytes: int, number: int, size_bits: int) -> int:
    """Whether ``number`` keys of ``size_bits`` make ``nbytes`` of material; returns a key's
    size in bytes, or raises ValueError saying why not."""
    if size_bits <= 0 or size_bits % 8:
        raise ValueError(f"a key's size must be a positive multiple of 8 bits, got {size_bits}")
    size = size_bits // 8
    if number * size != nbytes:
        raise ValueError(f"{number} keys of {size_bits} bits make {number * size} bytes, but the plaintext has "
                         f"{nbytes}")
    return size


def split_keys(plaintext: bytes, number: int, size_bits: int) -> list[bytes]:
    """Cuts the decrypted concatenation back into ``number`` keys of ``size_bits``, in order."""
    size = check_keys(len(plaintext), number, size_bits)
    return [plaintext[start:start + size] for start in range(0, len(plaintext), size)]


class ReplayGuard:
    """Remembers the relay IDs seen in the last ``ttl_s`` seconds, at most ``capacity`` of them.

    Check a message only after its tag verified: otherwise a forger could record the ID of
    a genuine message before it arrives and have it refused. When more than ``capacity``
    IDs arrive within ``ttl_s`` the oldest are forgotten; the incoming pool's refusal to
    consume a span twice still stops a replay of one of them.
    """

    def __init__(self, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if capacity <= 0:
            raise ValueError(f"a replay guard must remember at least one relay ID, got capacity {capacity}")
        if not ttl_s > 0:
            raise ValueError(f"a replay guard needs a positive ttl in seconds, got {ttl_s!r}")
        self._capacity = capacity
        self._ttl = ttl_s
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, relay_id: str) -> bool:
        """Whether the ID was seen within ``ttl_s``, without recording it."""
        self._forget_expired(self._clock())
        return relay_id in self._expiry

    def seen_before(self, relay_id: str) -> bool:
        """True for a relay ID seen within ``ttl_s``; otherwise records it and returns False."""
        now = self._clock()
        self._forget_expired(now)
        if relay_id in self._expiry:
            return True
        self._expiry[relay_id] = now + self._ttl
        if len(self._expiry) > self._capacity:
            self._expiry.popitem(last=False)
        return False

    def _forget_expired(self, now: float) -> None:
        # Insertion order is expiry order while the clock does not go back.
        while self._expiry:
            oldest, expires = next(iter(self._expiry.items()))
            if expires > now:
                return
            del self._expiry[oldest]
