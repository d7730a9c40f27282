"""The control core's API: resources applied and deleted, open requests, the views."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from vqkd.km.domain.vocabulary import Endpoint, LinkState, Role
from vqkd.operator.control.access import Credentials
from vqkd.operator.control.admission import AdmissionSettings
from vqkd.operator.control.core import ControlCore
from vqkd.operator.control.errors import ControlError, UnresolvedReference
from vqkd.operator.control.etsi015 import ETSI015_ROOT
from vqkd.operator.control.memory_kms import InMemoryKMs
from vqkd.operator.control.monitoring import LinkSample
from vqkd.operator.control.network_session import Side
from vqkd.operator.resources.admission_cycle import AdmissionState
from vqkd.operator.resources.loader import load_files
from vqkd.operator.resources.models import KeySession, QKDLink, QoS, UserProfile

from builders import Clock

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "examples" / "paper.yaml"
TRANSPORTS = {"kopf", "grpc", "aiohttp", "kubernetes"}


@pytest.fixture
def kms() -> InMemoryKMs:
    return InMemoryKMs()


@pytest.fixture
def clock() -> Clock:
    return Clock(5000.0)


@pytest.fixture
async def paper(kms, clock) -> ControlCore:
    core = ControlCore(kms, clock=clock, admission=AdmissionSettings(terminated_retention_s=100))
    await core.load(load_files([PAPER]))
    return core


def endpoint(n: int) -> Endpoint:
    return Endpoint(f"node-{n}", f"sae-{n}")


def key_session(name: str, owner: str, source: int, destination: int, status: dict | None = None,
                generation: int | None = None, **qos) -> KeySession:
    return KeySession.model_validate({
        "metadata": {"name": name, "generation": generation},
        "spec": {"user": owner, "source": {"node": f"node-{source}", "saeId": f"sae-{source}"},
                 "destination": {"node": f"node-{destination}", "saeId": f"sae-{destination}"}, "qos": qos},
        "status": status or {},
    })


async def test_paper_sessions_are_routed_at_once_and_2_3_is_relayed_by_node_0(paper, kms):
    paths = {s["keySession"]: s["path"] for s in paper.sessions()}
    assert paths == {"session-0-1": ["node-0", "node-1"], "session-2-3": ["node-2", "node-0", "node-3"],
                     "session-4-5": ["node-4", "node-5"]}
    relayed = paper.declared_session("session-2-3")
    assert kms.entry("node-0", relayed.id).role is Role.INTERMEDIATE
    assert all(s["state"] == "Active" and s["registered"] == ["destination", "source"] for s in paper.sessions())


async def test_an_application_opening_a_declared_session_learns_its_id(paper):
    declared = paper.declared_session("session-2-3")
    result = await paper.open_session("node-3", Credentials("sae-3"), endpoint(2), endpoint(3))
    assert result.accepted and result.peer_registered and result.session_id == declared.id


async def test_changed_key_session_is_admitted_again_under_the_same_id(paper, kms, clock):
    old = paper.declared_session("session-4-5")
    clock.now += 1
    await paper.apply(key_session("session-4-5", "user-4-5", 4, 5, keyChunkSize=32, maxBps=8192, minBps=2048))
    new = paper.declared_session("session-4-5")
    assert new is not old and new.id == old.id and new.state is AdmissionState.ACTIVE
    assert old.reason == "SpecChanged" and new.version > old.version
    assert kms.entry("node-4", new.id).rate_bps == 8192
    await paper.apply(key_session("session-4-5", "user-4-5", 4, 5, keyChunkSize=32, maxBps=8192, minBps=2048))
    assert paper.declared_session("session-4-5") is new, "the same spec applied again changes nothing"


async def test_deleted_key_session_is_terminated_and_forgotten(paper, kms):
    session = paper.declared_session("session-2-3")
    await paper.delete("KeySession", "session-2-3")
    assert session.state is AdmissionState.TERMINATED and session.reason == "Deleted"
    assert kms.holders(session.id) == set() and paper.session(session.id) is None
    assert paper.routing.loads["link-0-2"].reserved_bps == 0


async def test_key_session_status_is_honoured_after_a_restart(kms, clock):
    core = ControlCore(kms, clock=clock)
    network = load_files([PAPER])
    for resource in [*network.nodes.values(), *network.links.values(), *network.users.values()]:
        await core.apply(resource)
    kept = "0b6f3c1e-5a0e-4f7e-9a43-2f1d1c7d8e90"
    await core.apply(key_session("again", "user-0-1", 0, 1, status={"sessionId": kept, "phase": "Active"}))
    assert core.declared_session("again").id == kept
    await core.apply(key_session("ended", "user-2-3", 2, 3, generation=4,
                                 status={"phase": "Terminated", "observedGeneration": 4}))
    assert core.declared_session("ended") is None, "an ended session is not revived by a restart"


async def test_a_recorded_session_still_waiting_for_its_peer_is_restored_waiting(kms, clock):
    """The record of an ETSI 004 session only its source had opened, applied by a restarted
    control plane: no path until the destination's open joins it under the same ID."""
    core = ControlCore(kms, clock=clock)
    network = load_files([PAPER])
    for resource in [*network.nodes.values(), *network.links.values(), *network.users.values()]:
        await core.apply(resource)
    kept = "5c0b9a2e-7d41-4c55-9a43-0e6f2b1d9c11"
    record = key_session("app-record", "user-2-3", 2, 3, status={"sessionId": kept, "phase": "Accepted"})
    await core.apply(record, registered=frozenset({Side.SOURCE}))
    waiting = core.session(kept)
    assert waiting.state == "Accepted" and waiting.registered == {Side.SOURCE} and waiting.route is None
    assert kms.holders(kept) == set(), "nothing configured before the peer opens"
    joined = await core.open_session("node-3", Credentials("sae-3"), endpoint(2), endpoint(3), session_id=kept)
    assert joined.accepted and joined.peer_registered and joined.session_id == kept
    assert core.session(kept).state == "Active" and kms.holders(kept) == {"node-2", "node-0", "node-3"}

    # The peer had opened, but the record did not say so yet: its KM's key request tells.
    stale = "8e2d7c1a-3b44-4f0e-b6a1-7c9d2e4f5a60"
    await core.apply(key_session("app-stale", "user-4-5", 4, 5, status={"sessionId": stale}),
                     registered=frozenset({Side.SOURCE}))
    assert kms.holders(stale) == set()
    assert not await core.key_requested(stale, "node-2"), "only an endpoint KM's signal counts"
    assert core.session(stale).state == "Accepted"
    assert await core.key_requested(stale, "node-5")
    assert core.session(stale).state == "Active" and kms.holders(stale) == {"node-4", "node-5"}

    await core.apply(key_session("app-lonely", "user-0-1", 0, 1, status={"sessionId": str(uuid.uuid4())}),
                     registered=frozenset({Side.DESTINATION}))
    lonely = core.declared_session("app-lonely")
    clock.now += AdmissionSettings().peer_wait_s + 1
    await core.tick()
    assert lonely.state == "Terminated" and lonely.reason == "PeerNotRegistered"
    assert kms.holders(lonely.id) == set()


