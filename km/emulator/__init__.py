"""Emulated QKD module pair: the digital twin of one QKD link, serving ETSI GS QKD 014 at both ends.

``physics`` turns key rate and QBER into a secret key rate, ``module`` keeps the key
budget and the pending keys of both ends, ``server`` puts them on HTTPS. Run it with
``python -m vqkd.km.emulator --config LINK.json`` (an ``EmulatedLinkConfig``).
"""
