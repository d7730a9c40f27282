"""Draws KM events on a timeline in the manner of the paper's Fig. 4 (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

MARKERS = {
    "key request": ("o", "request arrival"),
    "QKD key available": ("s", "QKD key available"),
    "relayed key received": ("^", "relayed key received"),
    "key committed": ("D", "key ready at destination"),
    "key delivered": ("*", "response"),
    "route configured": ("P", "configuration"),
    "user authenticated": ("v", "authentication"),
}
LINE_STYLES = ["-", "--", ":", "-."]


def draw(events: dict[str, list[dict]], start: float, session_names: dict[str, str], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'vqkd[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = sorted(events)
    lane = {node: i for i, node in enumerate(nodes)}
    sessions = sorted({e["session_id"] for evs in events.values() for e in evs})
    style = {sid: LINE_STYLES[i % len(LINE_STYLES)] for i, sid in enumerate(sessions)}
    fig, ax = plt.subplots(figsize=(11, 1 + 0.7 * len(nodes)))
    seen_labels = set()
    for sid in sessions:
        points = sorted((e["at"] - start, lane[node], e["event"]) for node, evs in events.items()
                        for e in evs if e["session_id"] == sid)
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], style[sid], color="grey", linewidth=0.8,
                label=session_names.get(sid, sid[:8]))
        for t, y, name in points:
            marker, label = MARKERS.get(name, (".", name))
            ax.plot(t, y, marker, color=f"C{list(MARKERS).index(name) if name in MARKERS else 9}",
                    label=None if label in seen_labels else label, markersize=7)
            seen_labels.add(label)
    ax.set_yticks(range(len(nodes)), labels=[f"KM {n}" for n in nodes])
    ax.set_xlabel("time since the first request (s)")
    ax.set_title("Key manager events during parallel key requests (cf. Fig. 4 of the paper)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
