"""Loading networks from YAML: the examples, every kind of error message, cross-resource checks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vqkd.operator.resources.loader import ManifestError, load_files, load_text
from vqkd.operator.resources.models import KeySession, QKDLink

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def yaml_docs(*documents: str) -> str:
    return "---\n".join(textwrap.dedent(d).lstrip("\n") for d in documents)


def node(name: str, *saes: str) -> str:
    return f"apiVersion: vqkd.io/v1alpha1\nkind: QKDNode\nmetadata: {{name: {name}}}\nspec: {{saeIds: [{', '.join(saes)}]}}\n"


def link(name: str, a: str, b: str, extra: str = "") -> str:
    return (f"apiVersion: vqkd.io/v1alpha1\nkind: QKDLink\nmetadata: {{name: {name}}}\n"
            f"spec: {{nodes: [{a}, {b}], emulated: {{keyRateBps: 1000{extra}}}}}\n")


def user(name: str, *saes: str) -> str:
    return f"apiVersion: vqkd.io/v1alpha1\nkind: UserProfile\nmetadata: {{name: {name}}}\nspec: {{saeIds: [{', '.join(saes)}]}}\n"


def session(name: str, owner: str, src: tuple[str, str], dst: tuple[str, str]) -> str:
    return (f"apiVersion: vqkd.io/v1alpha1\nkind: KeySession\nmetadata: {{name: {name}}}\n"
            f"spec: {{user: {owner}, source: {{node: {src[0]}, saeId: {src[1]}}}, "
            f"destination: {{node: {dst[0]}, saeId: {dst[1]}}}}}\n")


GOOD = [node("a", "sae-a"), node("b", "sae-b"), link("a-b", "a", "b"), user("u", "sae-a", "sae-b")]


def errors(text: str, source: str = "x.yaml") -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_text(text, source)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- the examples ----------------------------------------------------------------------


def test_two_nodes_example():
    network = load_files([EXAMPLES / "two-nodes.yaml"])
    assert sorted(network.nodes) == ["alice", "bob"]
    assert network.links["alice-bob"].spec.emulated.key_rate_bps == 1_000_000
    assert network.links["alice-bob"].spec.emulated.qber == 0.02
    (owner,) = network.users.values()
    assert sorted(owner.spec.sae_ids) == ["sae-alice-1", "sae-bob-1"]
    assert network.node_of_sae("sae-bob-1") == "bob"
    assert network.namespace == "default"


def test_paper_example_is_the_star_of_section_4():
    network = load_files([str(EXAMPLES / "paper.yaml")])
    assert sorted(network.nodes) == [f"node-{i}" for i in range(6)]
    pairs = sorted(tuple(sorted(link.spec.nodes)) for link in network.links.values())
    assert pairs == [("node-0", f"node-{i}") for i in range(1, 6)] + [("node-4", "node-5")]
    for name, node_ in network.nodes.items():
        assert len(node_.spec.sae_ids) == 1, f"{name} should have exactly one SAE"
    ends = sorted((s.spec.source.node, s.spec.destination.node) for s in network.sessions.values())
    assert ends == [("node-0", "node-1"), ("node-2", "node-3"), ("node-4", "node-5")]
    # 2 -- 3 is the session that needs the trusted node: no direct link exists.
    assert network.link_between("node-2", "node-3") is None
    assert network.link_between("node-5", "node-4").name == "link-4-5"
    for s in network.sessions.values():
        assert network.owner_of_sae(s.spec.source.sae_id) == s.spec.user


def test_devices_example_mixes_two_device_links_and_an_emulated_one():
    network = load_files([EXAMPLES / "devices.yaml"])
    assert sorted(network.nodes) == ["lab-a", "lab-b", "lab-c"]
    devices = {name: link.spec.etsi014 for name, link in network.links.items() if link.spec.etsi014 is not None}
    assert sorted(devices) == ["a-b", "b-c"]
    assert {node: end.secret_ref.name for node, end in devices["a-b"].endpoints.items()} == {
        "lab-a": "qkd-a-b-lab-a", "lab-b": "qkd-a-b-lab-b"}
    emulated = network.links["a-c"].spec.emulated
    assert emulated.device.max_key_size == 1024 and emulated.device.tls12_only


def test_resources_come_out_in_dependency_order_with_their_origin():
    network = load_files([EXAMPLES / "paper.yaml"])
    kinds = [r.kind for r in network.resources()]
    assert kinds == sorted(kinds, key=["QKDNode", "QKDLink", "UserProfile", "KeySession"].index)
    first = next(iter(network.sessions.values()))
    assert isinstance(first, KeySession)
    assert network.origin(first).file.endswith("paper.yaml")
    assert network.origin(network.nodes["node-0"]).document == 1


def test_several_files_and_a_directory(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "1-nodes.yaml").write_text(yaml_docs(GOOD[0], GOOD[1]))
    (tmp_path / "net" / "2-rest.yml").write_text(yaml_docs(*GOOD[2:]))
    (tmp_path / "net" / "notes.txt").write_text("not a manifest")
    (tmp_path / "s.yaml").write_text(session("s", "u", ("a", "sae-a"), ("b", "sae-b")) + "---\n")
    network = load_files([tmp_path / "net", tmp_path / "s.yaml"])
    assert isinstance(network.links["a-b"], QKDLink)
    assert list(network.sessions) == ["s"]


# --- errors in one document ------------------------------------------------------------


def test_field_error_names_file_document_resource_and_field():
    text = yaml_docs(node("n4"), node("n5"), link("star-4-5", "n4", "n5", ", qber: 0.7"))
    assert errors(text, "examples/x.yaml") == [
        "examples/x.yaml: document 3 (QKDLink star-4-5): spec.emulated.qber: "
        "Input should be less than or equal to 0.5 (got 0.7)"
    ]


def test_cross_field_error_points_at_the_field():
    assert errors(yaml_docs(node("n4"), link("star-4-5", "n4", "n4"))) == [
        "x.yaml: document 2 (QKDLink star-4-5): spec.nodes: must name two distinct QKDNodes, got ['n4', 'n4']"
    ]


def test_yaml_syntax_error_gives_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(node("a") + "---\nkind: QKDNode\nmetadata:\n  name: b\n   labels: {}\n")
    with pytest.raises(ManifestError) as caught:
        load_files(["bad.yaml"])
    assert caught.value.problems == [
        "bad.yaml: document 2: line 9, column 10: invalid YAML: mapping values are not allowed here"
    ]


def test_a_key_given_twice_is_an_error_not_a_silent_override():
    text = "apiVersion: vqkd.io/v1alpha1\nkind: QKDNode\nmetadata: {name: a}\nspec:\n  saeIds: [x]\n  saeIds: [y]\n"
    assert errors(text) == [
        "x.yaml: document 1: line 6, column 3: invalid YAML: found key 'saeIds' twice (first on line 5) "
        "(while reading a mapping)"
    ]


def test_documents_that_are_no_resource():
    text = yaml_docs(
        "- just\n- a list\n",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
        "apiVersion: vqkd.io/v1beta1\nkind: QKDNode\nmetadata: {name: a}\n",
        "kind: QKDNode\nmetadata: {name: b}\n",
    )
    assert errors(text) == [
        "x.yaml: document 1: expected a resource (a mapping with apiVersion, kind, metadata and spec), got a list",
        "x.yaml: document 2 (ConfigMap c): unknown kind 'ConfigMap'; expected one of KeySession, QKDLink, QKDNode, "
        "UserProfile",
        "x.yaml: document 3 (QKDNode a): apiVersion: expected 'vqkd.io/v1alpha1', got 'vqkd.io/v1beta1'",
        "x.yaml: document 4 (QKDNode b): apiVersion: expected 'vqkd.io/v1alpha1', got None",
    ]


def test_unreadable_and_empty_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("empty.yaml").write_text("# nothing yet\n---\n")
    Path("dir").mkdir()
    with pytest.raises(ManifestError) as caught:
        load_files(["missing.yaml", "dir"])
    assert caught.value.problems == [
        "dir: directory holds no .yaml or .yml files",
        "missing.yaml: cannot read: No such file or directory",
    ]
    with pytest.raises(ManifestError, match="no resources found"):
        load_files(["empty.yaml"])


def test_all_problems_of_all_files_are_reported_together(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.yaml").write_text(yaml_docs(node("a", "sae-a"), node("B")))
    Path("b.yaml").write_text(yaml_docs(link("a-b", "a", "b", ", qber: -1"), user("u", "sae-a")))
    with pytest.raises(ManifestError) as caught:
        load_files(["a.yaml", "b.yaml"])
    assert [line.split(":")[0] for line in caught.value.problems] == ["a.yaml", "b.yaml"]
    assert "document 2 (QKDNode B): metadata.name" in caught.value.problems[0]
    assert "document 1 (QKDLink a-b): spec.emulated.qber" in caught.value.problems[1]


# --- checks across documents -----------------------------------------------------------


def test_duplicate_names_per_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.yaml").write_text(yaml_docs(*GOOD))
    Path("b.yaml").write_text(yaml_docs(node("x"), node("a")))
    with pytest.raises(ManifestError) as caught:
        load_files(["a.yaml", "b.yaml"])
    assert caught.value.problems == [
        "b.yaml: document 2 (QKDNode a): duplicate QKDNode name; first defined in a.yaml: document 1"
    ]


def test_the_same_name_in_two_kinds_is_fine():
    load_text(yaml_docs(*GOOD, user("a", "sae-x"), node("c", "sae-x")))


def test_one_network_lives_in_one_namespace():
    other = node("c").replace("{name: c}", "{name: c, namespace: lab}")
    assert errors(yaml_docs(*GOOD, other, link("a-c", "a", "c"))) == [
        "x.yaml: document 5 (QKDNode c): metadata.namespace: 'lab' differs from 'default' of x.yaml: document 1; "
        "one network lives in one namespace"
    ]


def test_links_join_existing_nodes_once():
    text = yaml_docs(*GOOD, link("a-c", "a", "c"), link("b-a", "b", "a"))
    assert errors(text) == [
        "x.yaml: document 5 (QKDLink a-c): spec.nodes[1]: no QKDNode named 'c'; known: a, b",
        "x.yaml: document 6 (QKDLink b-a): spec.nodes: QKDNodes a and b are already joined by QKDLink a-b "
        "(x.yaml: document 3); expected at most one link per node pair",
    ]


def test_an_sae_is_attached_to_exactly_one_node_and_owned_by_one_user():
    text = yaml_docs(*GOOD, node("c", "sae-c", "sae-a"), user("v", "sae-c", "sae-b", "sae-z"))
    assert errors(text) == [
        "x.yaml: document 5 (QKDNode c): spec.saeIds[1]: SAE 'sae-a' is already attached to QKDNode a "
        "(x.yaml: document 1); an SAE is attached to exactly one node",
        "x.yaml: document 6 (UserProfile v): spec.saeIds[1]: SAE 'sae-b' is already owned by UserProfile u "
        "(x.yaml: document 4); an SAE belongs to exactly one user",
        "x.yaml: document 6 (UserProfile v): spec.saeIds[2]: SAE 'sae-z' is not attached to any QKDNode; "
        "list it in the spec.saeIds of its node",
    ]


def test_allowed_nodes_exist():
    restricted = user("u", "sae-a", "sae-b").replace("}\n", ", sla: {allowedNodes: [a, q]}}\n")
    assert errors(yaml_docs(*GOOD[:3], restricted)) == [
        "x.yaml: document 4 (UserProfile u): spec.sla.allowedNodes[1]: no QKDNode named 'q'; known: a, b"
    ]


def test_session_references():
    text = yaml_docs(
        *GOOD, node("c", "sae-c"), user("w", "sae-c"),
        session("ok", "u", ("a", "sae-a"), ("b", "sae-b")),
        session("no-user", "nobody", ("a", "sae-a"), ("b", "sae-b")),
        session("not-owned", "w", ("a", "sae-a"), ("c", "sae-c")),
        session("wrong-node", "u", ("b", "sae-a"), ("c", "sae-b")),
        session("no-node", "u", ("a", "sae-a"), ("z", "sae-b")),
        session("no-sae", "u", ("a", "sae-a"), ("b", "sae-q")),
    )
    assert errors(text) == [
        "x.yaml: document 8 (KeySession no-user): spec.user: no UserProfile named 'nobody'; known: u, w",
        "x.yaml: document 9 (KeySession not-owned): spec.source.saeId: SAE 'sae-a' is not owned by "
        "UserProfile w, which owns sae-c",
        "x.yaml: document 10 (KeySession wrong-node): spec.source.saeId: SAE 'sae-a' is attached to QKDNode a, not b",
        "x.yaml: document 10 (KeySession wrong-node): spec.destination.saeId: SAE 'sae-b' is attached to "
        "QKDNode b, not c",
        "x.yaml: document 11 (KeySession no-node): spec.destination.node: no QKDNode named 'z'; known: a, b, c",
        "x.yaml: document 12 (KeySession no-sae): spec.destination.saeId: SAE 'sae-q' is not attached to any QKDNode",
    ]


def test_an_invalid_document_is_reported_once_not_again_as_a_dangling_reference():
    broken_node = node("b", "sae-b").replace("saeIds", "saeIDs")
    text = yaml_docs(GOOD[0], broken_node, *GOOD[2:], session("s", "u", ("a", "sae-a"), ("b", "sae-b")))
    assert errors(text) == [
        "x.yaml: document 2 (QKDNode b): spec.saeIDs: unknown field; expected one of km, kmeId, saeIds"
    ]
