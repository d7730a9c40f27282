"""Generate the gRPC Python code from ``km/v1/*.proto`` — the one command for it.

    python -m vqkd.km.protogen          # rewrite km/v1/*_pb2*.py
    python -m vqkd.km.protogen --check  # exit 1 if the checked-in code is stale

protoc derives import paths from the proto's path under its include root, so the protos
are laid out under ``vqkd/km/v1/`` in a scratch directory; the generated modules then import
each other as ``vqkd.km.v1.…``, which is where they are installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent / "v1"
PACKAGE_PATH = Path("vqkd/km/v1")


def generate() -> dict[str, bytes]:
    """Return {file name: generated content} for every proto in km/v1."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "src"), Path(tmp, "out")
        (src / PACKAGE_PATH).mkdir(parents=True)
        (out / PACKAGE_PATH).mkdir(parents=True)
        protos = sorted(PROTO_DIR.glob("*.proto"))
        for proto in protos:
            shutil.copy(proto, src / PACKAGE_PATH / proto.name)
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "protoc", f"-I{src}", f"-I{well_known}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            *(str(PACKAGE_PATH / p.name) for p in protos),
        ]
        # protoc resolves the proto arguments against the include path, relative to cwd.
        cwd = Path.cwd()
        try:
            os.chdir(src)
            if protoc.main(args) != 0:
                raise SystemExit("protoc failed")
        finally:
            os.chdir(cwd)
        return {p.name: p.read_bytes() for p in sorted((out / PACKAGE_PATH).iterdir()) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the generated code is stale")
    args = parser.parse_args(argv)
    generated = generate()
    stale = [name for name, data in generated.items()
             if not (PROTO_DIR / name).exists() or (PROTO_DIR / name).read_bytes() != data]
    if args.check:
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run `make proto`", file=sys.stderr)
            return 1
        return 0
    for name in stale:
        (PROTO_DIR / name).write_bytes(generated[name])
        print(f"wrote km/v1/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
