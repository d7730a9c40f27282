"""Run one key manager: ``python -m vqkd.km --config km.json``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from vqkd.km import config
from vqkd.km.process import serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vqkd.km", description="Run a vqkd key manager.")
    parser.add_argument("--config", required=True, help="KM configuration (JSON, see vqkd.km.config.KMConfig)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config.load(config.KMConfig, args.config)))


if __name__ == "__main__":
    main()
