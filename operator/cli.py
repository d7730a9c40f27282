"""The ``vqkd`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Import names of the `operator` extra: the KM image installs vqkd without it.
CONTROL_PLANE_MODULES = {"kopf", "kubernetes", "networkx", "yaml"}


def _load(files: list[str]):
    from vqkd.operator.resources.loader import ManifestError, load_files

    try:
        return load_files([Path(f) for f in files])
    except ManifestError as e:
        raise SystemExit(f"vqkd: invalid resources:\n{e}") from None


def cmd_up(args: argparse.Namespace) -> int:
    from vqkd.operator.local.runtime import LocalControlPlane
    from vqkd.operator.local.processes import LocalNetwork

    network = LocalNetwork(_load(args.files), Path(args.state_dir), log_level=args.log_level, control_plane="auto",
                           secrets=Path(args.secrets) if args.secrets else None)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        control = LocalControlPlane(network)
        links = network.manifest.links.values()
        devices = sum(link.spec.etsi014 is not None for link in links)
        kms = sum(node.spec.km.replicas for node in network.manifest.nodes.values())
        print(f"starting {kms} KMs, {len(links) - devices} emulated QKD links and "
              f"{devices} links to QKD devices with the control plane ...", flush=True)
        await control.start()
        print(f"network up; endpoints in {network.state_dir / 'endpoints.json'}; "
              f"status: vqkd get sessions --state-dir {args.state_dir}; change it: vqkd apply|delete FILE... "
              f"--state-dir {args.state_dir}; Ctrl-C stops it", flush=True)
        try:
            await stop.wait()
        finally:
            await control.stop()
            print("network stopped", flush=True)

    asyncio.run(run())
    return 0


def cmd_change(args: argparse.Namespace) -> int:
    from vqkd.operator.local import changes

    return changes.submit(args.command, args.files, Path(args.state_dir))


def cmd_get(args: argparse.Namespace) -> int:
    from vqkd.operator.local import status

    return status.show(args.what, Path(args.state_dir), args.output)


def cmd_demo(args: argparse.Namespace) -> int:
    from vqkd.operator.local import demo

    file = Path(args.file) if args.file else EXAMPLES / f"{args.scenario}.yaml"
    if not file.exists():
        raise SystemExit(f"vqkd demo: no scenario file {file}; pass --file")
    return demo.run(args.scenario, _load([str(file)]), Path(args.state_dir), plot=args.plot)


def cmd_operator(args: argparse.Namespace) -> int:
    import dataclasses

    from vqkd.operator.kopf.main import operate
    from vqkd.operator.kopf.runtime import OperatorOptions

    given = {
        "namespace": args.namespace, "kubeconfig": args.kubeconfig,
        "control_plane_listen": args.control_plane_listen, "control_plane_address": args.control_plane_address,
        "metrics_listen": args.metrics_listen, "liveness_endpoint": args.liveness, "endpoints_file": args.endpoints,
        "state_dir": Path(args.state_dir) if args.state_dir else None, "module_image": args.module_image,
        "poll_interval_s": args.poll_interval, "replace_after_s": args.replace_after,
        "counts_interval_s": args.counts_interval, "km_roll_wait_s": args.km_roll_wait,
    }
    # Flags win over VQKD_* variables, which win over the defaults; an empty listen address turns that server off.
    options = dataclasses.replace(OperatorOptions.from_env(), **{
        key: (value or None) if key in ("metrics_listen", "liveness_endpoint") else value
        for key, value in given.items() if value is not None})
    asyncio.run(operate(options))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqkd", description="Virtualized control and key management for QKD networks.")
    parser.add_argument("--log-level", default="WARNING", help="log level of vqkd and the processes it starts")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a network on this machine (local runtime)")
    up.add_argument("files", nargs="+", help="YAML files with QKDNode, QKDLink, UserProfile, KeySession resources")
    up.add_argument("--state-dir", default="state", help="certificates, configs, logs and endpoints.json go here")
    up.add_argument("--secrets", metavar="DIR",
                    help="credentials for links to real QKD devices (spec.etsi014): DIR/<secretRef name>/ holds "
                         "ca.crt, tls.crt and tls.key, the keys of the Secret a cluster would mount")
    up.set_defaults(func=cmd_up)

    for command, does in (("apply", "create or update the resources in the files (as kubectl apply)"),
                          ("delete", "delete the resources the files name (as kubectl delete)")):
        change = sub.add_parser(command, help=f"{does}, in a network started with `vqkd up`")
        change.add_argument("files", nargs="+", help="YAML files (or directories of them) with QKDNode, QKDLink, "
                                                     "UserProfile, KeySession resources")
        change.add_argument("--state-dir", default="state", help="the state directory the network runs in")
        change.set_defaults(func=cmd_change)

    get = sub.add_parser("get", help="show the state of a network started with `vqkd up`")
    get.add_argument("what", choices=["sessions", "links", "nodes", "users", "alarms", "events", "etsi015"])
    get.add_argument("--state-dir", default="state")
    get.add_argument("-o", "--output", choices=["table", "json"], default="table")
    get.set_defaults(func=cmd_get)

    demo = sub.add_parser("demo", help="run a demonstration scenario end to end")
    demo.add_argument("scenario", choices=["two-nodes", "paper"], help="which scenario")
    demo.add_argument("--plot", metavar="FILE.png", help="paper: draw the KMs' events like the paper's Fig. 4")
    demo.add_argument("--file", help="resources to use instead of examples/<scenario>.yaml")
    demo.add_argument("--state-dir", default="state/demo")
    demo.set_defaults(func=cmd_demo)

    op = sub.add_parser("operator", help="run the Kubernetes operator (cluster runtime) for one namespace")
    op.add_argument("--namespace", help="namespace whose vqkd resources it manages (default: $VQKD_NAMESPACE, "
                                        "else default)")
    op.add_argument("--kubeconfig", help="kubeconfig file (default: $VQKD_KUBECONFIG or $KUBECONFIG; without one, "
                                         "the pod's service account)")
    op.add_argument("--control-plane-listen", help="host:port of the ControlPlane gRPC service (default 0.0.0.0:9443)")
    op.add_argument("--control-plane-address",
                    help="host:port the KMs dial (default: Service vqkd-control-plane in the namespace)")
    op.add_argument("--metrics-listen", help="host:port of /metrics (default 0.0.0.0:9090; empty: off)")
    op.add_argument("--liveness", help="kopf liveness URL (default http://0.0.0.0:8080/healthz; empty: off)")
    op.add_argument("--endpoints", help="reach KMs and modules at a local runtime's endpoints.json, not Services")
    op.add_argument("--state-dir", help="working copy of the CA and issued certificates (default /tmp/vqkd-operator)")
    op.add_argument("--module-image", help="image of the emulated QKD modules (default: the KM image)")
    op.add_argument("--poll-interval", type=float, help="seconds between KM and module polls (default 5)")
    op.add_argument("--replace-after", type=float, help="seconds a KM may not answer before its pod is replaced "
                                                         "(default 15)")
    op.add_argument("--counts-interval", type=float,
                    help="seconds between writes of keys delivered to KeySession and UserProfile status (default 30)")
    op.add_argument("--km-roll-wait", type=float,
                    help="seconds a KM whose pod template changed may take to be Ready again before the next KM "
                         "rolls anyway (default 120)")
    op.set_defaults(func=cmd_operator)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in CONTROL_PLANE_MODULES:
            raise
        raise SystemExit(f"vqkd {args.command}: the control plane's dependencies are not installed (no module "
                         f"{e.name!r}); install them with: pip install 'vqkd[operator]'") from None


if __name__ == "__main__":
    sys.exit(main())
