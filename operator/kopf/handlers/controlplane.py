"""The ControlPlane gRPC service the KMs call (paper Fig. 2a): open, key-request signal, close.

It runs on the operator's event loop beside the control core it hands the calls to, with
mutual TLS: the operator presents its ``controller`` identity and accepts only KMs, each
speaking for its own node (``ControlPlaneService`` checks that).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from vqkd.km.rpc.credentials import grpc_server_credentials
from vqkd.km.v1 import km_pb2_grpc
from vqkd.operator.adapters.kms import ControlPlaneService
from vqkd.operator.kopf.runtime import Runtime

STOP_GRACE_S = 1.0


async def start(runtime: Runtime) -> grpc.aio.Server:
    server = grpc.aio.server()
    km_pb2_grpc.add_ControlPlaneServicer_to_server(ControlPlaneService(runtime.core), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    listen = runtime.options.control_plane_listen
    try:
        port = server.add_secure_port(listen, grpc_server_credentials(runtime.controller_tls))
    except RuntimeError as e:  # grpc's way of saying the address is taken or malformed
        raise OSError(f"ControlPlane service: cannot listen on {listen}: {e}") from None
    if port == 0:
        raise OSError(f"ControlPlane service: cannot listen on {listen}")
    await server.start()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    return server


async def stop(server: grpc.aio.Server) -> None:
    await server.stop(grace=STOP_GRACE_S)
