"""``vqkd get`` tables read as a person expects: units on rates and key, ISO times, raw JSON."""

from __future__ import annotations

import json

from vqkd.operator.local import status

LINK = {"name": "a-b", "nodes": ["a", "b"], "state": "Up", "keyRateBps": 16384.0, "qber": 0.0123,
        "storedKeyBits": 8388608, "burnedBits": 2048, "reservedBps": 0, "sessions": 2, "reason": ""}


def test_link_table_shows_rates_and_bits_with_units():
    lines = status.table([LINK], status.COLUMNS["links"]).splitlines()
    assert lines[0].split() == ["LINK", "NODES", "STATE", "KEYRATE", "QBER", "STORED", "BURNED", "RESERVED", "SESSIONS",
                                "REASON"]
    row = lines[1]
    assert "16.4 kbit/s" in row and "1.23%" in row and "8.39 Mbit" in row and "2.05 kbit" in row and "0 bit/s" in row
    assert "1.638e+04" not in row and row.rstrip().endswith("-")  # an empty reason is a dash


def test_event_times_are_iso_utc_with_milliseconds():
    event = {"at": 1796115600.25, "subject": "session", "name": "s-1", "from_state": "Accepted",
             "to_state": "Active", "reason": "Routed", "message": "path a -> b"}
    row = status.table([event], status.COLUMNS["events"]).splitlines()[1]
    assert row.startswith("2026-12-01T09:00:00.250Z")


def test_json_output_keeps_raw_numbers(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(status, "fetch", lambda state_dir, what: [LINK])
    assert status.show("links", tmp_path, "json") == 0
    assert json.loads(capsys.readouterr().out) == [LINK]
