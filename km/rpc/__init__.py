"""The KM's gRPC transports: KM ⇄ KM (``peers``), the control plane's calls to the KM
(``control_service``), the KM's calls to the control plane (``control_plane_client``), and
the mutual-TLS credentials they share (``credentials``)."""
