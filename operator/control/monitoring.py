"""The monitoring element (paper §3.1): link health from KM and QKD module statistics.

The control plane's host reads the KMs and modules and hands in what they report as raw
``LinkReading``s, stamped with the control core's clock; ``LinkSampler`` interprets
successive readings of a link as one ``LinkSample`` (rates over the interval, the key
waiting, a full module buffer or full KM pools read as an idle link, what the KMs report
of the link). Monitoring writes the latest values into the topology (routing reads them
from there) and judges each link:

- QBER at or above the link's ``qberThreshold`` ⇒ Down, and an ``Alarm`` (possible
  eavesdropping): above the threshold BB84 yields no secure key, and an eavesdropper is
  one cause an operator must look into, so it is a record to act on, not a log line;
- a KM reports the link Down (its QKD device fails, the peer KM is gone) ⇒ Down, with the
  KM's reason and the device's message;
- no key produced for ``no_key_window_s`` (samples say zero, or samples stopped) ⇒ Down;
- a KM reports the link Degraded (device errors, burned key), QBER within 10 % of the
  threshold, or a measured key rate below what is reserved on the link ⇒ Degraded: still
  routable, but worth watching;
- otherwise Up. A Down link comes back only after ``recovery_samples`` healthy samples in
  a row, so a flapping link does not trigger a reroute storm.

A link that never reported is judged by its spec alone: an emulated module configured with
a QBER at or above the threshold is Down from the start; otherwise the link is Up until
samples say more. Silence counts only once a link has reported.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from vqkd.km.domain.vocabulary import LinkState
from vqkd.operator.control.topology import LinkChange, LinkRecord, Topology


BUFFER_FULL_SHARE = 0.99  # a module buffer this full has paused production


@dataclass(frozen=True, slots=True)
class ModuleReading:
    """What a QKD module's metrics say at one moment (the emulated module pair reports all of it)."""

    generated_bits: float | None  # secret key produced since the module started; None: not reported
    buffer_bits: float = 0.0  # key waiting in the module
    buffer_capacity_bits: float = 0.0  # 0: unknown
    secret_key_rate_bps: float = 0.0  # what the module produces while its buffer has room
    qber: float | None = None

    @property
    def buffer_full(self) -> bool:
        capacity = self.buffer_capacity_bits
        return capacity > 0 and self.buffer_bits >= capacity * BUFFER_FULL_SHARE


@dataclass(frozen=True, slots=True)
class KMReport:
    """A link's state as a KM sees it: a CamelCase reason, and the device's words when a
    device is the cause."""

    state: LinkState
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class LinkReading:
    """The raw counters of one link at one moment, before any interpretation."""

    link: str
    at: float  # seconds on the control core's clock
    drawn_bits: float  # key both KMs drew from the module since each started
    pool_bits: int  # key in both KMs' pools for the link
    module: ModuleReading | None  # None: a device without metrics, or the module did not answer
    reported: KMReport | None = None  # the worse of what the two KMs report; None: neither says
    burned_bits: int = 0  # key both KMs drew and gave up since each started, over all reasons
    pools_full: bool = False  # both KMs' outgoing pools hold their target: they draw no more


@dataclass(frozen=True, slots=True)
class LinkSample:
    link: str
    at: float  # seconds on the control core's clock
    # Secret key produced per second over the sampling interval; None for an idle link
    # whose production was never measured (its KMs' pools were full from the first reading).
    key_rate_bps: float | None
    qber: float | None = None  # None when the source does not report it (ETSI 014 modules do not)
    stored_key_bits: int | None = None  # key waiting in the module buffers and KM pools
    load_bps: float | None = None  # key drawn per second by the KMs over the interval
    reported: KMReport | None = None  # what the KMs report of the link
    burned_bits: int | None = None  # key the KMs drew and gave up


class LinkSampler:
    """Successive readings of each link as samples: what was produced and drawn per second
    between two readings, and the key waiting in the module and the KM pools.

    The key rate is the module's production. A module that reports none (a device without
    metrics) is judged by what the KMs drew. A module that produced nothing because its
    buffer is full was not drawn from: the link is idle, not broken, and the module's own
    figure for what it produces stands in for the measurement. Likewise KMs that drew
    nothing because both their pools are full: the last rate measured stands in.
    """

    def __init__(self) -> None:
        self._previous: dict[str, LinkReading] = {}
        self._measured: dict[str, float] = {}  # the last positive key rate of each link

    def sample(self, reading: LinkReading) -> LinkSample | None:
        """The sample since the link's previous reading; None for its first reading."""
        previous = self._previous.get(reading.link)
        self._previous[reading.link] = reading
        if previous is None or reading.at <= previous.at:
            return None
        dt = reading.at - previous.at
        # A KM that restarted counts from zero again: what it drew since is unknown, not negative.
        load = max(0.0, reading.drawn_bits - previous.drawn_bits) / dt
        module, before = reading.module, previous.module
        if module is not None and module.generated_bits is not None \
                and before is not None and before.generated_bits is not None:
            rate = max(0.0, module.generated_bits - before.generated_bits) / dt
            if rate == 0 and module.buffer_full:
                rate = module.secret_key_rate_bps
        else:
            rate = load
            if rate == 0 and reading.pools_full:
                rate = self._measured.get(reading.link)
        if rate:
            self._measured[reading.link] = rate
        buffered = module.buffer_bits if module is not None else 0.0
        return LinkSample(link=reading.link, at=reading.at, key_rate_bps=rate,
                          qber=module.qber if module is not None else None,
                          stored_key_bits=int(reading.pool_bits + buffered), load_bps=load,
                          reported=reading.reported, burned_bits=reading.burned_bits)

    def retain(self, links: Iterable[str]) -> None:
        """Forget the readings of links no longer sampled: one created again starts afresh."""
        keep = set(links)
        for link in [link for link in self._previous if link not in keep]:
            del self._previous[link]
            self._measured.pop(link, None)


