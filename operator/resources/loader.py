"""Reading a network from YAML manifests: the input of the local runtime (``vqkd up FILES…``).

The same documents can be applied to a cluster with ``kubectl apply -f``. Loading checks
each document against the resource models and then the references between documents that
no single document can check (an API server checks neither): every problem found is
reported at once, each naming file, document, resource and field.

A running network changes the way a cluster does (``vqkd apply`` / ``vqkd delete``):
``apply_manifests`` creates or updates the resources of some manifests on top of the
network's, ``delete_manifests`` takes them away. Both check what the network would become
with the same checks, so it stays one ``vqkd up`` would accept, and refuse what an API
server refuses: a change to an immutable field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from vqkd.operator.resources.models import (
    InvalidResource,
    QKDLink,
    QKDNode,
    Resource,
    UserProfile,
    parse,
)
from vqkd.operator.resources.network import Network, Origin

MANIFEST_SUFFIXES = (".yaml", ".yml")
# The CEL rule that makes a field immutable (``models._IMMUTABLE``); its message says what to do.
IMMUTABLE_RULE = "self == oldSelf"


class ManifestError(Exception):
    """Everything wrong with a set of manifests, one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(self.problems)


def load_files(paths: Iterable[str | os.PathLike]) -> Network:
    """Load and check manifests; a directory stands for its *.yaml and *.yml files, sorted.

    Raises ManifestError listing every problem found in all files.
    """
    loader = _Loader()
    for source, text in _texts(paths, loader.problems):
        loader.read(text, source)
    return loader.network()


def read_manifests(paths: Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """The text of each manifest file as (file name, text), a directory standing for its
    *.yaml and *.yml files, sorted: what ``vqkd apply`` and ``vqkd delete`` send.

    Raises ManifestError naming every file that cannot be read.
    """
    problems: list[str] = []
    manifests = list(_texts(paths, problems))
    if problems:
        raise ManifestError(problems)
    return manifests


def _texts(paths: Iterable[str | os.PathLike], problems: list[str]) -> Iterator[tuple[str, str]]:
    for path in _expand(paths, problems):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            problems.append(f"{path}: cannot read: {reason}")
            continue
        yield str(path), text


def load_text(text: str, source: str = "<text>") -> Network:
    """Load and check manifests given as text; ``source`` names them in messages."""
    loader = _Loader()
    loader.read(text, source)
    return loader.network()


@dataclass(frozen=True)
class Change:
    """What ``apply_manifests`` or ``delete_manifests`` found: the resources concerned, in the
    order to act on them, and the network they leave."""

    resources: list[Resource]
    network: Network
    missing: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) named but not in the network


def apply_manifests(running: Network, manifests: Iterable[tuple[str, str]]) -> Change:
    """``kubectl apply``: the resources of the manifests (source, text) created in or updated over
    ``running``; those referred to come first. ``running`` itself is left as it is.

    Raises ManifestError listing every problem, as ``load_files`` reports them, of the
    documents and of the network with them applied, and every immutable field they change.
    """
    loader = _read(manifests)
    declared = loader.collect(running.namespace, "the running network")
    result = _copy(running)
    for resource in declared.resources():
        result.of_kind(resource.kind)[resource.name] = resource
        result.origins[resource.kind, resource.name] = declared.origin(resource)
    problems = loader.problems
    if not loader.loaded and not problems:
        problems.append(_NOTHING_FOUND)
    for resource in declared.resources():
        held = running.of_kind(resource.kind).get(resource.name)
        if held is not None:
            problems.extend(_immutable_changes(held, resource, declared.origin(resource)))
    problems.extend(_Checker(result, loader.broken).problems())
    if problems:
        raise ManifestError(problems)
    return Change(list(declared.resources()), result)


def delete_manifests(running: Network, manifests: Iterable[tuple[str, str]]) -> Change:
    """``kubectl delete``: the resources the manifests (source, text) name, taken out of
    ``running``; those referring to others come first. Names ``running`` does not hold are
    reported in ``missing``. ``running`` itself is left as it is.

    Raises ManifestError listing every problem of the documents, or, when they are valid,
    every reference the resources left would make to a deleted one.
    """
    loader = _read(manifests)
    declared = loader.collect(running.namespace, "the running network")
    if not loader.loaded and not loader.problems:
        loader.problems.append(_NOTHING_FOUND)
    if loader.problems:
        raise ManifestError(loader.problems)
    result = _copy(running)
    deleted, missing = [], []
    for resource in reversed(list(declared.resources())):
        held = result.of_kind(resource.kind).pop(resource.name, None)
        if held is None:
            missing.append((resource.kind, resource.name))
            continue
        del result.origins[resource.kind, resource.name]
        deleted.append(held)
    problems = _Checker(result, set()).problems()
    if problems:
        raise ManifestError([
            f"deleting {', '.join(f'{r.kind} {r.name}' for r in reversed(deleted))} would leave resources that refer "
            "to them; delete those in the same command, or change them first:", *problems,
        ])
    return Change(deleted, result, missing)


