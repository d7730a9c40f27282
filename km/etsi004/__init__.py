"""ETSI GS QKD 004 (OPEN_CONNECT, GET_KEY, CLOSE) at a KM: ``service`` and its HTTPS ``routes``."""
