"""Why a KM refuses a request. Adapters map the ``KMError``s to ETSI 014 / 004 codes."""


class KMError(Exception):
    """Base class; the message is shown to the caller and must say what to do."""


class InvalidRequest(KMError):
    """The request itself is wrong (ETSI 014: 400)."""


class NotAuthorized(KMError):
    """The caller may not do this (ETSI 014: 401)."""


class KeysNotFound(KMError):
    """Key IDs that name no key held here for that master: unknown, already taken, expired,
    issued by another master, or named twice (ETSI 014 dec_keys: 400). ``KeyStore.put``
    raises it for key IDs already in use."""


class Unavailable(KMError):
    """The network cannot serve the request now; retrying later may work (ETSI 014: 503)."""


class InsufficientKey(Unavailable):
    """Not enough QKD key material; nothing was consumed. A key pool raises it too, saying
    only how much it holds: whoever asked it words the answer for the caller."""


class NoPath(Unavailable):
    """No QKD path to the peer's node."""


class PeerUnavailable(Unavailable):
    """A KM on the path did not answer or refused; the keys were delivered to no one."""


class DeliveryRefused(Exception):
    """Keys a peer KM delivered, or a relay it committed, cannot be held here; the message
    says why. Not a ``KMError``: whoever gets it words the answer it owes (a refusal to the
    peer KM, or ``Unavailable`` to an application of this node)."""
