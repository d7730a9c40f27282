"""Changing a running local network: ``vqkd apply`` and ``vqkd delete``, as against a cluster.

The commands send their files' YAML to the ``vqkd up`` process (``POST /apply`` and
``POST /delete`` on its status API, with the token in the state directory that only its
owner can read). It checks them with the loader ``vqkd up`` uses, against the network it
runs: an invalid file changes nothing and is reported as ``vqkd up`` reports it. Like
``kubectl apply``, each resource is created or updated and one applied unchanged is left
alone; like ``kubectl delete``, the resources named go and names the network does not hold
are reported. A valid change then runs in the order that keeps sessions served:

- apply: new module pairs, then new KMs (of new nodes, and new replicas of a node whose
  ``spec.km.replicas`` grew), started and answering (ports and certificates as ``vqkd up``
  allocates them); a module pair whose key rate or QBER changed takes it live, a KM whose
  identity or a module pair whose buffer or device changed is started again → the declared
  network updated → every KM concerned gets its new topology (``host.topologies.refresh``:
  a node's replicas list, and its peers an end per replica) → a node whose replica count
  changed gets its sessions pushed again, each source replica its new share of the rate
  (``host.rescale``) → the resources applied to the control core, so sessions are
  configured over links their KMs already hold → processes no longer needed stopped (the
  replicas beyond a node's new count among them) → ``endpoints.json`` rewritten;
- delete: the resources deleted from the control core (sessions over a deleted link
  rerouted make-before-break or Held, sessions of a deleted user or at a deleted node
  ended, every KM confirming) → the declared network updated → the new topologies pushed
  (the deleted links and SAEs gone from every KM) → once the KM of a deleted node holds no
  session, its process and the module pairs of deleted links stopped → ``endpoints.json``
  rewritten.

One change runs at a time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from vqkd.operator.control.errors import ControlError
from vqkd.operator.host import ControlPlaneHost
from vqkd.operator.local.processes import LocalNetwork, ProcessChanges
from vqkd.operator.plan import PlanError
from vqkd.operator.topologies import instance_name
from vqkd.operator.resources.loader import ManifestError, apply_manifests, delete_manifests, read_manifests
from vqkd.operator.resources.models import Resource
from vqkd.operator.resources.network import Network

log = logging.getLogger(__name__)

TOKEN_FILE = "control.token"  # in the state directory: whoever may read it may change the network
KINDS = ("QKDNode", "QKDLink", "UserProfile", "KeySession")
RELEASE_TIMEOUT_S = 5.0  # how long a deleted node's KM may take to drop its last sessions
CLIENT_TIMEOUT_S = 120.0  # a change starts processes, and the machine may be busy


@dataclass(frozen=True)
class Outcome:
    """What a change did to one resource, as kubectl says it."""

    kind: str
    name: str
    result: str  # created, configured, unchanged, deleted

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.name} {self.result}"


class LiveChanges:
    """Applies and deletes resources in the network a ``LocalControlPlane`` runs.

    ``changing`` is the set of process names the supervisor leaves alone: those being
    started, started again or stopped by a change.
    """

    def __init__(self, network: LocalNetwork, host: ControlPlaneHost, changing: set[str]):
        self.network = network
        self.host = host
        self.core = host.core
        self.changing = changing
        self._lock = asyncio.Lock()
        self.token = secrets.token_urlsafe(32)
        path = network.state_dir / TOKEN_FILE
        path.unlink(missing_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(self.token)

    # --- the changes ---------------------------------------------------------------------

    async def apply(self, manifests: Iterable[tuple[str, str]]) -> list[Outcome]:
        """Create or update the resources of the manifests (source, text)."""
        async with self._lock:
            running = self.network.manifest
            change = apply_manifests(running, manifests)
            outcomes = [Outcome(r.kind, r.name, _applied(running, r)) for r in change.resources]
            changed = [r for r, outcome in zip(change.resources, outcomes) if outcome.result != "unchanged"]
            if not changed:
                return outcomes
            processes = self.network.replan(change.network)
            try:
                await self._start(processes)
            except Exception:
                undo = self.network.replan(running)
                await self._start(undo)  # those started again, with their configuration as it was
                await self._retire(undo.stop)  # those started
                raise
            self._declare(change.network)
            await self.host.topologies.refresh()
            for name in processes.start:  # the new KMs count as serving, so a node's new replica gets its share
                km = self.network.processes[name].km
                if km is not None:
                    await self.host.check(*km)
            await self.host.rescale()
            for resource in changed:
                await self.core.apply(resource)
            await self._retire(processes.stop)
            await asyncio.to_thread(self.network.publish)
            return outcomes

    async def delete(self, manifests: Iterable[tuple[str, str]]) -> tuple[list[Outcome], list[tuple[str, str]]]:
        """Delete the resources the manifests (source, text) name; also the names not found."""
        async with self._lock:
            change = delete_manifests(self.network.manifest, manifests)
            for resource in change.resources:
                await self.core.delete(resource.kind, resource.name)
            if change.resources:
                self._declare(change.network)
                await self.host.topologies.refresh()
                processes = self.network.replan(change.network)
                gone = {r.name for r in change.resources if r.kind == "QKDNode"}
                await asyncio.gather(*(self._released(*proc.km) for proc in self.network.processes.values()
                                       if proc.km is not None and proc.km[0] in gone))
                await self._retire(processes.stop)
                await asyncio.to_thread(self.network.publish)
            return [Outcome(r.kind, r.name, "deleted") for r in change.resources], change.missing

    def _declare(self, network: Network) -> None:
        """Make ``network`` the declared one, in place: the topology pusher reads this object."""
        declared = self.network.manifest
        for kind in KINDS:
            resources = declared.of_kind(kind)
            resources.clear()
            resources.update(network.of_kind(kind))
        declared.origins.clear()
        declared.origins.update(network.origins)

    async def _start(self, changes: ProcessChanges) -> None:
        """Start the new processes (module pairs first), give module pairs their new conditions
        and start again the processes whose configuration changed otherwise."""
        names = changes.start + changes.restart
        self.changing.update(names)
        try:
            if changes.start:
                await asyncio.to_thread(self.network.start_planned, changes.start)
            for name, settings in changes.retune.items():
                await asyncio.to_thread(self.network.retune, name, settings)
            for name in changes.restart:
                log.info("%s: configuration changed; starting it again", name)
                km = self.network.processes[name].km
                if km is not None:
                    self.host.km_lost(*km)
                await asyncio.to_thread(self.network.restart, name, kill=False)
                if km is not None:  # as after a crash: the new instance gets its topology and sessions now
                    await self.host.check(*km)
        finally:
            self.changing.difference_update(names)

    async def _retire(self, names: list[str]) -> None:
        if not names:
            return
        self.changing.update(names)
        try:
            await asyncio.to_thread(self.network.retire, names)
        finally:
            self.changing.difference_update(names)

    async def _released(self, node: str, replica: int) -> None:
        """Until a KM replica of a deleted node holds no session (the core took back every entry)."""
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        name = instance_name(node, replica)
        while True:
            try:
                held = (await self.host.kms.sessions(node, replica)).sessions
            except Exception as e:  # a KM that does not answer holds nothing anyone can use
                log.info("KM %s of deleted node %s does not answer (%s); stopping it", name, node, e)
                return
            if not held:
                return
            if time.monotonic() > deadline:
                log.warning("KM %s of deleted node %s still holds sessions %s after %.0f s; stopping it", name, node,
                            ", ".join(s.config.session_id for s in held), RELEASE_TIMEOUT_S)
                return
            await asyncio.sleep(0.1)

    # --- the HTTP routes -----------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/apply", self._apply_route)
        app.router.add_post("/delete", self._delete_route)

    async def _apply_route(self, request: web.Request) -> web.Response:
        return await self._serve(request, self._applied_reply)

    async def _delete_route(self, request: web.Request) -> web.Response:
        return await self._serve(request, self._deleted_reply)

    async def _applied_reply(self, manifests: list[tuple[str, str]]) -> dict:
        return {"outcomes": [asdict(o) for o in await self.apply(manifests)]}

    async def _deleted_reply(self, manifests: list[tuple[str, str]]) -> dict:
        outcomes, missing = await self.delete(manifests)
        return {"outcomes": [asdict(o) for o in outcomes],
                "missing": [{"kind": kind, "name": name} for kind, name in missing]}

    async def _serve(self, request: web.Request, act) -> web.Response:
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(presented.encode(), self.token.encode()):
            return web.json_response({"message": f"a change needs the token of {self.network.state_dir / TOKEN_FILE}"},
                                     status=401)
        try:
            body = await request.json()
            manifests = [(str(m["source"]), str(m["text"])) for m in body["manifests"]]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"message": 'expected {"manifests": [{"source": ..., "text": ...}, ...]}'},
                                     status=400)
        try:
            return web.json_response(await act(manifests))
        except ManifestError as e:
            return web.json_response({"problems": e.problems}, status=422)
        except PlanError as e:
            return web.json_response({"problems": str(e).splitlines()}, status=422)
        except ControlError as e:
            return web.json_response({"message": str(e)}, status=409)
        except (RuntimeError, TimeoutError) as e:  # a process did not start; the change was undone
            log.exception("the change failed")
            return web.json_response({"message": str(e)}, status=500)


def _applied(running: Network, resource: Resource) -> str:
    held = running.of_kind(resource.kind).get(resource.name)
    if held is None:
        return "created"
    return "unchanged" if held.to_dict() == resource.to_dict() else "configured"


# --- the commands' side -------------------------------------------------------------------


def submit(action: str, files: list[str], state_dir: Path) -> int:
    """``vqkd apply`` / ``vqkd delete``: send the files to the network running in ``state_dir``
    and print what became of each resource, as kubectl does. Non-zero when a name was not found."""
    try:
        manifests = read_manifests(files)
    except ManifestError as e:
        raise SystemExit(f"vqkd {action}: {e}") from None
    endpoints_file, token_file = state_dir / "endpoints.json", state_dir / TOKEN_FILE
    if not endpoints_file.exists():
        raise SystemExit(f"vqkd {action}: no running network in {state_dir} (no endpoints.json); "
                         "start one with vqkd up")
    control = json.loads(endpoints_file.read_text()).get("control")
    if not control or not token_file.exists():
        raise SystemExit(f"vqkd {action}: the network in {state_dir} runs without a control plane to change it")
    request = urllib.request.Request(
        f"{control['status_url']}/{action}", method="POST",
        data=json.dumps({"manifests": [{"source": s, "text": t} for s, t in manifests]}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token_file.read_text().strip()}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as e:
        reply = json.loads(e.read() or b"{}")
        if "problems" in reply:
            raise SystemExit(f"vqkd {action}: invalid resources:\n" + "\n".join(reply["problems"])) from None
        raise SystemExit(f"vqkd {action}: {reply.get('message', e.reason)}") from None
    except OSError as e:
        raise SystemExit(f"vqkd {action}: the network in {state_dir} does not answer at {control['status_url']} "
                         f"({e}); is it still up?") from None
    for outcome in reply["outcomes"]:
        print(Outcome(**outcome))
    for missing in reply.get("missing", []):
        print(f"vqkd {action}: {missing['kind']} {missing['name']} not found", file=sys.stderr)
    return 1 if reply.get("missing") else 0
