"""The chart's Grafana dashboard and Prometheus alerts, against a real Prometheus.

A real Prometheus server (Debian's ``prometheus`` package, installed by ``make tools``)
scrapes a running local network — KMs, emulated QKD modules and the control plane — on
loopback, with the alert rules the chart renders. The network goes through what the
dashboard and the alerts are about: relayed keys, hybrid fallback keys, refused requests
and sessions, a forged relay commit, a KM killed and replaced, a link cut and a QBER spike.
Then every PromQL expression of every dashboard panel runs through Prometheus's HTTP API
and must return data, every metric an alert reads must have data, and the alerts for what
happened must fire.

Only the operator serves ``vqkd_operator_*`` (a local network has no operator): those
expressions are checked to be valid PromQL over metrics the operator defines, not for data.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import yaml

from conftest import free_port
from test_helm import CHART, ROOT, needs_helm, one, render
from test_km_etsi014 import control as link_control
from vqkd.km import identity
from vqkd.km.rpc.credentials import grpc_channel_credentials
from vqkd.km.etsi014.client import ETSI014Error
from vqkd.km.v1 import km_pb2, km_pb2_grpc
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.control.monitoring import MonitoringSettings
from vqkd.operator.local import paper
from vqkd.operator.local.clients import sae_client
from vqkd.operator.local.runtime import LocalControlPlane
from vqkd.operator.local.processes import LocalNetwork
from vqkd.operator.resources.loader import load_text

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the network's servers run on that loop

DASHBOARD = CHART / "files" / "dashboards" / "vqkd-network.json"
INSTALL_PROMETHEUS = "apt-get install prometheus (as root; `make tools` does it where it can)"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                      reason=f"Prometheus is not installed; run: {INSTALL_PROMETHEUS}")
OPERATOR_ONLY = "served only by the operator in a cluster; a local network has no operator"
# Grafana's variables, as a query over this test's few minutes of data needs them.
GRAFANA_VARIABLES = {"$namespace": ".*", "$__rate_interval": "1m", "$__range": "1h"}
# The alerts' `for:` shortened so that they fire within the test.
SHORT_FOR = [arg for alert in ("linkDown", "qberAboveThreshold", "keyPoolNearEmpty", "sessionsHeld", "operatorErrors")
             for arg in ("--set", f"metrics.prometheusRule.alerts.{alert}.for=1s")]
METRIC = re.compile(r"\bvqkd_[a-z0-9_]+\b")


# --- the expressions ---------------------------------------------------------------------


def panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return [p for p in found if p.get("type") != "row"]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]


def as_queried(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def alert_rules(*extra: str) -> list[dict]:
    rule = one(render("--set", "metrics.prometheusRule.enabled=true", *extra), "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def operator_only(expr: str) -> bool:
    return any(name.startswith("vqkd_operator_") for name in METRIC.findall(expr))


def exported_metrics() -> dict[str, str]:
    """Every series name the code exports -> its file, read from the metric definitions."""
    kinds = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
             "gauge": ("",)}
    exported: dict[str, str] = {}
    for source in [*ROOT.joinpath("km").rglob("*.py"), *ROOT.joinpath("operator").rglob("*.py")]:
        for node in ast.walk(ast.parse(source.read_text())):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str) and node.args[0].value.startswith("vqkd_")):
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            kind = next((k for k in kinds if k in func.lower()), None)
            if kind is None:
                continue
            base = node.args[0].value.removesuffix("_total") if kind == "counter" else node.args[0].value
            for suffix in kinds[kind]:
                exported[base + suffix] = str(source.relative_to(ROOT))
    return exported


def test_the_code_defines_what_the_readme_and_the_operator_promise():
    exported = exported_metrics()
    assert {"vqkd_km_pool_bits", "vqkd_module_qber", "vqkd_control_link_state", "vqkd_operator_reconciles_total",
            "vqkd_operator_errors_total", "vqkd_km_request_duration_seconds_bucket"} <= set(exported)


@needs_helm
def test_every_metric_in_the_dashboard_and_the_alerts_is_one_the_code_exports():
    exported = exported_metrics()
    used = {(where, name) for where, expr in dashboard_expressions() for name in METRIC.findall(expr)}
    used |= {(rule["alert"], name) for rule in alert_rules() for name in METRIC.findall(rule["expr"])}
    unknown = sorted(f"{name} (in {where})" for where, name in used if name not in exported)
    assert not unknown, f"metrics no code defines: {unknown}"


def test_the_dashboard_has_a_panel_for_each_concern():
    titles = {title for title, _ in dashboard_expressions()}
    for concern in ("key rate", "QBER", "Key pool", "Link state", "Sessions by phase", "Key requests per KM",
                    "latency per KM", "Relayed key", "Relay rejections", "refusals by reason", "refused at the KMs",
                    "Fallback (PQC) keys", "KM replacements", "Operator errors", "Reconciliations",
                    "rate per user", "Keys delivered per user", "KM replicas per node", "per KM replica"):
        assert any(concern.lower() in title.lower() for title in titles), f"no panel for {concern}"
    dashboard = json.loads(DASHBOARD.read_text())
    cells: dict[tuple[int, int], str] = {}  # no two panels share a grid cell
    for panel in panels(dashboard):
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cells.setdefault(cell, panel["title"]) == panel["title"], f"{panel['title']} overlaps {cells[cell]}"
    assert dashboard["uid"] and [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "namespace"]
    for panel in panels(dashboard):
        assert panel["description"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]


@needs_helm
@needs_prometheus
def test_promtool_accepts_the_alert_rules(tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": one(render("--set", "metrics.prometheusRule.enabled=true"),
                                                   "PrometheusRule")["spec"]["groups"]}))
    done = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "SUCCESS: 7 rules found" in done.stdout, done.stdout + done.stderr


# --- a network, and Prometheus scraping it -----------------------------------------------


def _node(name: str, saes: list[str]) -> str:
    return f"apiVersion: vqkd.io/v1alpha1\nkind: QKDNode\nmetadata: {{name: {name}}}\nspec: {{saeIds: {saes}}}\n"


def _link(a: str, b: str, rate: int, qber: float) -> str:
    return (f"apiVersion: vqkd.io/v1alpha1\nkind: QKDLink\nmetadata: {{name: {a}-{b}}}\n"
            f"spec:\n  nodes: [{a}, {b}]\n  emulated: {{keyRateBps: {rate}, qber: {qber}}}\n")


# a -- b -- c -- d. Keys a -> c are relayed through b. Link c-d runs near the QBER threshold
# (little secret key for its configured rate), so the hybrid fallback user on it draws PQC keys.
NETWORK = "---\n".join([
    _node("a", ["sae-a"]), _node("b", ["sae-b"]), _node("c", ["sae-c", "sae-c2"]), _node("d", ["sae-d"]),
    _link("a", "b", 500_000, 0.02), _link("b", "c", 500_000, 0.02), _link("c", "d", 100_000, 0.10),
    """apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {name: relay-user}