_NOTHING_FOUND = "no resources found: expected QKDNode, QKDLink, UserProfile and KeySession documents"


def _read(manifests: Iterable[tuple[str, str]]) -> _Loader:
    loader = _Loader()
    for source, text in manifests:
        loader.read(text, source)
    return loader


def _copy(network: Network) -> Network:
    return replace(network, nodes=dict(network.nodes), links=dict(network.links), users=dict(network.users),
                   sessions=dict(network.sessions), origins=dict(network.origins))


def _immutable_changes(held: Resource, applied: Resource, origin: Origin) -> list[str]:
    """What an API server refuses of an update: a change to a field its CRD marks immutable."""
    problems = []
    for name, info in type(applied.spec).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        rule = next((r for r in extra.get("x-kubernetes-validations", ()) if r["rule"] == IMMUTABLE_RULE), None)
        before, after = getattr(held.spec, name), getattr(applied.spec, name)
        if rule is not None and before != after:
            problems.append(f"{origin} ({applied.kind} {applied.name}): spec.{info.alias or name}: {rule['message']} "
                            f"(running: {_wire(before)}, applied: {_wire(after)})")
    return problems


def _wire(value: object) -> str:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
    return json.dumps(value)


def _expand(paths: Iterable[str | os.PathLike], problems: list[str]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file())
            if not found:
                problems.append(f"{path}: directory holds no {' or '.join(MANIFEST_SUFFIXES)} files")
            files.extend(found)
        else:
            files.append(path)
    return files


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping: PyYAML would silently keep
    the last value, and a manifest would then mean something other than it reads."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found key {key!r} twice (first on line {seen[key].line + 1})", key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


class _Loader:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.loaded: list[tuple[Resource, Origin]] = []
        # Resources whose documents were invalid: references to them are not reported
        # again as dangling, the document's own problem already says what to fix.
        self.broken: set[tuple[str, str]] = set()

    def read(self, text: str, source: str) -> None:
        number = 0
        try:
            for number, document in enumerate(yaml.load_all(text, Loader=_StrictLoader), start=1):
                if document is not None:  # an empty document, e.g. after a trailing ---
                    self._add(document, Origin(source, number))
        except yaml.YAMLError as error:
            self.problems.append(f"{Origin(source, number + 1)}: {_yaml_problem(error)}")

    def _add(self, document: object, origin: Origin) -> None:
        try:
            resource = parse(document)
        except InvalidResource as error:
            where = f"{origin} ({error.label})" if error.label else str(origin)
            self.problems.extend(f"{where}: {problem}" for problem in error.problems)
            if error.kind and error.name:
                self.broken.add((error.kind, error.name))
            return
        self.loaded.append((resource, origin))

    def collect(self, namespace: str | None = None, namespace_of: str | None = None) -> Network:
        """The resources loaded, each name once per kind, all in one namespace: ``namespace``
        (that of ``namespace_of``) when given, else the first resource's."""
        network = Network()
        if namespace is not None:
            network.namespace = namespace
        elif self.loaded:
            network.namespace = self.loaded[0][0].namespace
            namespace_of = str(self.loaded[0][1])
        for resource, origin in self.loaded:
            where = f"{origin} ({resource.kind} {resource.name})"
            key = (resource.kind, resource.name)
            if key in network.origins:
                first = network.origins[key]
                self.problems.append(f"{where}: duplicate {resource.kind} name; first defined in {first}")
                continue
            if resource.namespace != network.namespace:
                self.problems.append(
                    f"{where}: metadata.namespace: {resource.namespace!r} differs from {network.namespace!r} "
                    f"of {namespace_of}; one network lives in one namespace"
                )
                self.broken.add(key)
                continue
            network.origins[key] = origin
            network.of_kind(resource.kind)[resource.name] = resource
        return network

    def network(self) -> Network:
        network = self.collect()
        problems = self.problems
        if not self.loaded and not problems:
            problems.append(_NOTHING_FOUND)
        problems.extend(_Checker(network, self.broken).problems())
        if problems:
            raise ManifestError(problems)
        return network


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    detail = f"{problem} ({context})" if context else problem
    if mark is None:
        return f"invalid YAML: {detail}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {detail}"


