"""The layering of the tree holds: import-linter checks the contracts in pyproject.toml.

The folders km/ and operator/ are mapped into the vqkd namespace by setuptools, a layout
import-linter cannot walk; the test copies them into the shape of the installed package
first, so the contracts are checked against exactly the files of this tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold(tmp_path):
    package = tmp_path / "vqkd"
    shutil.copytree(ROOT / "vqkd", package, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("km", "operator"):
        shutil.copytree(ROOT / folder, package / folder, ignore=shutil.ignore_patterns("__pycache__", "Dockerfile"))
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run(
        [str(lint), "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONSAFEPATH": "1"},
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
