"""The sampling adapter: what one monitoring round reads from the KMs and modules, as raw numbers."""

import grpc

from conftest import free_port
from vqkd.km.domain.vocabulary import LinkState
from vqkd.km.v1 import km_pb2
from vqkd.operator.adapters.sampling import module_reading, read_round
from vqkd.operator.control.monitoring import KMReport

METRICS = """\
# HELP vqkd_module_generated_bits_total Secret key produced
# TYPE vqkd_module_generated_bits_total counter
vqkd_module_generated_bits_total{end="a"} 1000.0
vqkd_module_generated_bits_total{end="b"} 24.0
# HELP vqkd_module_buffer_bits Key waiting
# TYPE vqkd_module_buffer_bits gauge
vqkd_module_buffer_bits 512.0
# HELP vqkd_module_qber QBER
# TYPE vqkd_module_qber gauge
vqkd_module_qber 0.02
"""


def test_module_metrics_are_read_as_totals():
    reading = module_reading(METRICS)
    assert (reading.generated_bits, reading.buffer_bits, reading.qber) == (1024.0, 512.0, 0.02)
    assert (reading.buffer_capacity_bits, reading.secret_key_rate_bps) == (0.0, 0.0)  # not reported
    assert module_reading("").generated_bits is None


class KMs:
    """Stats by node (replica 0) or by (node, replica)."""

    def __init__(self, stats):
        self.by_node = stats

    async def stats(self, node, replica, timeout):
        answer = self.by_node[(node, replica) if replica else node]
        if isinstance(answer, Exception):
            raise answer
        return answer


def stats(incarnation, *links):
    return km_pb2.Stats(incarnation=incarnation, links=[
        km_pb2.LinkStats(link=name, drawn_bits_total=drawn, outgoing_bits=out, incoming_bits=inc)
        for name, drawn, out, inc in links])


async def test_a_round_reads_every_km_and_sums_both_ends_of_each_link():
    down = grpc.RpcError("connection refused")
    kms = KMs({"a": stats("i-a", ("ab", 100, 10, 1), ("ac", 7, 0, 0)), "b": stats("i-b", ("ab", 50, 2, 3)), "c": down})
    round_ = await read_round(kms, {"a": 1, "b": 1, "c": 1}, {"ab": ("a", "b"), "ac": ("a", "c")}, {}, clock=lambda: 42.0)
    assert round_.stats[("a", 0)].incarnation == "i-a" and round_.stats[("c", 0)] is down
    ab, ac = round_.links
    assert (ab.link, ab.at, ab.drawn_bits, ab.pool_bits, ab.module) == ("ab", 42.0, 150.0, 16, None)
    assert (ac.drawn_bits, ac.pool_bits) == (7.0, 0), "a KM that does not answer adds nothing"


async def test_a_module_that_does_not_answer_leaves_its_link_without_module_figures():
    kms = KMs({"a": stats("i-a"), "b": stats("i-b")})
    round_ = await read_round(kms, {"a": 1, "b": 1}, {"ab": ("a", "b")}, {"ab": f"http://127.0.0.1:{free_port()}/metrics"},
                              clock=lambda: 1.0)
    assert round_.links[0].module is None


def link_stats(node: str, state: str = "", reason: str = "", message: str = "", burned=None, pool_full=False):
    return km_pb2.Stats(incarnation=f"i-{node}", links=[km_pb2.LinkStats(
        link="ab", state=state, reason=reason, message=message, burned_bits_total=burned or {}, pool_full=pool_full)])


async def test_a_link_reads_the_worse_state_its_kms_report_and_all_they_burned():
    kms = KMs({"a": link_stats("a", "Degraded", "KeysBurned", "1024 bits given up",
                               burned={"not_synchronised": 1024, "device_error": 512}, pool_full=True),
               "b": link_stats("b", "Down", "DeviceUnavailable", "QKD module answered 503: laser off",
                               burned={"peer_unavailable": 256}, pool_full=True)})
    (ab,) = (await read_round(kms, {"a": 1, "b": 1}, {"ab": ("a", "b")}, {}, clock=lambda: 1.0)).links
    assert ab.reported == KMReport(LinkState.DOWN, "DeviceUnavailable", "QKD module answered 503: laser off")
    assert (ab.burned_bits, ab.pools_full) == (1792, True)


