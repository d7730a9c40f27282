"""The key manager (KM) of a QKD node, and the emulated QKD module pair of a link.

``domain`` is the KM itself, with no transport; ``rpc`` (gRPC), ``etsi014`` and ``etsi004``
(HTTPS) are its transports; ``process`` assembles one KM process from a ``config``.
"""
