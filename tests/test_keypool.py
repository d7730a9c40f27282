"""Link key pools: each byte of shared material is used once, by the side that owns it."""

import pytest

from vqkd.km.domain.errors import InsufficientKey
from vqkd.km.domain.keypool import IncomingPool, OutgoingPool, Span, SpanError

BLOCKS = [("b1", bytes(range(16))), ("b2", bytes(range(16, 32)))]


def pools():
    out, inc = OutgoingPool(), IncomingPool()
    out.add(BLOCKS)
    inc.add(BLOCKS)
    return out, inc


def test_outgoing_spans_name_the_same_bytes_at_the_peer():
    out, inc = pools()
    first, spans1 = out.take(10)
    second, spans2 = out.take(12)  # crosses from b1 into b2
    assert spans2 == [Span("b1", 10, 6), Span("b2", 0, 6)]
    assert inc.consume(spans2) == second and inc.consume(spans1) == first  # any order
    assert first + second == bytes(range(22))
    assert out.available_bits == inc.available_bits == 10 * 8


def test_take_is_all_or_nothing():
    out, _ = pools()
    with pytest.raises(InsufficientKey, match="264 bits requested, 256 available"):
        out.take(33)
    assert out.available_bits == 256
    assert out.take(32)[0] == bytes(range(32))
    assert out.available_bits == 0


def test_a_span_is_consumed_at_most_once():
    out, inc = pools()
    _, spans = out.take(8)
    inc.consume(spans)
    with pytest.raises(SpanError, match="already used"):
        inc.consume(spans)
    with pytest.raises(SpanError, match="already used"):
        inc.consume([Span("b1", 4, 8)])  # overlaps the used bytes


def test_overlapping_spans_in_one_request_are_refused_and_nothing_consumed():
    _, inc = pools()
    with pytest.raises(SpanError):
        inc.consume([Span("b1", 0, 4), Span("b1", 2, 4)])
    assert inc.available_bits == 256
    assert inc.consume([Span("b1", 0, 4)]) == bytes(range(4))


@pytest.mark.parametrize("span", [Span("nope", 0, 1), Span("b1", 10, 7), Span("b1", -1, 2), Span("b1", 0, 0)])
def test_unknown_or_out_of_range_spans_are_refused(span):
    _, inc = pools()
    with pytest.raises(SpanError):
        inc.consume([Span("b2", 0, 4), span])
    assert inc.available_bits == 256


def test_fully_used_blocks_are_forgotten():
    _, inc = pools()
    inc.consume([Span("b1", 0, 16)])
    with pytest.raises(SpanError, match="not in the pool"):
        inc.consume([Span("b1", 0, 1)])


def test_clear_drops_everything():
    out, inc = pools()
    assert out.clear() == 256 and inc.clear() == 256
    with pytest.raises(InsufficientKey):
        out.take(1)


def test_incoming_refuses_a_block_twice():
    _, inc = pools()
    with pytest.raises(SpanError, match="already in the pool"):
        inc.add([("b1", b"x")])
