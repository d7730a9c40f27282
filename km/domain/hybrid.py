"""Post-quantum fallback: ML-KEM-768 + X25519 hybrid key establishment between endpoint KMs.

When QKD key cannot serve a request in time and the session opted in (``fallback: pqc``),
the two endpoint KMs agree on a secret with one round trip and expand it into the keys
the applications asked for. The keys are then only computationally secure, unlike QKD
key, so this is never used without the session's consent.

Messages (opaque bytes for the gRPC adapter to carry):

* offer (initiator → responder, ``OFFER_BYTES``): ML-KEM-768 encapsulation key ‖ X25519
  public key, both ephemeral;
* reply (responder → initiator, ``REPLY_BYTES``): ML-KEM-768 ciphertext ‖ X25519 public
  key (ephemeral) ‖ key confirmation.

Combiner: "concatenate, then KDF", with the transcript bound in. Both shared secrets go,
ML-KEM first, into HKDF-SHA256 as input key material; ``info`` holds the caller's context
(session ID, key IDs, key size: see ``session_context``) and every public value of the
exchange. This is the construction of TLS's X25519MLKEM768 hybrid and of NIST SP 800-56C's
``Z' = Z ‖ T`` (the approved, ML-KEM secret first), and it carries the same ingredients as
X-Wing: the output is secret as long as either ML-KEM-768 or X25519 holds, and hashing the
X25519 public values in is what makes the DH half behave as a KEM (X-Wing's argument for
including them). Unlike X-Wing we also hash the ML-KEM encapsulation key and ciphertext
rather than lean on ML-KEM's ciphertext-binding property: it costs two kilobytes of
hashing and removes a proof obligation. HKDF-SHA256 rather than X-Wing's SHA3-256: the
inputs differ from X-Wing's anyway, so its test vectors could not apply, and HKDF is the
approved two-step KDF of SP 800-56C that ``derive_keys`` then continues with.

Key confirmation: the responder proves it derived the same secret under the same context,
so a reply that was tampered with, answered a tampered offer, or used another session's
context fails at the initiator (``HybridFailure``) before any key is handed out, instead
of leaving the two ends with different keys. The responder learns the outcome only
through the relay's commit, so it must hold its keys back until then (both ends or neither).

Authentication is the KM-to-KM mutual TLS channel's job; this exchange adds post-quantum
confidentiality against traffic recorded now and decrypted later, not peer authentication.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from collections.abc import Sequence

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

MLKEM_ENCAPSULATION_KEY_BYTES = 1184
MLKEM_CIPHERTEXT_BYTES = 1088
X25519_PUBLIC_BYTES = 32
CONFIRMATION_BYTES = 32
SECRET_BYTES = 32
OFFER_BYTES = MLKEM_ENCAPSULATION_KEY_BYTES + X25519_PUBLIC_BYTES
REPLY_BYTES = MLKEM_CIPHERTEXT_BYTES + X25519_PUBLIC_BYTES + CONFIRMATION_BYTES
# HKDF-Expand yields at most 255 hash blocks.
MAX_KEY_BITS = 255 * 32 * 8

_SECRET_LABEL = b"vqkd hybrid X25519+ML-KEM-768 secret v1"
_CONFIRM_LABEL = b"vqkd hybrid responder confirms v1"
_CONTEXT_LABEL = b"vqkd hybrid session context v1"
_KEY_LABEL = b"vqkd hybrid session key v1"


class HybridFailure(ValueError):
    """The reply does not confirm a shared secret; no key may be derived from this exchange."""


@functools.cache
def available() -> bool:
    """Whether this build of ``cryptography`` can do ML-KEM-768 (it needs an AWS-LC backend)."""
    try:
        MLKEM768PrivateKey.generate()
    except UnsupportedAlgorithm:
        return False
    return True


def session_context(session_id: str, key_ids: Sequence[str], size_bits: int) -> bytes:
    """The context both ends bind into the secret: which session, which keys, what size.

    Two ends that disagree on any of these fail key confirmation rather than derive keys
    that differ.
    """
    if not 0 < size_bits <= MAX_KEY_BITS:
        raise ValueError(f"key size must be between 1 and {MAX_KEY_BITS} bits, got {size_bits}")
    parts = [_CONTEXT_LABEL, session_id.encode(), struct.pack(">I", size_bits)]
    parts += [key_id.encode() for key_id in key_ids]
    return _length_prefixed(parts)


class HybridInitiator:
    """One exchange's ephemeral keys, held from sending ``offer`` until ``finish``.

    Raises ``cryptography.exceptions.UnsupportedAlgorithm`` where ``available()`` is False.
    """

    def __init__(self) -> None:
        self._mlkem: MLKEM768PrivateKey | None = MLKEM768PrivateKey.generate()
        self._x25519: X25519PrivateKey | None = X25519PrivateKey.generate()
        self._offer = (self._mlkem.public_key().public_bytes_raw()
                       + self._x25519.public_key().public_bytes_raw())

    @property
    def offer(self) -> bytes:
        """The message to send to the responder (``OFFER_BYTES`` long)."""
        return self._offer

    def finish(self, reply: bytes, context: bytes) -> bytes:
        """The shared secret, once the reply confirms it; the ephemeral keys are dropped.

        Raises ``ValueError`` for a malformed reply, ``HybridFailure`` when the confirmation
        does not match, ``RuntimeError`` if this initiator already finished.
        """
        if self._mlkem is None or self._x25519 is None:
            raise RuntimeError("this hybrid exchange already finished; start a new HybridInitiator")
        mlkem, x25519 = self._mlkem, self._x25519
        self._mlkem = self._x25519 = None  # one exchange per ephemeral key pair, success or not
        _check_length(reply, REPLY_BYTES, "reply",
                      f"ML-KEM-768 ciphertext {MLKEM_CIPHERTEXT_BYTES} + X25519 public key "
                      f"{X25519_PUBLIC_BYTES} + confirmation {CONFIRMATION_BYTES}")
        ciphertext = reply[:MLKEM_CIPHERTEXT_BYTES]
        peer_x25519 = reply[MLKEM_CIPHERTEXT_BYTES:MLKEM_CIPHERTEXT_BYTES + X25519_PUBLIC_BYTES]
        confirmation = reply[MLKEM_CIPHERTEXT_BYTES + X25519_PUBLIC_BYTES:]
        mlkem_secret = mlkem.decapsulate(ciphertext)  # a forged ciphertext yields a random secret
        x25519_secret = _x25519_exchange(x25519, peer_x25519, "reply")
        secret, confirm_key = _combine(mlkem_secret, x25519_secret, context,
                                       self.offer, reply[:-CONFIRMATION_BYTES])
        if not hmac.compare_digest(confirmation, _confirmation(confirm_key)):
            raise HybridFailure(
                "hybrid key exchange: the reply does not confirm the shared secret; it was altered "
                "in transit or the two KMs used different session contexts (session ID, key IDs, "
                "size). No key was derived; retry the request"
            )
        return secret


def respond(offer: bytes, context: bytes) -> tuple[bytes, bytes]:
    """Answers an offer: ``(reply, shared_secret)``. Stateless; ephemeral keys die here.

    The initiator may still reject the reply, so keys derived from the secret wait for the
    initiator's commit before they reach an application. Raises ``ValueError`` for a
    malformed offer.
    """
    _check_length(offer, OFFER_BYTES, "offer",
                  f"ML-KEM-768 encapsulation key {MLKEM_ENCAPSULATION_KEY_BYTES} + "
                  f"X25519 public key {X25519_PUBLIC_BYTES}")
    encapsulation_key = offer[:MLKEM_ENCAPSULATION_KEY_BYTES]
    peer_x25519 = offer[MLKEM_ENCAPSULATION_KEY_BYTES:]
    try:
        mlkem_public = MLKEM768PublicKey.from_public_bytes(encapsulation_key)
    except ValueError as error:
        raise ValueError(f"hybrid offer: the ML-KEM-768 encapsulation key is malformed ({error})") from None
    mlkem_secret, ciphertext = mlkem_public.encapsulate()
    x25519 = X25519PrivateKey.generate()
    x25519_secret = _x25519_exchange(x25519, peer_x25519, "offer")
    reply_public = ciphertext + x25519.public_key().public_bytes_raw()
    secret, confirm_key = _combine(mlkem_secret, x25519_secret, context, offer, reply_public)
    return reply_public + _confirmation(confirm_key), secret


def derive_keys(secret: bytes, key_ids: Sequence[str], size_bits: int) -> list[bytes]:
    """One key of ``size_bits`` per key ID, each bound to its ID and size.

    A key depends only on the secret, its ID and the size, not on its position, so both
    ends get the same key for an ID whatever order they list the IDs in.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a hybrid secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if size_bits <= 0 or size_bits % 8 or size_bits > MAX_KEY_BITS:
        raise ValueError(f"key size must be a positive multiple of 8 bits up to {MAX_KEY_BITS}, got {size_bits}")
    if len(set(key_ids)) != len(key_ids):
        raise ValueError(f"key IDs must be distinct, got {list(key_ids)}")
    return [
        HKDFExpand(SHA256(), size_bits // 8,
                   _length_prefixed([_KEY_LABEL, struct.pack(">I", size_bits), key_id.encode()]))
        .derive(secret)
        for key_id in key_ids
    ]


def _combine(mlkem_secret: bytes, x25519_secret: bytes, context: bytes,
             offer: bytes, reply_public: bytes) -> tuple[bytes, bytes]:
    """(shared secret, confirmation key) from both KEM secrets and the whole transcript."""
    okm = HKDF(
        algorithm=SHA256(),
        length=SECRET_BYTES + 32,
        salt=_SECRET_LABEL,
        info=_length_prefixed([context, offer, reply_public]),
    ).derive(mlkem_secret + x25519_secret)
    return okm[:SECRET_BYTES], okm[SECRET_BYTES:]


def _confirmation(confirm_key: bytes) -> bytes:
    return hmac.new(confirm_key, _CONFIRM_LABEL, hashlib.sha256).digest()


def _x25519_exchange(own: X25519PrivateKey, peer_public: bytes, message: str) -> bytes:
    try:
        return own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise ValueError(
            f"hybrid {message}: the X25519 public key is a low-order point, which yields no shared secret"
        ) from None


def _check_length(message: bytes, expected: int, name: str, layout: str) -> None:
    if len(message) != expected:
        raise ValueError(f"a hybrid {name} is {expected} bytes ({layout}), got {len(message)}")


def _length_prefixed(parts: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)
