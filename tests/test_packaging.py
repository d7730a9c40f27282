"""Every Python package folder is installed: pyproject.toml lists packages explicitly."""

import tomllib
from pathlib import Path

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
