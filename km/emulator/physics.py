"""How much secret key a BB84 link distils from its raw key, in the asymptotic limit.

The twin needs only the shape operators see on real links: the secret fraction falls as
the quantum bit error rate (QBER) rises and reaches zero near 11 %, where error
correction plus privacy amplification consume everything the link produced.
"""

from __future__ import annotations

import math

# Shor–Preskill: 1 - 2·h(e) crosses zero at e ≈ 0.110028. Cutting off at exactly 11 % keeps
# the documented threshold and the function in agreement, as device datasheets state it.
BB84_QBER_THRESHOLD = 0.11


def binary_entropy(p: float) -> float:
    """h(p) = -p·log2(p) - (1-p)·log2(1-p), with h(0) = h(1) = 0."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"binary entropy needs a probability in [0, 1], got {p!r}")
    if p == 0.0 or p == 1.0:
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


def secret_fraction(qber: float) -> float:
    """Share of the sifted key that survives as secret key: 1 - 2·h(QBER), 0 from 11 % up.

    h is symmetric around 0.5, so the formula alone would report key again for QBER
    above 0.89; any QBER at or above the threshold yields none.
    """
    if not qber >= 0.0:  # also rejects NaN
        raise ValueError(f"QBER must be a number >= 0, got {qber!r}")
    if qber >= BB84_QBER_THRESHOLD:
        return 0.0
    return max(0.0, 1.0 - 2.0 * binary_entropy(qber))


def secret_key_rate(key_rate_bps: float, qber: float) -> float:
    """Secret key rate in bit/s for a link whose key rate at zero QBER is ``key_rate_bps``."""
    if not key_rate_bps >= 0.0:
        raise ValueError(f"key rate must be a number of bit/s >= 0, got {key_rate_bps!r}")
    return key_rate_bps * secret_fraction(qber)
