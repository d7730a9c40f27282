"""Build the KM and operator images with the container engine this machine has.

    python3 -P tools/images.py   # what `make images` runs: both images, then their sizes

The engine is Docker where a Docker engine answers, else buildah (with `--isolation chroot`
and vfs storage, which need no daemon, no runtime and no overlay support, so they also work
inside a container). The images are tagged as the chart and the operator name them by
default (``ghcr.io/vqkd/km:VERSION``, ``ghcr.io/vqkd/operator:VERSION``).

The base is the official Python image the Dockerfiles name. Where it cannot be pulled (no
container registry reachable), a stand-in is made once from Debian's packages with
debootstrap (python3, python3-venv) and kept in the engine's storage for later builds.

With buildah, pip in the build uses this machine's package index and trust: the effective pip
settings (``pip config list``: configuration files and PIP_* variables) are written to one
file, passed as the build argument PIP_CONFIG_FILE, and every file and folder they name (the
CA bundle, find-links, file:// indexes with the folder beside them, constraints) is mounted
read-only for the build, under the Dockerfiles' scratch file system /build, so that neither
they nor their mount points end up in an image. Docker builds use the base image's own pip
settings.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DOCKERFILES = {"km": ROOT / "km" / "Dockerfile", "operator": ROOT / "operator" / "Dockerfile"}
IMAGES = {name: f"ghcr.io/vqkd/{name}:{VERSION}" for name in DOCKERFILES}
VENV = "/opt/vqkd"  # where both Dockerfiles install vqkd
BUILD_PIP = "/build/pip"  # where a build sees this machine's pip settings

# vfs copies whole layers, so it is slower than overlay, but works on any filesystem and kernel.
BUILDAH = ["buildah", "--storage-driver", "vfs"]
DEBIAN_SUITE = "bookworm"  # the Debian release of the official base image
DEBIAN_MIRROR = os.environ.get("VQKD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
STAND_IN_PACKAGES = ["python3", "python3-venv", "python-is-python3"]
# Nothing in the images reads these; the official slim images leave them out too.
STAND_IN_STRIP = ["var/cache/apt", "var/lib/apt/lists", "var/log", "usr/share/doc", "usr/share/man",
                  "usr/share/info", "usr/share/locale", "usr/share/lintian", "usr/lib/python3.11/test"]
STAND_IN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# The tag names the recipe, so a stand-in kept from an older recipe is not reused.
_RECIPE = repr((DEBIAN_SUITE, STAND_IN_PACKAGES, STAND_IN_STRIP, STAND_IN_ENV)).encode()
STAND_IN = f"localhost/vqkd/python-base:{DEBIAN_SUITE}-{hashlib.sha256(_RECIPE).hexdigest()[:12]}"


def engine() -> str | None:
    """'docker' where a Docker engine answers, else 'buildah' where it is installed."""
    if shutil.which("docker"):
        try:
            if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
                return "docker"
        except subprocess.TimeoutExpired:
            pass
    return "buildah" if shutil.which("buildah") else None


def command(kind: str) -> list[str]:
    return BUILDAH if kind == "buildah" else ["docker"]


def image_id(kind: str, image: str) -> str | None:
    inspect = [*BUILDAH, "inspect", "--type", "image", "--format", "{{.FromImageID}}", image] if kind == "buildah" \
        else ["docker", "image", "inspect", "--format", "{{.Id}}", image]
    out = subprocess.run(inspect, capture_output=True, text=True)
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def official_base() -> str:
    """The PYTHON_IMAGE both Dockerfiles default to (they must agree)."""
    bases = {re.search(r"^ARG PYTHON_IMAGE=(\S+)$", path.read_text(), re.M).group(1) for path in DOCKERFILES.values()}
    if len(bases) != 1:
        raise SystemExit(f"images: km/Dockerfile and operator/Dockerfile name different bases: {sorted(bases)}")
    return bases.pop()


def base_image(kind: str) -> str:
    base = official_base()
    if image_id(kind, base):
        return base
    pulled = subprocess.run([*command(kind), "pull", base], capture_output=True, text=True)
    if pulled.returncode == 0:
        return base
    why = (pulled.stderr.strip().splitlines() or ["no reason given"])[-1]
    print(f"images: cannot pull {base} ({why}); using a stand-in from Debian's packages, {STAND_IN}", flush=True)
    if not image_id(kind, STAND_IN):
        build_stand_in(kind)
    return STAND_IN


def build_stand_in(kind: str) -> None:
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        raise SystemExit("images: the stand-in base needs debootstrap, run as root "
                         "(sudo apt-get install debootstrap; make images installs it when run as root)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vqkd-base-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp, "rootfs")
        print(f"images: debootstrap {DEBIAN_SUITE} with {', '.join(STAND_IN_PACKAGES)} from {DEBIAN_MIRROR}", flush=True)
        log = Path(tmp, "debootstrap.log")
        with log.open("wb") as out:
            done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(STAND_IN_PACKAGES)}",
                                   DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR], stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"images: debootstrap failed:\n{log.read_text(errors='replace')[-3000:]}")
        for sub in STAND_IN_STRIP:
            shutil.rmtree(rootfs / sub, ignore_errors=True)
        archive = Path(tmp, "rootfs.tar")
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
        if kind == "buildah":
            container = subprocess.run([*BUILDAH, "from", "scratch"], capture_output=True, text=True,
                                       check=True).stdout.strip()
            try:
                subprocess.run([*BUILDAH, "add", "--quiet", container, str(archive), "/"], check=True)
                env = [arg for item in STAND_IN_ENV.items() for arg in ("--env", "=".join(item))]
                subprocess.run([*BUILDAH, "config", *env, "--cmd", "python3", container], check=True)
                subprocess.run([*BUILDAH, "commit", "--quiet", container, STAND_IN], check=True, stdout=subprocess.DEVNULL)
            finally:
                subprocess.run([*BUILDAH, "rm", container], capture_output=True)
        else:
            changes = [f"--change=ENV {key}={value}" for key, value in STAND_IN_ENV.items()]
            subprocess.run(["docker", "import", *changes, "--change=CMD [\"python3\"]", str(archive), STAND_IN],
                           check=True, stdout=subprocess.DEVNULL)
    print(f"images: {STAND_IN} built in {time.monotonic() - started:.0f}s", flush=True)


def pip_settings(inside: str) -> tuple[str, dict[Path, str]]:
    """This machine's effective pip settings as one configuration file for a build, with every
    path in it moved under ``inside``; and the mounts that put those paths there."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    settings: dict[tuple[str, str], str] = {}
    from_env: dict[str, str] = {}
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        value = ast.literal_eval(value)
        if section == ":env:":
            from_env[name] = value
        else:
            settings[(section, name)] = value
    # PIP_* variables override every section of the configuration files.
    settings = {(section, name): from_env.get(name, value) for (section, name), value in settings.items()}
    settings.update({("global", name): value for name, value in from_env.items()})
    config = configparser.ConfigParser(interpolation=None)
    mounts: dict[Path, str] = {}
    for (section, name), value in settings.items():
        words = []
        for word in value.split():
            is_url = word.startswith("file:")
            path = Path(unquote(urlparse(word).path)) if is_url else Path(word)
            if path.is_absolute() and path.exists():
                # A file index (…/simple) links to its files beside it, e.g. ../../files/NAME.whl.
                mounted = path.parent if is_url and path.name == "simple" and path.parent != Path("/") else path
                mounts[mounted] = inside + str(mounted)
                word = ("file://" if is_url else "") + inside + str(path)
            words.append(word)
        if not config.has_section(section):
            config.add_section(section)
        config.set(section, name, " ".join(words))
    with tempfile.TemporaryFile("w+") as text:
        config.write(text)
        text.seek(0)
        return text.read(), mounts


