"""Prometheus metrics of the operator: ``vqkd_operator_*`` beside the control plane's ``vqkd_control_*``.

Both sets share one registry (the control-plane host registers its metrics in it) and one
``/metrics`` endpoint, served on the operator's event loop because the control core's
collector reads the core, which lives on that loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REPLACEMENT_BUCKETS = (0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.reconciles = Counter(
            "vqkd_operator_reconciles", "Reconciliations of vqkd resources by outcome "
            "(success; retry: waits for something; invalid: refused input; error: unexpected failure)",
            ["kind", "result"], registry=self.registry).labels
        self.errors = Counter(
            "vqkd_operator_errors", "Failures of the operator's own work: unexpected exceptions and refused "
            "Kubernetes API calls", ["kind"], registry=self.registry).labels
        self.km_replacement_seconds = Histogram(
            "vqkd_operator_km_replacement_seconds",
            "From a KM found unreachable or missing to its replacement serving with every configuration pushed again",
            buckets=REPLACEMENT_BUCKETS, registry=self.registry)

    @contextmanager
    def reconcile(self, kind: str) -> Iterator[None]:
        """Count one reconciliation of ``kind`` by how it ended."""
        try:
            yield
        except kopf.PermanentError:
            self.reconciles(kind, "invalid").inc()
            raise
        except kopf.TemporaryError:
            self.reconciles(kind, "retry").inc()
            raise
        except Exception:
            self.reconciles(kind, "error").inc()
            self.errors(kind).inc()
            raise
        self.reconciles(kind, "success").inc()

    async def serve(self, listen: str) -> web.AppRunner:
        """Serve ``/metrics`` on ``host:port``; the caller cleans the runner up."""
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = listen.rpartition(":")
        await web.TCPSite(runner, host.strip("[]") or "0.0.0.0", int(port)).start()
        return runner
