"""The KM session cycle (paper Fig. 2a) as a KM's session table runs it, without any transport."""

from __future__ import annotations

import pytest

from vqkd.km.domain.sessions import ALLOWED, SessionConfig, SessionTable, State
from vqkd.km.domain.vocabulary import Endpoint, Role

SOURCE, DESTINATION = Endpoint("a", "sae-a"), Endpoint("b", "sae-b")


def config(session_id: str = "s-1", version: int = 1) -> SessionConfig:
    return SessionConfig(
        session_id=session_id, version=version, role=Role.SOURCE, user="lab", source=SOURCE,
        destination=DESTINATION, prev_hop="", next_hop="b", priority=1, rate_bps=1e6, bucket_bits=1 << 20,
        inactivity_timeout_s=60, request_timeout_s=1, key_chunk_size=32, ttl_s=3600, fallback="",
    )


def states(table: SessionTable, session_id: str) -> list[State]:
    return [e.state for e in table.events if e.session_id == session_id]


def test_an_opened_session_runs_the_cycle_of_fig_2a():
    table = SessionTable("a")
    session = table.open("s-1", SOURCE, DESTINATION)
    table.configure(config())
    table.key_exchange_started(session)
    table.key_exchange_started(session)  # a second request while the first is in flight
    table.key_exchange_done(session, 1, 256)
    assert session.state is State.KEY_EXCHANGING
    table.key_exchange_done(session, 1, 256)
    table.terminate("s-1", "close request")
    assert states(table, "s-1") == [
        State.AUTHENTICATING, State.USER_ACCEPTED, State.OPERATIVE, State.KEY_EXCHANGING, State.KEY_EXCHANGING,
        State.OPERATIVE, State.TERMINATED,
    ]


def test_a_session_the_control_plane_declares_needs_no_open():
    table = SessionTable("a")
    session = table.configure(config())
    assert session.state is State.OPERATIVE
    assert states(table, "s-1") == [State.OPERATIVE]


def test_every_recorded_change_is_in_the_table():
    table = SessionTable("a")
    session = table.open("s-1", SOURCE, DESTINATION)
    table.configure(config())
    table.configure(config(version=2))  # a re-push changes no state
    table.key_exchange_started(session)
    table.note(session, "QKD key available")
    table.key_exchange_done(session, 0, 0, detail="no key")
    table.terminate("s-1", "inactivity timer expired")
    seen = states(table, "s-1")
    assert all(to in ALLOWED[before] or to is before for before, to in zip(seen, seen[1:]))
    assert seen[-1] is State.TERMINATED


def test_a_terminated_session_takes_no_further_key_request():
    table = SessionTable("a")
    session = table.configure(config())
    table.terminate("s-1", "deletion signal")
    with pytest.raises(RuntimeError, match="no transition Terminated -> KeyExchanging"):
        table.key_exchange_started(session)
