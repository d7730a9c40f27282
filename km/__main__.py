"""Run one key manager: ``python -m vqkd.km --config km.json``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from pydantic import ValidationError

from vqkd.km import config
from vqkd.km.process import serve

# Set by the pod from its StatefulSet ordinal: the replicas of a node share one configuration file.
REPLICA_ENV = "VQKD_KM_REPLICA"


def load(path: str, environ=os.environ) -> config.KMConfig:
    """The KM configuration in ``path``, its replica ordinal taken from ``VQKD_KM_REPLICA`` if set."""
    loaded = config.load(config.KMConfig, path)
    replica = environ.get(REPLICA_ENV)
    if replica is None:
        return loaded
    try:
        return config.KMConfig.model_validate({**loaded.model_dump(), "replica": replica})
    except ValidationError as e:
        problem = e.errors()[0]["msg"]
        raise SystemExit(f"{REPLICA_ENV}={replica!r} is no replica ordinal for {path}: {problem}") from None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vqkd.km", description="Run a vqkd key manager.")
    parser.add_argument("--config", required=True, help="KM configuration (JSON, see vqkd.km.config.KMConfig)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(load(args.config)))


if __name__ == "__main__":
    main()
