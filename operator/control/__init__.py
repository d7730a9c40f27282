"""The control plane of the paper (§3.1, Fig. 1) as plain Python: no kopf, gRPC or HTTP.

One module per element: ``topology`` (the SDN controller's view of nodes and links),
``access`` (who may open a session), ``sla`` (QoS against a user's SLA), ``admission`` (the
per-session cycle of Fig. 2b, in parts: ``session_registry``, ``lifecycle``,
``installation``, ``rerouting``, ``timers``; one session is a ``network_session``),
``routing`` (paths with enough spare key rate), ``monitoring`` (link health and alarms).
``core`` ties them together behind the small API the two runtimes call, handing resources
to ``network_changes`` and ``declared_sessions`` and the KMs' calls to ``km_calls``; the
views are rendered by ``views`` and ``etsi015``. The runtimes own the transports: they
implement ``session_config.KMPusher`` and feed samples, signals and time in.
"""
