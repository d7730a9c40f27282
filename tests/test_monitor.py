"""Link samples from KM stats and module metrics: what the monitoring element is told."""

from vqkd.operator.adapters.sampling import LinkMonitor


class Stat:
    def __init__(self, drawn, out=0, inc=0):
        self.link, self.drawn_bits_total, self.outgoing_bits, self.incoming_bits = "ab", drawn, out, inc


def monitor():
    return LinkMonitor(core=None, kms=None, nodes=["a", "b"], links={"ab": ("a", "b")})


def module(generated, buffered=0.0, capacity=1e6, skr=5e5, qber=0.02):
    return {"vqkd_module_generated_bits_total": generated, "vqkd_module_buffer_bits": buffered,
            "vqkd_module_buffer_capacity_bits": capacity, "vqkd_module_secret_key_rate_bits_per_second": skr,
            "vqkd_module_qber": qber}


def test_rates_are_measured_between_polls():
    m = monitor()
    assert m._sample("ab", 10.0, [Stat(0)], module(0)) is None  # the first poll only sets the baseline
    sample = m._sample("ab", 12.0, [Stat(2e5, out=100, inc=50)], module(1e6, buffered=1000))
    assert (sample.key_rate_bps, sample.load_bps, sample.qber, sample.stored_key_bits) == (5e5, 1e5, 0.02, 1150)


def test_a_full_buffer_is_an_idle_link_not_a_dead_one():
    m = monitor()
    m._sample("ab", 10.0, [Stat(0)], module(1e6, buffered=1e6))
    sample = m._sample("ab", 12.0, [Stat(0)], module(1e6, buffered=1e6))
    assert sample.key_rate_bps == 5e5  # what the module says it produces, not 0


def test_a_link_that_stops_producing_reports_zero():
    m = monitor()
    m._sample("ab", 10.0, [Stat(0)], module(1e6, buffered=10))
    assert m._sample("ab", 12.0, [Stat(0)], module(1e6, buffered=10, skr=0)).key_rate_bps == 0