def build(kind: str) -> None:
    started = time.monotonic()
    base = base_image(kind)
    with tempfile.TemporaryDirectory(prefix="vqkd-images-") as tmp:
        if kind == "buildah":
            # Under /build, the Dockerfiles' memory file system: the mount points vanish with it.
            conf, mounts = pip_settings(inside=BUILD_PIP)
            Path(tmp, "pip.conf").write_text(conf)
            volumes = [f"{tmp}/pip.conf:{BUILD_PIP}/pip.conf:ro", *(f"{host}:{ctr}:ro" for host, ctr in mounts.items())]
            engine_args = [*BUILDAH, "build", "--isolation", "chroot", "--pull=never",
                           "--build-arg", f"PIP_CONFIG_FILE={BUILD_PIP}/pip.conf",
                           *(arg for v in volumes for arg in ("--volume", v))]
        else:
            engine_args = ["docker", "build", "--pull=false"]
        for name, dockerfile in DOCKERFILES.items():
            image = IMAGES[name]
            previous = image_id(kind, image)
            print(f"images: building {image} from {dockerfile.relative_to(ROOT)} on {base}", flush=True)
            log = Path(tmp, f"{name}.log")
            with log.open("wb") as out:
                done = subprocess.run([*engine_args, "--build-arg", f"PYTHON_IMAGE={base}", "-f", str(dockerfile),
                                       "-t", image, str(ROOT)], stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise SystemExit(f"images: building {image} failed:\n{log.read_text(errors='replace')[-4000:]}")
            if previous and previous != image_id(kind, image):
                subprocess.run([*command(kind), "rmi", previous], capture_output=True)  # the untagged old build
    print(f"images: built in {time.monotonic() - started:.0f}s", flush=True)
    sizes(kind, base)


def size_mb(kind: str, image: str) -> float:
    """Uncompressed size, as the engine counts it, in MB."""
    if kind == "buildah":
        manifest = subprocess.run([*BUILDAH, "inspect", "--type", "image", "--format", "{{.Manifest}}", image],
                                  capture_output=True, text=True, check=True).stdout
        return sum(layer["size"] for layer in json.loads(manifest)["layers"]) / 1e6
    size = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", image],
                          capture_output=True, text=True, check=True).stdout
    return int(size) / 1e6


def sizes(kind: str, base: str) -> None:
    base_mb = size_mb(kind, base)
    print(f"base {base}: {base_mb:.0f} MB")
    for image in IMAGES.values():
        mb = size_mb(kind, image)
        print(f"{image}: {mb:.0f} MB, of it {mb - base_mb:.0f} MB over the base (vqkd's virtual environment {VENV})")


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    kind = engine()
    if kind is None:
        raise SystemExit("images: no container engine here: needs a running Docker engine or buildah "
                         "(sudo apt-get install buildah debootstrap)")
    build(kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