async def test_keys_issued_are_counted_once_per_endpoint_km_instance(paper):
    relayed = paper.declared_session("session-2-3")
    paper.keys_issued("node-2", "inc-a", [(relayed.id, 10, 2560)])
    paper.keys_issued("node-0", "inc-z", [(relayed.id, 99, 99)])  # the relay is no endpoint
    paper.keys_issued("node-3", "inc-b", [(relayed.id, 2, 512), ("no-such-session", 5, 5)])
    paper.keys_issued("node-2", "inc-a", [(relayed.id, 12, 3072)])  # a later poll: totals, not increments
    assert (relayed.keys_delivered, relayed.bits_delivered) == (14, 3584)
    paper.keys_issued("node-2", "inc-c", [(relayed.id, 1, 256)])  # replaced KM: starts from zero
    view = next(s for s in paper.sessions() if s["sessionId"] == relayed.id)
    assert (view["keysDelivered"], view["bitsDelivered"]) == (15, 3840)


async def test_declared_session_checks(paper):
    with pytest.raises(UnresolvedReference, match="UserProfile 'nobody', which is not registered"):
        await paper.apply(key_session("orphan", "nobody", 0, 1))
    await paper.apply(key_session("stolen", "user-4-5", 0, 1))
    refused = paper.declared_session("stolen")
    assert refused.phase == "Rejected" and refused.reason == "SAENotOwned"


