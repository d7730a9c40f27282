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


def test_up_refuses_a_link_to_real_devices_without_its_credentials_before_starting_anything(tmp_path):
    devices = tmp_path / "devices.yaml"
    devices.write_text((ROOT / "examples" / "two-nodes.yaml").read_text().replace(
        """  emulated:
    keyRateBps: 1000000   # 1 Mbit/s of secret key at zero QBER
    qber: 0.02
""", """  etsi014:
    endpoints:
      alice: {url: "https://qkd-a.lab/", saeId: KM_A, peerSaeId: KM_B, secretRef: {name: qkd-a}}
      bob: {url: "https://qkd-b.lab/", saeId: KM_B, peerSaeId: KM_A, secretRef: {name: qkd-b}}
"""))
    out = vqkd("up", str(devices), "--state-dir", str(tmp_path / "state"))
    assert out.returncode != 0
    assert "QKDLink alice-bob: spec.etsi014: node alice's KM needs the credentials for its QKD device" in out.stderr
    assert "pass vqkd up --secrets DIR, with DIR/<secretRef name>/ holding ca.crt" in out.stderr, out.stderr
    secrets = tmp_path / "secrets"
    (secrets / "qkd-b").mkdir(parents=True)
    (secrets / "qkd-b" / "ca.crt").write_text("")
    out = vqkd("up", str(devices), "--state-dir", str(tmp_path / "state"), "--secrets", str(secrets))
    assert out.returncode != 0
    assert (f"QKDLink alice-bob, node alice: spec.etsi014.endpoints.alice.secretRef names qkd-a, but there is no "
            f"directory {secrets / 'qkd-a'}; create it with ca.crt") in out.stderr, out.stderr
    assert f"QKDLink alice-bob, node bob: spec.etsi014.endpoints.bob.secretRef names qkd-b, but {secrets / 'qkd-b'} " \
           "lacks tls.crt, tls.key" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not list((tmp_path / "state" / "logs").iterdir())


def test_control_plane_commands_without_the_operator_extra_say_what_to_install():
    # As in the KM image, which installs vqkd without its `operator` extra.
    hide = "import sys; sys.modules['kopf'] = sys.modules['yaml'] = None; from vqkd.operator.cli import main; sys.exit(main())"
    for args in (["operator"], ["up", str(ROOT / "examples" / "two-nodes.yaml")]):
        out = subprocess.run([sys.executable, "-P", "-c", hide, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert f"vqkd {args[0]}: the control plane's dependencies are not installed" in out.stderr, out.stderr
        assert "pip install 'vqkd[operator]'" in out.stderr and "Traceback" not in out.stderr


def test_operator_flags_become_its_options(monkeypatch):
    from vqkd.operator import cli
    from vqkd.operator.kopf import main

    started: list = []

    async def operate(options, **_):
        started.append(options)

    monkeypatch.setattr(main, "operate", operate)
    monkeypatch.setattr("logging.basicConfig", lambda **kwargs: None)
    assert cli.main(["operator", "--namespace", "qkd", "--replace-after", "20", "--km-roll-wait", "45"]) == 0
    (options,) = started
    assert (options.namespace, options.replace_after_s, options.km_roll_wait_s) == ("qkd", 20, 45)
    started.clear()
    assert cli.main(["operator"]) == 0
    assert started[0].km_roll_wait_s == 120