class AlarmKind(StrEnum):
    POSSIBLE_EAVESDROPPING = "PossibleEavesdropping"


@dataclass(slots=True)
class Alarm:
    raised_at: float
    link: str
    kind: AlarmKind
    message: str
    qber: float
    threshold: float
    cleared_at: float | None = None

    @property
    def active(self) -> bool:
        return self.cleared_at is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class MonitoringSettings:
    no_key_window_s: float = 30.0
    recovery_samples: int = 3
    qber_warning_share: float = 0.9  # Degraded from this share of the threshold on

    def __post_init__(self) -> None:
        if self.no_key_window_s <= 0 or self.recovery_samples < 1 or not 0 < self.qber_warning_share <= 1:
            raise ValueError(
                "monitoring settings need no_key_window_s > 0, recovery_samples >= 1 and "
                f"0 < qber_warning_share <= 1, got {self}"
            )


@dataclass(slots=True)
class _Watch:
    last_productive_at: float  # last time key was produced, or when watching began
    last_sample_at: float | None = None
    healthy_streak: int = 0
    alarm: Alarm | None = None  # the link's active alarm
    reported: KMReport | None = None  # what the KMs reported in the latest sample


@dataclass(frozen=True, slots=True)
class _Verdict:
    state: LinkState
    reason: str
    message: str


AlarmListener = Callable[[Alarm], None]


