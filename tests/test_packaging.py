"""Packaging: every package folder is installed, and the KM runs on the core dependencies alone."""

import ast
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vqkd.operator import cli

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"km": "vqkd.km", "operator": "vqkd.operator", "vqkd": "vqkd"}


def test_every_package_folder_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == listed


def test_the_key_manager_never_imports_the_control_plane():
    """Dependency direction of the design: operator/ may use km/, never the reverse."""
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "km").rglob("*.py")
                 if "vqkd.operator" in path.read_text()]
    assert offenders == []


def _requirement_names(requirements: list[str]) -> set[str]:
    """Distributions these requirements install here (markers evaluated, extras not followed)."""
    found = set()
    for line in requirements:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            found.add(canonicalize_name(req.name))
    return found


def _with_dependencies(names: set[str]) -> set[str]:
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(_requirement_names(metadata.requires(name) or []))
    return found


def _third_party_imports(paths) -> dict[str, str]:
    """Top-level module -> a file importing it, for every import in ``paths`` outside the stdlib and vqkd."""
    found = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in ("vqkd", "__future__"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_the_key_manager_needs_only_the_core_dependencies():
    """The KM image installs vqkd without extras: whatever km/ imports must come with the core."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _with_dependencies(_requirement_names(project["dependencies"]))
    providers = metadata.packages_distributions()
    # `make proto` (km/protogen.py) is a developer's tool; grpcio-tools comes with the test extra.
    sources = [p for p in [*(ROOT / "km").rglob("*.py"), *(ROOT / "vqkd").rglob("*.py")] if p.name != "protogen.py"]
    outside = {module: where for module, where in _third_party_imports(sources).items()
               if not {canonicalize_name(d) for d in providers.get(module, [module])} & core}
    assert outside == {}


def test_the_cli_names_the_operator_extras_modules():
    """`vqkd` tells users to install the extra when one of these is missing; they must be the extra's."""
    extra = _requirement_names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                               ["optional-dependencies"]["operator"])
    modules = {module for module, dists in metadata.packages_distributions().items()
               if not module.startswith("_") and {canonicalize_name(d) for d in dists} & extra}
    assert modules == cli.CONTROL_PLANE_MODULES
