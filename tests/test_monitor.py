"""The sampling adapter: what one monitoring round reads from the KMs and modules, as raw numbers."""

import grpc

from conftest import free_port
from vqkd.km.v1 import km_pb2
from vqkd.operator.adapters.sampling import module_reading, read_round

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
    def __init__(self, stats):
        self.by_node = stats

    async def stats(self, node, timeout):
        answer = self.by_node[node]
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
    round_ = await read_round(kms, ["a", "b", "c"], {"ab": ("a", "b"), "ac": ("a", "c")}, {}, clock=lambda: 42.0)
    assert round_.stats["a"].incarnation == "i-a" and round_.stats["c"] is down
    ab, ac = round_.links
    assert (ab.link, ab.at, ab.drawn_bits, ab.pool_bits, ab.module) == ("ab", 42.0, 150.0, 16, None)
    assert (ac.drawn_bits, ac.pool_bits) == (7.0, 0), "a KM that does not answer adds nothing"


async def test_a_module_that_does_not_answer_leaves_its_link_without_module_figures():
    kms = KMs({"a": stats("i-a"), "b": stats("i-b")})
    round_ = await read_round(kms, ["a", "b"], {"ab": ("a", "b")}, {"ab": f"http://127.0.0.1:{free_port()}/metrics"},
                              clock=lambda: 1.0)
    assert round_.links[0].module is None