class Monitoring:
    def __init__(self, topology: Topology, settings: MonitoringSettings = MonitoringSettings(),
                 alarm_history: int = 1000):
        self.topology = topology
        self.settings = settings
        self.alarms: deque[Alarm] = deque(maxlen=alarm_history)
        self._watches: dict[str, _Watch] = {}
        self._alarm_listeners: list[AlarmListener] = []

    def subscribe_alarms(self, listener: AlarmListener) -> None:
        self._alarm_listeners.append(listener)

    def active_alarms(self) -> list[Alarm]:
        return [watch.alarm for watch in self._watches.values() if watch.alarm is not None]

    def watch(self, link: LinkRecord, now: float) -> LinkChange | None:
        """Start judging a newly registered link, from its spec until it reports."""
        self._watches[link.name] = _Watch(last_productive_at=now)
        return self.reassess(link, reserved_bps=0, now=now)

    def forget(self, name: str, now: float) -> None:
        """Stop judging a link that was removed; its active alarm is cleared with it."""
        watch = self._watches.pop(name, None)
        if watch is not None and watch.alarm is not None:
            watch.alarm.cleared_at = now

    def ingest(self, sample: LinkSample, reserved_bps: int) -> LinkChange | None:
        """Take one measurement; the link's state change, if any.

        Samples of links no longer registered (a poll racing a deletion) and samples older
        than the latest one taken are ignored.
        """
        link = self.topology.links.get(sample.link)
        watch = self._watches.get(sample.link)
        if link is None or watch is None or (watch.last_sample_at is not None and sample.at < watch.last_sample_at):
            return None
        watch.last_sample_at = sample.at
        watch.reported = sample.reported
        link.key_rate_bps = sample.key_rate_bps
        link.qber = sample.qber if sample.qber is not None else link.qber
        link.stored_key_bits = sample.stored_key_bits
        link.load_bps = sample.load_bps
        link.burned_bits = sample.burned_bits
        link.measured_at = sample.at
        if sample.key_rate_bps is None or sample.key_rate_bps > 0:  # idle, or producing
            watch.last_productive_at = sample.at
        return self._apply(link, watch, self._judge(link, watch, reserved_bps, sample.at, counts_as_sample=True),
                           sample.at)

    def reassess(self, link: LinkRecord, reserved_bps: int, now: float) -> LinkChange | None:
        """Judge a link again from what is known, e.g. after its threshold changed."""
        watch = self._watches[link.name]
        return self._apply(link, watch, self._judge(link, watch, reserved_bps, now, counts_as_sample=False), now)

    def silent(self, now: float) -> list[LinkChange]:
        """Links that reported once and have produced no key for the window: Down."""
        changes = []
        window = self.settings.no_key_window_s
        for name, watch in self._watches.items():
            link = self.topology.links[name]
            if watch.last_sample_at is None or link.state is LinkState.DOWN:
                continue
            idle = now - watch.last_productive_at
            if idle < window:
                continue
            if now - watch.last_sample_at >= window:
                message = f"no monitoring sample for {now - watch.last_sample_at:.0f} s (window {window:.0f} s)"
            else:
                message = f"samples report no key produced for {idle:.0f} s (window {window:.0f} s)"
            watch.healthy_streak = 0
            change = self.topology.set_link_state(name, LinkState.DOWN, "NoKeyProduced", message, now)
            if change is not None:
                changes.append(change)
        return changes

    def _judge(self, link: LinkRecord, watch: _Watch, reserved_bps: int, now: float,
               counts_as_sample: bool) -> _Verdict | None:
        """The state the link should be in; None to keep the current one."""
        threshold = link.qber_threshold
        qber = link.current_qber
        if qber is not None and qber >= threshold:
            watch.healthy_streak = 0
            if link.qber is None:
                return _Verdict(LinkState.DOWN, "QBERAboveThreshold",
                                f"configured QBER {qber:.4f} >= threshold {threshold:.4f}: the module yields no "
                                "secure key; lower spec.emulated.qber or raise spec.qberThreshold")
            return _Verdict(LinkState.DOWN, "QBERAboveThreshold",
                            f"measured QBER {qber:.4f} >= threshold {threshold:.4f}: possible eavesdropping; "
                            "the link yields no secure key")
        reported = watch.reported
        if reported is not None and reported.state is LinkState.DOWN:
            watch.healthy_streak = 0
            return _Verdict(LinkState.DOWN, reported.reason, reported.message)
        if link.key_rate_bps is not None and link.key_rate_bps <= 0:
            watch.healthy_streak = 0
            idle = now - watch.last_productive_at
            if idle >= self.settings.no_key_window_s:
                return _Verdict(LinkState.DOWN, "NoKeyProduced",
                                f"samples report no key produced for {idle:.0f} s "
                                f"(window {self.settings.no_key_window_s:.0f} s)")
            return None
        if link.state is LinkState.DOWN:
            if counts_as_sample:
                watch.healthy_streak += 1
                if watch.healthy_streak < self.settings.recovery_samples:
                    return None
            elif link.measured_at is not None:
                # Only healthy samples bring back a link that samples found down; a link
                # judged by its spec alone is judged again by its (changed) spec.
                return None
        if reported is not None and reported.state is LinkState.DEGRADED:
            return _Verdict(LinkState.DEGRADED, reported.reason, reported.message)
        if qber is not None and qber >= self.settings.qber_warning_share * threshold:
            return _Verdict(LinkState.DEGRADED, "QBERNearThreshold",
                            f"QBER {qber:.4f} is within {1 - self.settings.qber_warning_share:.0%} "
                            f"of the threshold {threshold:.4f}")
        if link.key_rate_bps is not None and link.key_rate_bps < reserved_bps:
            return _Verdict(LinkState.DEGRADED, "KeyRateBelowReserved",
                            f"measured key rate {link.key_rate_bps:.0f} bit/s is below the {reserved_bps} bit/s "
                            "reserved by sessions")
        return _Verdict(LinkState.UP, "Healthy", _health(link))

    def _apply(self, link: LinkRecord, watch: _Watch, verdict: _Verdict | None, now: float) -> LinkChange | None:
        if verdict is None:
            return None
        if verdict.reason == "QBERAboveThreshold" and link.qber is not None and watch.alarm is None:
            # Measured, not configured: a spec that sets a QBER above the threshold is a
            # mistake to fix, not an attack to investigate.
            self._raise_alarm(link, watch, verdict.message, link.qber, now)
        elif verdict.state is not LinkState.DOWN and watch.alarm is not None:
            watch.alarm.cleared_at = now
            watch.alarm = None
        if verdict.state is not LinkState.DOWN:
            watch.healthy_streak = 0
        return self.topology.set_link_state(link.name, verdict.state, verdict.reason, verdict.message, now)

    def _raise_alarm(self, link: LinkRecord, watch: _Watch, finding: str, qber: float, now: float) -> None:
        alarm = Alarm(now, link.name, AlarmKind.POSSIBLE_EAVESDROPPING,
                      f"link {link.name} ({link.ends[0]} - {link.ends[1]}): {finding}", qber, link.qber_threshold)
        watch.alarm = alarm
        self.alarms.append(alarm)
        for listener in self._alarm_listeners:
            listener(alarm)


def _health(link: LinkRecord) -> str:
    rate = f"{link.key_rate_bps:.0f} bit/s measured" if link.key_rate_bps is not None else "not measured yet"
    qber = f", QBER {link.current_qber:.4f}" if link.current_qber is not None else ""
    return f"key rate {rate}{qber}"
