"""The vqkd command as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vqkd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "vqkd.operator.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bad_yaml_names_file_document_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "examples" / "two-nodes.yaml").read_text().replace("qber: 0.02", "qber: 0.7"))
    out = vqkd("up", str(bad), "--state-dir", str(tmp_path / "state"))
    assert out.returncode != 0
    assert f"{bad}: document 3 (QKDLink alice-bob): spec.emulated.qber" in out.stderr, out.stderr


def test_get_without_a_running_network_says_how_to_start_one(tmp_path):
    out = vqkd("get", "sessions", "--state-dir", str(tmp_path))
    assert out.returncode != 0 and "start one with vqkd up" in out.stderr
