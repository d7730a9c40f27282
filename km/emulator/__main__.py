"""``python -m vqkd.km.emulator --config LINK.json``: serve one emulated QKD link until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from vqkd.km import config
from vqkd.km.config import EmulatedLinkConfig
from vqkd.km.emulator.server import EmulatorServer


async def serve(cfg: EmulatedLinkConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        server = EmulatorServer(cfg)
        await server.start()
    except (OSError, ValueError) as e:  # unreadable TLS files, port in use, bad client identity
        print(f"emulated link {cfg.link}: cannot start: {e}", file=sys.stderr)
        return 1
    urls = server.urls
    print(
        f"emulated link {cfg.link} listening: end a {urls['a']}, end b {urls['b']}, "
        f"admin {urls['admin']}/metrics and /control",
        flush=True,
    )
    await stop.wait()
    await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqkd.km.emulator", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="EmulatedLinkConfig as JSON")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config.load(EmulatedLinkConfig, args.config)
    return asyncio.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
