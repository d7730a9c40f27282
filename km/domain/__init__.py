"""The KM's domain: pools, sessions, relay, key exchange and their vocabulary.

Plain Python: it imports no transport (gRPC, HTTP, metrics), and what it needs from one
(the peer KM, the control plane) it names as a ``Protocol`` (``peer.Peer``,
``control_plane.ControlPlaneClient``) that the process plugs in.
"""