class _Checker:
    """References between resources: the checks no single document can make."""

    def __init__(self, network: Network, broken: set[tuple[str, str]]):
        self.network = network
        self.broken = broken
        self.found: list[str] = []

    def problems(self) -> list[str]:
        self._nodes()
        self._links()
        self._users()
        self._sessions()
        return self.found

    def _report(self, resource: Resource, path: str, message: str) -> None:
        origin = self.network.origin(resource)
        self.found.append(f"{origin} ({resource.kind} {resource.name}): {path}: {message}")

    def _missing(self, kind: str, name: str) -> bool:
        """True (and worth reporting) when no valid or invalid resource of that name exists."""
        return name not in self.network.of_kind(kind) and (kind, name) not in self.broken

    def _known(self, kind: str) -> str:
        names = sorted(self.network.of_kind(kind))
        shown = ", ".join(names[:10]) + (", …" if len(names) > 10 else "")
        return f"known: {shown}" if names else f"no {kind} is defined"

    @property
    def _some_node_broken(self) -> bool:
        # An invalid QKDNode document may be the one attaching an SAE; claiming the SAE is
        # attached nowhere would send the reader after the wrong problem.
        return any(kind == "QKDNode" for kind, _ in self.broken)

    def _nodes(self) -> None:
        attached: dict[str, QKDNode] = {}
        for node in self.network.nodes.values():
            for index, sae in enumerate(node.spec.sae_ids):
                first = attached.setdefault(sae, node)
                if first is not node:
                    self._report(
                        node, f"spec.saeIds[{index}]",
                        f"SAE {sae!r} is already attached to QKDNode {first.name} ({self.network.origin(first)}); "
                        "an SAE is attached to exactly one node",
                    )

    def _links(self) -> None:
        joined: dict[tuple[str, str], QKDLink] = {}
        for link in self.network.links.values():
            for index, node in enumerate(link.spec.nodes):
                if self._missing("QKDNode", node):
                    self._report(link, f"spec.nodes[{index}]", f"no QKDNode named {node!r}; {self._known('QKDNode')}")
            pair = tuple(sorted(link.spec.nodes))
            first = joined.setdefault(pair, link)
            if first is not link:
                self._report(
                    link, "spec.nodes",
                    f"QKDNodes {pair[0]} and {pair[1]} are already joined by QKDLink {first.name} "
                    f"({self.network.origin(first)}); expected at most one link per node pair",
                )

    def _users(self) -> None:
        owned: dict[str, UserProfile] = {}
        for user in self.network.users.values():
            for index, sae in enumerate(user.spec.sae_ids):
                first = owned.setdefault(sae, user)
                if first is not user:
                    self._report(
                        user, f"spec.saeIds[{index}]",
                        f"SAE {sae!r} is already owned by UserProfile {first.name} ({self.network.origin(first)}); "
                        "an SAE belongs to exactly one user",
                    )
                elif self.network.node_of_sae(sae) is None and not self._some_node_broken:
                    self._report(
                        user, f"spec.saeIds[{index}]",
                        f"SAE {sae!r} is not attached to any QKDNode; list it in the spec.saeIds of its node",
                    )
            for index, node in enumerate(user.spec.sla.allowed_nodes):
                if self._missing("QKDNode", node):
                    self._report(
                        user, f"spec.sla.allowedNodes[{index}]", f"no QKDNode named {node!r}; {self._known('QKDNode')}"
                    )

    def _sessions(self) -> None:
        for session in self.network.sessions.values():
            spec = session.spec
            user = self.network.users.get(spec.user)
            if self._missing("UserProfile", spec.user):
                self._report(session, "spec.user", f"no UserProfile named {spec.user!r}; {self._known('UserProfile')}")
            if user is not None and spec.source.sae_id not in user.spec.sae_ids:
                self._report(
                    session, "spec.source.saeId",
                    f"SAE {spec.source.sae_id!r} is not owned by UserProfile {user.name}, "
                    f"which owns {', '.join(user.spec.sae_ids)}",
                )
            for end, endpoint in (("source", spec.source), ("destination", spec.destination)):
                if self._missing("QKDNode", endpoint.node):
                    self._report(
                        session, f"spec.{end}.node", f"no QKDNode named {endpoint.node!r}; {self._known('QKDNode')}"
                    )
                    continue
                attached_to = self.network.node_of_sae(endpoint.sae_id)
                if attached_to is None and not self._some_node_broken:
                    self._report(session, f"spec.{end}.saeId", f"SAE {endpoint.sae_id!r} is not attached to any QKDNode")
                elif attached_to is not None and attached_to != endpoint.node:
                    self._report(
                        session, f"spec.{end}.saeId",
                        f"SAE {endpoint.sae_id!r} is attached to QKDNode {attached_to}, not {endpoint.node}",
                    )
