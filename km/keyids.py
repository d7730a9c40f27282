"""Key IDs: random (version 4) UUIDs, made in batches because a request may ask for many."""

from __future__ import annotations

import os


def new_key_ids(n: int) -> list[str]:
    raw = bytearray(os.urandom(16 * n))
    ids = []
    for i in range(0, 16 * n, 16):
        raw[i + 6] = (raw[i + 6] & 0x0F) | 0x40  # version 4
        raw[i + 8] = (raw[i + 8] & 0x3F) | 0x80  # RFC 4122 variant
        h = raw[i:i + 16].hex()
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids
