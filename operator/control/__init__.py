"""The control plane of the paper (§3.1, Fig. 1) as plain Python: no kopf, gRPC or HTTP.

One module per element: ``topology`` (the SDN controller's view of nodes and links),
``access`` (who may open a session), ``admission`` (the per-session cycle of Fig. 2b),
``routing`` (paths with enough spare key rate), ``monitoring`` (link health and alarms);
``core`` ties them together behind the small API the two runtimes call. The runtimes own
the transports: they implement ``kmconfig.KMPusher`` and feed samples, signals and time in.
"""