async def test_disabled_user_loses_its_sessions_and_cannot_open(paper, kms):
    session = paper.declared_session("session-0-1")
    wire = paper.access.users["user-0-1"].to_dict()
    await paper.apply(UserProfile.model_validate(wire | {"spec": wire["spec"] | {"enabled": False}}))
    assert session.state is AdmissionState.TERMINATED and session.reason == "UserDisabled"
    assert kms.holders(session.id) == set()
    refused = await paper.open_session("node-0", Credentials("sae-0"), endpoint(0), endpoint(1))
    assert not refused.accepted and refused.reason == "UserDisabled"


async def test_deleting_a_link_reroutes_and_a_node_with_links_cannot_go(paper):
    session = paper.declared_session("session-4-5")
    await paper.delete("QKDLink", "link-4-5")
    assert session.state is AdmissionState.ACTIVE and session.route.nodes == ("node-4", "node-0", "node-5")
    assert "link link-4-5 deleted" in session.message
    with pytest.raises(ControlError, match="still joined by QKDLinks link-0-4; delete those links first"):
        await paper.delete("QKDNode", "node-4")


async def test_link_from_an_unknown_node_waits_for_it(paper):
    link = QKDLink.model_validate({"metadata": {"name": "far"},
                                   "spec": {"nodes": ["node-0", "node-9"], "emulated": {"keyRateBps": 1}}})
    with pytest.raises(UnresolvedReference, match="'node-9', which is not a registered QKDNode"):
        await paper.apply(link)


async def test_lowering_a_threshold_below_the_qber_takes_the_link_down(paper):
    session = paper.declared_session("session-4-5")
    link = QKDLink.model_validate({"metadata": {"name": "link-4-5"},
                                   "spec": {"nodes": ["node-4", "node-5"], "qberThreshold": 0.015,
                                            "emulated": {"keyRateBps": 500000, "qber": 0.02}}})
    await paper.apply(link)
    assert paper.topology.links["link-4-5"].state is LinkState.DOWN
    assert paper.monitoring.active_alarms() == [], "a configured QBER is a mistake to fix, not an alarm"
    assert session.route.nodes == ("node-4", "node-0", "node-5")
    await paper.apply(link.model_copy(update={"spec": link.spec.model_copy(update={"qber_threshold": 0.11})}))
    assert paper.topology.links["link-4-5"].state is LinkState.UP, "a link judged by its spec alone comes back"


async def test_destination_may_open_first_and_the_source_joins(paper):
    result = await paper.open_session("node-3", Credentials("sae-3"), endpoint(2), endpoint(3), implicit=False,
                                      session_id=None, qos=QoS(minBps=0))
    assert result.session_id == paper.declared_session("session-2-3").id, "joins the declared session"
    await paper.delete("KeySession", "session-2-3")
    waiting = await paper.open_session("node-3", Credentials("sae-3"), endpoint(2), endpoint(3))
    assert waiting.accepted and not waiting.peer_registered
    assert paper.session(waiting.session_id).user == "user-2-3", "the session belongs to the source's user"
    joined = await paper.open_session("node-2", Credentials("sae-2"), endpoint(2), endpoint(3))
    assert joined.session_id == waiting.session_id and joined.peer_registered
    assert paper.session(joined.session_id).route.nodes == ("node-2", "node-0", "node-3")


@pytest.mark.parametrize(("session_id", "reason", "status"), [
    ("not-a-uuid", "InvalidSessionID", 4),
    ("declared-4-5", "SessionMismatch", 5),
    ("ended", "SessionEnded", 5),
])
async def test_open_with_a_session_id_that_cannot_be_joined(paper, session_id, reason, status):
    if session_id == "declared-4-5":
        session_id = paper.declared_session("session-4-5").id
    elif session_id == "ended":
        opened = await paper.open_session("node-1", Credentials("sae-1"), endpoint(1), endpoint(0), implicit=True)
        await paper.session_closed(opened.session_id, "node-1")
        session_id = opened.session_id
    result = await paper.open_session("node-1", Credentials("sae-1"), endpoint(1), endpoint(0), session_id=session_id)
    assert not result.accepted and result.reason == reason and result.etsi004_status == status


async def test_refused_access_is_recorded_and_creates_nothing(paper):
    before = len(paper.sessions())
    result = await paper.open_session("node-0", Credentials("sae-0"), endpoint(4), endpoint(5))
    assert not result.accepted and result.reason == "NotAnEndpoint" and result.unauthorized
    assert len(paper.sessions()) == before
    (event,) = paper.events.about(result.session_id)
    assert (event.to_state, event.reason) == ("Terminated", "NotAnEndpoint")


