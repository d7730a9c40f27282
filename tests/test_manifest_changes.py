"""Manifests applied to and deleted from a running network (``vqkd apply`` / ``vqkd delete``):
checked as ``vqkd up`` checks them, against what the network would become."""

from __future__ import annotations

from pathlib import Path

import pytest

from vqkd.operator.resources.loader import (
    ManifestError,
    apply_manifests,
    delete_manifests,
    load_files,
    read_manifests,
)

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "examples" / "paper.yaml"

NODE_6 = """
apiVersion: vqkd.io/v1alpha1
kind: QKDNode
metadata: {name: node-6}
spec: {saeIds: [sae-6]}
---
apiVersion: vqkd.io/v1alpha1
kind: QKDLink
metadata: {name: link-0-6}
spec:
  nodes: [node-0, node-6]
  emulated: {keyRateBps: 500000, qber: 0.02}
---
apiVersion: vqkd.io/v1alpha1
kind: KeySession
metadata: {name: session-0-6}
spec:
  user: user-6
  source: {node: node-6, saeId: sae-6}
  destination: {node: node-0, saeId: sae-0}
---
apiVersion: vqkd.io/v1alpha1
kind: UserProfile
metadata: {name: user-6}
spec: {saeIds: [sae-6]}
"""


@pytest.fixture
def running():
    return load_files([PAPER])


def names(resources) -> list[str]:
    return [f"{r.kind}/{r.name}" for r in resources]


def problems(error: pytest.ExceptionInfo) -> str:
    return "\n".join(error.value.problems)


def test_applied_resources_come_referred_to_first_and_join_the_running_ones(running):
    change = apply_manifests(running, [("node-6.yaml", NODE_6)])
    assert names(change.resources) == ["QKDNode/node-6", "QKDLink/link-0-6", "UserProfile/user-6",
                                       "KeySession/session-0-6"]
    assert set(change.network.nodes) == {f"node-{n}" for n in range(7)} and "link-0-6" in change.network.links
    assert str(change.network.origin(change.network.links["link-0-6"])) == "node-6.yaml: document 2"
    assert "node-6" not in running.nodes, "the running network is left as it is"


def test_an_update_replaces_the_running_resource(running):
    text = PAPER.read_text().replace("saeIds: [sae-5]", "saeIds: [sae-5, sae-5b]")
    change = apply_manifests(running, [("paper.yaml", text)])
    assert change.network.nodes["node-5"].spec.sae_ids == ["sae-5", "sae-5b"]
    assert len(change.resources) == len(list(running.resources()))


@pytest.mark.parametrize(("text", "message"), [
    (NODE_6.replace("qber: 0.02", "qber: 0.7"),
     "new.yaml: document 2 (QKDLink link-0-6): spec.emulated.qber: Input should be less than or equal to 0.5"),
    (NODE_6.replace("[node-0, node-6]", "[node-0, node-9]"),
     "new.yaml: document 2 (QKDLink link-0-6): spec.nodes[1]: no QKDNode named 'node-9'; known: node-0, node-1"),
    (NODE_6.replace("saeIds: [sae-6]}", "saeIds: [sae-5]}", 1),
     "new.yaml: document 1 (QKDNode node-6): spec.saeIds[0]: SAE 'sae-5' is already attached to QKDNode node-5"),
    (NODE_6 + "---\n" + NODE_6.split("---")[0],
     "new.yaml: document 5 (QKDNode node-6): duplicate QKDNode name; first defined in new.yaml: document 1"),
    (NODE_6.replace("metadata: {name: node-6}", "metadata: {name: node-6, namespace: lab}"),
     "new.yaml: document 1 (QKDNode node-6): metadata.namespace: 'lab' differs from 'default' of the running "
     "network; one network lives in one namespace"),
    ("", "no resources found"),
])
def test_an_invalid_change_is_reported_as_vqkd_up_reports_it(running, text, message):
    with pytest.raises(ManifestError) as refused:
        apply_manifests(running, [("new.yaml", text)])
    assert message in problems(refused)


def test_a_change_to_an_immutable_field_is_refused_as_the_api_server_refuses_it(running):
    text = PAPER.read_text().replace("nodes: [node-4, node-5]", "nodes: [node-5, node-4]")
    text = text.replace("source: {node: node-4, saeId: sae-4}", "source: {node: node-5, saeId: sae-5}")
    text = text.replace("destination: {node: node-5, saeId: sae-5}", "destination: {node: node-4, saeId: sae-4}")
    with pytest.raises(ManifestError) as refused:
        apply_manifests(running, [("paper.yaml", text)])
    assert problems(refused).splitlines() == [
        'paper.yaml: document 12 (QKDLink link-4-5): spec.nodes: is immutable; delete and re-create the resource '
        'instead (running: ["node-4", "node-5"], applied: ["node-5", "node-4"])',
        'paper.yaml: document 18 (KeySession session-4-5): spec.source: is immutable; delete and re-create the '
        'resource instead (running: {"node": "node-4", "saeId": "sae-4"}, applied: {"node": "node-5", '
        '"saeId": "sae-5"})',
        'paper.yaml: document 18 (KeySession session-4-5): spec.destination: is immutable; delete and re-create the '
        'resource instead (running: {"node": "node-5", "saeId": "sae-5"}, applied: {"node": "node-4", '
        '"saeId": "sae-4"})',
    ]


def test_deleted_resources_come_referring_first_and_unknown_names_are_reported(running):
    grown = apply_manifests(running, [("node-6.yaml", NODE_6)]).network
    gone = NODE_6 + "---\napiVersion: vqkd.io/v1alpha1\nkind: QKDNode\nmetadata: {name: node-9}\n"
    change = delete_manifests(grown, [("node-6.yaml", gone)])
    assert names(change.resources) == ["KeySession/session-0-6", "UserProfile/user-6", "QKDLink/link-0-6",
                                       "QKDNode/node-6"]
    assert change.missing == [("QKDNode", "node-9")]
    assert set(change.network.nodes) == set(running.nodes) and "link-0-6" not in change.network.links
    assert "node-6" in grown.nodes, "the running network is left as it is"


def test_a_deletion_leaving_references_to_what_it_deletes_is_refused(running):
    grown = apply_manifests(running, [("node-6.yaml", NODE_6)]).network
    with pytest.raises(ManifestError) as refused:
        delete_manifests(grown, [("only-the-node.yaml", NODE_6.split("---")[0])])
    lines = problems(refused).splitlines()
    assert lines[0] == ("deleting QKDNode node-6 would leave resources that refer to them; delete those in the same "
                        "command, or change them first:")
    assert "node-6.yaml: document 2 (QKDLink link-0-6): spec.nodes[1]: no QKDNode named 'node-6'" in lines[1]
    with pytest.raises(ManifestError, match="spec.emulated.qber"):
        delete_manifests(grown, [("bad.yaml", NODE_6.replace("qber: 0.02", "qber: 0.7"))])


def test_files_that_cannot_be_read_are_all_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError) as refused:
        read_manifests([tmp_path / "missing.yaml", tmp_path / "empty"])
    assert problems(refused).splitlines() == [f"{tmp_path / 'empty'}: directory holds no .yaml or .yml files",
                                              f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"]
    (tmp_path / "empty" / "a.yaml").write_text("x: 1")
    assert read_manifests([tmp_path / "empty"]) == [(str(tmp_path / "empty" / "a.yaml"), "x: 1")]