spec:
  saeIds: [sae-a, sae-c]
  sla: {maxKeyRateBps: 65536}
""", """apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {name: pqc-user}
spec:
  saeIds: [sae-d, sae-c2]
  defaultQos: {fallback: pqc, timeout: 200}
""", """apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata: {name: relayed}
spec:
  user: relay-user
  source: {node: a, saeId: sae-a}
  destination: {node: c, saeId: sae-c}
  qos: {keyChunkSize: 32, maxBps: 16384, minBps: 1024}
""", """apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata: {name: over-sla}
spec:
  user: relay-user
  source: {node: a, saeId: sae-a}
  destination: {node: c, saeId: sae-c}
  qos: {minBps: 100000, maxBps: 200000}
""",
])


class Prometheus:
    """A Prometheus server on loopback with static targets and the chart's rules."""

    def __init__(self, directory: Path, targets: dict[str, list[str]], rules: list[dict]):
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rules.yml").write_text(yaml.safe_dump({"groups": rules}))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(directory / "rules.yml")],
            "scrape_configs": [
                {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": hosts}]}
                for job, hosts in targets.items()
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, **query: str) -> dict:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def firing(self) -> set[tuple[str, str]]:
        return {(a["labels"]["alertname"], a["labels"].get("link") or a["labels"].get("node") or "")
                for a in self.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"}

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"prometheus not ready after {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _hostport(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


async def _eventually(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f} s")
        await asyncio.sleep(0.25)


def _km_metric(net: LocalNetwork, node: str, name: str) -> bool:
    with urllib.request.urlopen(net.endpoints["nodes"][node]["metrics_url"], timeout=5) as response:
        return any(line.startswith(name) for line in response.read().decode().splitlines())


async def _forged_commit(net: LocalNetwork) -> None:
    """A commit for a relay KM c never received, from its real peer b: refused and counted."""
    controller = grpc_channel_credentials(net._tls(identity.controller()).files())

    async def incarnation(node: str) -> str:
        async with grpc.aio.secure_channel(net.endpoints["nodes"][node]["grpc"], controller) as channel:
            return (await km_pb2_grpc.KeyManagerControlStub(channel).GetStats(km_pb2.GetStatsRequest(),
                                                                             timeout=5)).incarnation

    sender, receiver = await incarnation("b"), await incarnation("c")
    peer_b = grpc_channel_credentials(net._tls(identity.km("b")).files())
    async with grpc.aio.secure_channel(net.endpoints["nodes"]["c"]["grpc"], peer_b) as channel:
        reply = await km_pb2_grpc.LinkPeerStub(channel).Commit(km_pb2.CommitRequest(
            link="b-c", sender_incarnation=sender, receiver_incarnation=receiver,
            commits=[km_pb2.RelayCommit(session_id="no-such-session", relay_id="no-such-relay")]), timeout=5)
    assert len(reply.refused) == 1 and reply.refused[0].startswith("NOT_FOUND: unknown_relay: no pending relay")


async def _fallback_keys(net: LocalNetwork) -> None:
    """sae-d asks for key faster than link c-d yields it; its user allows the hybrid fallback.

    The session's token bucket follows the link's measured spare rate (about 6 kbit/s), so each
    request stays within one second of it, and the requests come faster than node d's share of
    the link's key refills the pool."""
    client = sae_client(net.endpoints, "sae-d")
    try:
        for _ in range(60):
            try:
                await client.enc_keys("sae-c2", 4, 1024)
            except ETSI014Error as e:
                assert e.status == 503, e.message  # the token bucket refilling
            if await asyncio.to_thread(_km_metric, net, "d", "vqkd_km_fallback_keys_total"):
                return
            await asyncio.sleep(0.2)
    finally:
        await client.close()
    raise AssertionError("no hybrid fallback key was delivered at node d")


async def _refused_request(net: LocalNetwork) -> None:
    client = sae_client(net.endpoints, "sae-d")
    try:
        with pytest.raises(ETSI014Error) as refused:
            await client.enc_keys("sae-c2", 1, 100)
        assert refused.value.status == 400 and "multiple of 8" in refused.value.message
    finally:
        await client.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def observed(tmp_path_factory):
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip(f"Prometheus is not installed; run: {INSTALL_PROMETHEUS}")
    rules = one(render("--set", "metrics.prometheusRule.enabled=true", *SHORT_FOR), "PrometheusRule")["spec"]["groups"]
    tmp = tmp_path_factory.mktemp("observability")
    network = LocalNetwork(load_text(NETWORK, "observability"), tmp / "network", log_level="INFO", control_plane="auto")
    cp = LocalControlPlane(network, admission=AdmissionSettings(peer_wait_s=2, inactivity_timeout_s=600),
                           monitoring=MonitoringSettings(no_key_window_s=2.0))
    endpoints = network.endpoints  # planned: every address is known before anything starts
    prometheus = Prometheus(tmp / "prometheus", {
        "vqkd-km": [_hostport(n["metrics_url"]) for n in endpoints["nodes"].values()],
        "vqkd-qkd-module": [_hostport(link["metrics_url"]) for link in endpoints["links"].values()],
        "vqkd-control-plane": [_hostport(endpoints["control"]["status_url"])],
    }, rules)
    try:
        await asyncio.to_thread(prometheus.wait_ready)
        await cp.start()
        await paper.wait_active(cp, ["relayed"])
        assert await paper.exchange(endpoints, "sae-a", "sae-c") == (paper.ROUNDS * paper.KEYS_PER_REQUEST, 0)
        await _fallback_keys(network)
        await _refused_request(network)
        await _forged_commit(network)
        km_a = network.processes["km-a"]
        km_a.popen.kill()
        await _eventually(lambda: km_a.restarts == 1 and km_a.popen.poll() is None, "KM a replaced", 20)
        # Cut the only path of the relayed session, and let an eavesdropper near link a-b.
        await asyncio.to_thread(link_control, network, "b-c", outage=True)
        await asyncio.to_thread(link_control, network, "a-b", qber=0.2)
        yield prometheus
    finally:
        await cp.stop()
        prometheus.stop()


# What happened, and the alert that must say so.
EXPECTED_ALERTS = {("VqkdLinkDown", "b-c"), ("VqkdQBERAboveThreshold", "a-b"), ("VqkdSessionsHeldWithoutRoute", ""),
                   ("VqkdKMReplaced", "a")}


@in_module_loop
async def test_the_link_down_and_the_other_alerts_fire(observed):
    firing: set = set()

    def fired() -> bool:
        firing.update(observed.firing())
        return EXPECTED_ALERTS <= firing

    try:
        await _eventually(fired, "alerts firing", 40)
    except AssertionError:
        raise AssertionError(f"firing: {sorted(firing)}; missing: {sorted(EXPECTED_ALERTS - firing)}") from None


@in_module_loop
async def test_every_dashboard_expression_returns_data(observed):
    await _eventually(lambda: EXPECTED_ALERTS <= observed.firing(), "the scenario's alerts", 40)
    skipped = [title for title, expr in dashboard_expressions() if operator_only(expr)]
    pending = [(title, expr) for title, expr in dashboard_expressions() if not operator_only(expr)]
    # A rate needs two successful scrapes in its window; on a loaded machine a scrape can miss
    # its 1 s timeout, so a panel counts once it has shown data.
    deadline = time.monotonic() + 30
    while True:
        results = [await asyncio.to_thread(observed.query, as_queried(expr)) for _, expr in pending]  # PromQL errors raise
        pending = [(title, expr) for (title, expr), result in zip(pending, results) if not result]
        if not pending or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    down = [f"{r['labels']['job']} {r['labels']['instance']}" for r in observed.query("up == 0")]
    assert not pending, "panels without data:\n" + "\n".join(f"{t}: {e}" for t, e in pending) + \
        f"\ntargets down now: {down}"
    assert sorted(set(skipped)) == ["KM replacement time", "Operator errors", "Reconciliations by result"], \
        OPERATOR_ONLY


@in_module_loop
async def test_every_metric_an_alert_reads_has_data(observed):
    await _eventually(lambda: EXPECTED_ALERTS <= observed.firing(), "the scenario's alerts", 40)
    rules = {rule["alert"]: rule["expr"] for group in yaml.safe_load(
        (observed.directory / "rules.yml").read_text())["groups"] for rule in group["rules"]}
    empty = []
    for alert, expr in rules.items():
        await asyncio.to_thread(observed.query, expr)  # the whole rule is valid PromQL
        if operator_only(expr):
            continue  # VqkdOperatorErrors: OPERATOR_ONLY
        for selector in re.findall(r"\bvqkd_[a-z0-9_]+(?:\{[^}]*\})?", expr):
            if not await asyncio.to_thread(observed.query, selector):
                empty.append(f"{alert}: {selector}")
    assert not empty, "alerts reading metrics without data:\n" + "\n".join(empty)
    assert [alert for alert, expr in rules.items() if operator_only(expr)] == ["VqkdOperatorErrors"], OPERATOR_ONLY
