"""The cluster runtime: a kopf operator that runs the control-plane host against custom resources.

``main`` holds every kopf decorator; each concern has its controller under ``handlers``
(a resource handler per kind, the workloads, KM health and replacement, the records of
application sessions, and what is shown of the core's findings), assembled in
``handlers.lifecycle``; ``manifests`` builds the manifests of the children as pure functions.
"""