async def test_a_km_that_reports_no_state_says_nothing_and_one_full_pool_is_not_two():
    kms = KMs({"a": link_stats("a", pool_full=True), "b": link_stats("b", "Degraded", "DeviceRefused", "refused")})
    (ab,) = (await read_round(kms, {"a": 1, "b": 1}, {"ab": ("a", "b")}, {}, clock=lambda: 1.0)).links
    assert (ab.reported, ab.pools_full) == (KMReport(LinkState.DEGRADED, "DeviceRefused", "refused"), False)
    kms = KMs({"a": link_stats("a", "Up", "Healthy", "fine", pool_full=True), "b": grpc.RpcError("refused")})
    (ab,) = (await read_round(kms, {"a": 1, "b": 1}, {"ab": ("a", "b")}, {}, clock=lambda: 1.0)).links
    assert (ab.reported.state, ab.burned_bits, ab.pools_full) == (LinkState.UP, 0, False), \
        "a KM that does not answer does not vouch for its pool"
    kms = KMs({"a": link_stats("a"), "b": link_stats("b")})
    assert (await read_round(kms, {"a": 1, "b": 1}, {"ab": ("a", "b")}, {}, clock=lambda: 1.0)).links[0].reported is None


def end_stats(node: str, *ends: tuple[int, int, str, bool]):
    """A KM's stats with one end of link ab per peer replica: (peer replica, drawn, state, pool full)."""
    return km_pb2.Stats(incarnation=f"i-{node}", links=[
        km_pb2.LinkStats(link="ab", peer_replica=peer, drawn_bits_total=drawn, state=state, pool_full=full)
        for peer, drawn, state, full in ends])


async def test_a_link_between_replicated_nodes_sums_every_end_and_serves_while_one_pair_of_kms_does():
    """a runs 2 replicas, b one: link ab has an end at a/0 and a/1 (towards b/0) and two at b/0
    (towards a/0 and a/1), 4 in all; a pair's state is the worse of its two ends."""
    kms = KMs({"a": end_stats("a", (0, 100, "Up", True)), ("a", 1): end_stats("a", (0, 20, "Degraded", True)),
               "b": end_stats("b", (0, 30, "Up", True), (1, 4, "Up", True))})
    round_ = await read_round(kms, {"a": 2, "b": 1}, {"ab": ("a", "b")}, {}, clock=lambda: 1.0)
    assert set(round_.stats) == {("a", 0), ("a", 1), ("b", 0)}
    (ab,) = round_.links
    assert (ab.drawn_bits, ab.reported.state, ab.pools_full) == (154.0, LinkState.UP, True), "pair a/0-b/0 is Up"
    kms.by_node["b"] = end_stats("b", (0, 30, "Down", True), (1, 4, "Up", True))
    (ab,) = (await read_round(kms, {"a": 2, "b": 1}, {"ab": ("a", "b")}, {}, clock=lambda: 1.0)).links
    assert ab.reported.state is LinkState.DEGRADED, "a/0-b/0 is Down at b's end: a/1-b/0, Degraded, is the best"
    kms.by_node["b"] = end_stats("b", (0, 30, "Down", True), (1, 4, "Down", True))
    (ab,) = (await read_round(kms, {"a": 2, "b": 1}, {"ab": ("a", "b")}, {}, clock=lambda: 1.0)).links
    assert ab.reported.state is LinkState.DOWN, "no pair serves"
    kms.by_node["b"] = end_stats("b", (0, 30, "Up", True), (1, 4, "Up", True))
    kms.by_node[("a", 1)] = grpc.RpcError("refused")
    (ab,) = (await read_round(kms, {"a": 2, "b": 1}, {"ab": ("a", "b")}, {}, clock=lambda: 1.0)).links
    assert (ab.drawn_bits, ab.pools_full) == (134.0, False), "an end that does not answer does not vouch for its pool"