async def test_ended_sessions_stay_visible_for_the_retention_only(paper, clock):
    # From node-1 to node-0: the other direction than the declared session-0-1, so a new session.
    opened = await paper.open_session("node-1", Credentials("sae-1"), endpoint(1), endpoint(0), implicit=True)
    assert opened.session_id != paper.declared_session("session-0-1").id
    await paper.session_closed(opened.session_id, "node-0")
    declared = paper.declared_session("session-4-5")
    await paper.session_closed(declared.id, "node-5")
    clock.now += 99
    await paper.tick()
    assert paper.session(opened.session_id) is not None
    clock.now += 2
    await paper.tick()
    assert paper.session(opened.session_id) is None
    assert paper.session(declared.id) is declared, "a declared session stays while its resource exists"


async def test_etsi015_view(paper, clock):
    relayed = paper.declared_session("session-2-3")
    await paper.link_sample(LinkSample("link-0-2", clock.now, key_rate_bps=400_000, qber=0.03))
    await paper.node_down("node-1", "KMUnreachable", "pod lost")
    view = json.loads(json.dumps(paper.etsi015()))
    assert sorted(view) == [f"node-{n}" for n in range(6)]
    hub = view["node-0"][ETSI015_ROOT]
    assert hub["qkdn_status"] == "OPERATING" and view["node-1"][ETSI015_ROOT]["qkdn_status"] == "DOWN"
    links = {link.get("vqkd_name", link.get("vqkd_session")): link for link in hub["qkd_links"]["qkd_link"]}
    physical = links["link-0-2"]
    assert physical["qkdl_type"] == "etsi-qkd-node-types:PHYS" and physical["qkdl_status"] == "ACTIVE"
    assert physical["qkdl_performance"] == {
        "skr": 400_000, "eskr": 400_000 - 1024, "expected_consumption": 1024,
        "phys_perf": [{"perf_type": "QBER", "value": 0.03}],
    }
    virtual = links[relayed.id]
    node_ids = {name: view[name][ETSI015_ROOT]["qkdn_id"] for name in view}
    assert virtual["qkdl_type"] == "etsi-qkd-node-types:VIRT"
    assert (virtual["virt_prev_hop"], virtual["virt_next_hop"]) == (node_ids["node-2"], [node_ids["node-3"]])
    (app,) = view["node-2"][ETSI015_ROOT]["qkd_applications"]["qkd_app"]
    assert app["app_id"] == relayed.id and app["app_status"] == "ON" and app["backing_qkdl_id"] == [virtual["qkdl_id"]]
    assert app["server_app_id"] == "sae-2" and app["client_app_id"] == ["sae-3"]
    assert app["app_qos"]["min_bandwidth"] == 1024
    assert view["node-1"][ETSI015_ROOT]["qkd_applications"]["qkd_app"][0]["app_status"] == "DISCONNECTED"


async def test_views_are_json_ready(paper):
    for rows in (paper.sessions(), paper.links(), paper.nodes(), [e.to_dict() for e in paper.events]):
        json.dumps(rows)
    hub = next(row for row in paper.nodes() if row["name"] == "node-0")
    assert hub["sessions"] == 2 and len(hub["links"]) == 5  # session-0-1 ends there, session-2-3 passes


def test_the_control_core_imports_no_transport():
    for module in sorted((ROOT / "operator" / "control").glob("*.py")):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {name.split(".")[0] for name in imported} & TRANSPORTS, module.name


def test_the_control_core_reads_no_yaml_even_through_its_imports():
    """The declared resources reach the core as a ``Network``; reading manifests is the loader's."""
    check = "import sys, vqkd.operator.control.core; print('yaml' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-P", "-c", check], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"


async def test_a_declared_session_lives_as_long_as_its_resource_however_idle(paper, kms, clock):
    declared = paper.declared_session("session-0-1")
    assert kms.entry("node-0", declared.id).inactivity_timeout_ms == 2**32 - 1
    clock.now += 10 * AdmissionSettings().inactivity_timeout_s
    await paper.tick()
    assert paper.declared_session("session-0-1").state == "Active"
    opened = await paper.open_session("node-0", Credentials(sae_id="sae-0"), endpoint(0), endpoint(1),
                                      session_id=str(uuid.uuid4()))
    clock.now += AdmissionSettings().inactivity_timeout_s + 1
    await paper.tick()
    assert paper.session(opened.session_id).state != "Active"  # opened by an application: it ends unused
