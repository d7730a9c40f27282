"""ETSI GS QKD 014 at a KM: the application API it serves (``service``, ``routes``,
``openapi``) and the client it draws key from a QKD module with (``client``)."""
