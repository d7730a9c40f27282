"""``vqkd get``: the state of a running local network, as a table for people or JSON for machines.

Tables show rates and amounts of key with units (``16.4 kbit/s``, ``8.39 Mbit``), QBER in per
cent and instants as ISO 8601 UTC times; ``-o json`` keeps the raw numbers of the views.
"""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

# A column: its title, the key in the view's JSON and how a person reads the value.
COLUMNS = {
    "sessions": [("KEYSESSION", "keySession", "text"), ("SESSION", "sessionId", "text"), ("SOURCE", "source", "text"),
                 ("DESTINATION", "destination", "text"), ("PHASE", "phase", "text"), ("STATE", "state", "text"),
                 ("PATH", "path", "text"), ("RATE", "rateBps", "rate"), ("RESERVED", "reservedBps", "rate"),
                 ("REQUESTS", "keyRequests", "text"), ("KEYS", "keysDelivered", "text"), ("REASON", "reason", "text")],
    "links": [("LINK", "name", "text"), ("NODES", "nodes", "text"), ("STATE", "state", "text"),
              ("KEYRATE", "keyRateBps", "rate"), ("QBER", "qber", "percent"), ("STORED", "storedKeyBits", "bits"),
              ("BURNED", "burnedBits", "bits"), ("RESERVED", "reservedBps", "rate"), ("SESSIONS", "sessions", "text"), ("REASON", "reason", "text")],
    "nodes": [("NODE", "name", "text"), ("STATUS", "status", "text"), ("READY", "ready", "text"), ("SAES", "saeIds", "text"),
              ("LINKS", "links", "text"), ("SESSIONS", "sessions", "text"), ("REASON", "reason", "text")],
    "users": [("USER", "name", "text"), ("ENABLED", "enabled", "text"), ("SAES", "saeIds", "text"),
              ("PRIORITY", "priority", "text"), ("SESSIONS", "sessions", "text"), ("MAX", "maxSessions", "text"),
              ("RESERVED", "reservedBps", "rate"), ("MAXRATE", "maxKeyRateBps", "rate"),
              ("KEYS", "keysDelivered", "text")],
    "alarms": [("RAISED", "raised_at", "time"), ("LINK", "link", "text"), ("KIND", "kind", "text"),
               ("QBER", "qber", "percent"), ("MESSAGE", "message", "text")],
    "events": [("AT", "at", "time"), ("SUBJECT", "subject", "text"), ("NAME", "name", "text"),
               ("FROM", "from_state", "text"), ("TO", "to_state", "text"), ("REASON", "reason", "text"),
               ("MESSAGE", "message", "text")],
}
PATHS = {"etsi015": "/restconf/data/etsi-qkd-sdn-node:qkd_node"}


_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def _si(value: float, unit: str) -> str:
    """``16384`` bit/s reads ``16.4 kbit/s``: three significant digits and an SI prefix."""
    for scale, prefix in _SI:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _time(epoch_s: float) -> str:
    """An instant as ISO 8601 UTC, to the millisecond (events are often closer than a second)."""
    moment = datetime.fromtimestamp(epoch_s, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


FORMATS = {
    "rate": lambda v: _si(v, "bit/s"),
    "bits": lambda v: _si(v, "bit"),
    "percent": lambda v: f"{100 * v:.2f}%",
    "time": _time,
}


def _cell(value, form: str) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    if form in FORMATS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return FORMATS[form](value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    cells = [[title for title, _, _ in columns]] + [[_cell(row.get(key), form) for _, key, form in columns]
                                                   for row in rows]
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
