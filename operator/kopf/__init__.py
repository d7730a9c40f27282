"""The cluster runtime: a kopf operator that runs the control core against custom resources.

``main`` holds every kopf decorator; each concern (nodes, links, users, sessions,
monitoring, the ControlPlane service, start and stop) has its module under ``handlers``;
``specs`` builds the manifests of the children as pure functions.
"""
