"""``vqkd get``: the state of a running local network, as a table or JSON."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

COLUMNS = {
    "sessions": [("KEYSESSION", "keySession"), ("SESSION", "sessionId"), ("SOURCE", "source"),
                 ("DESTINATION", "destination"), ("PHASE", "phase"), ("STATE", "state"), ("PATH", "path"),
                 ("RATE", "rateBps"), ("RESERVED", "reservedBps"), ("REQUESTS", "keyRequests"), ("KEYS", "keysDelivered"),
                 ("REASON", "reason")],
    "links": [("LINK", "name"), ("NODES", "nodes"), ("STATE", "state"), ("KEYRATE", "keyRateBps"), ("QBER", "qber"),
              ("STORED", "storedKeyBits"), ("RESERVED", "reservedBps"), ("SESSIONS", "sessions"), ("REASON", "reason")],
    "nodes": [("NODE", "name"), ("STATUS", "status"), ("SAES", "saeIds"), ("LINKS", "links"),
              ("SESSIONS", "sessions"), ("REASON", "reason")],
    "users": [("USER", "name"), ("ENABLED", "enabled"), ("SAES", "saeIds"), ("PRIORITY", "priority"),
              ("SESSIONS", "sessions"), ("MAX", "maxSessions"), ("RESERVED", "reservedBps"),
              ("MAXRATE", "maxKeyRateBps"), ("KEYS", "keysDelivered")],
    "alarms": [("RAISED", "raised_at"), ("LINK", "link"), ("KIND", "kind"), ("QBER", "qber"), ("MESSAGE", "message")],
    "events": [("AT", "at"), ("SUBJECT", "subject"), ("NAME", "name"), ("FROM", "from_state"), ("TO", "to_state"),
               ("REASON", "reason"), ("MESSAGE", "message")],
}
PATHS = {"etsi015": "/restconf/data/etsi-qkd-sdn-node:qkd_node"}


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    cells = [[title for title, _ in columns]] + [[_cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def fetch(state_dir: Path, what: str):
    endpoints_file = state_dir / "endpoints.json"
    if not endpoints_file.exists():
        raise SystemExit(f"vqkd get: no running network in {state_dir} (no endpoints.json); start one with vqkd up")
    control = json.loads(endpoints_file.read_text()).get("control")
    if not control:
        raise SystemExit(f"vqkd get: the network in {state_dir} runs without a control plane")
    url = control["status_url"] + PATHS.get(what, f"/{what}")
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except OSError as e:
        raise SystemExit(f"vqkd get: the network in {state_dir} does not answer at {url} ({e}); is it still up?")


def show(what: str, state_dir: Path, output: str) -> int:
    data = fetch(state_dir, what)
    if output == "json" or what not in COLUMNS:
        print(json.dumps(data, indent=2))
    else:
        print(table(data, COLUMNS[what]))
    return 0
